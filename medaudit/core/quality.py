"""Image quality of a perturbed input against the original: PSNR and SSIM per case, 2D and 3D.

The report's perceptibility figures and the corruptions' calibration both use these, so a
severity's SSIM band and the SSIM a run records are the same measurement.
"""

from __future__ import annotations

from medaudit.core.lazy import F, torch

#: SSIM's Gaussian window (Wang et al. 2004): 11 samples per axis, sigma 1.5 (MONAI's SSIMMetric defaults).
WINDOW, SIGMA = 11, 1.5
K1, K2 = 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB, ``10 log10(range^2 / MSE)`` over all channels and pixels
    (``inf`` for identical images)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004) of ``N x C x H x W`` or ``N x C x D x H x W``
    inputs: a Gaussian window of 11 samples (sigma 1.5) along every spatial axis, K1 = 0.01,
    K2 = 0.03, computed per channel on the 'valid' positions (no padding) and averaged over
    channels and positions. Along an axis shorter than 11 the window shrinks to it."""
    a, b = a.double(), b.double()
    channels, spatial = a.shape[1], a.shape[2:]
    conv = {2: F.conv2d, 3: F.conv3d}[len(spatial)]
    windows = []
    for axis, length in enumerate(spatial):  # separable: one 1-D Gaussian per axis
        size = min(WINDOW, length)
        t = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
        g = torch.exp(-(t**2) / (2 * SIGMA**2))
        shape = [1] * len(spatial)
        shape[axis] = size
        windows.append((g / g.sum()).reshape(1, 1, *shape).expand(channels, 1, *shape).contiguous())

    def blur(t: torch.Tensor) -> torch.Tensor:
        for w in windows:
            t = conv(t, w, groups=channels)
        return t

    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
