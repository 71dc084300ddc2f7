"""The corruption operations: the shared contract (shape, dtype, range, identity at p = 0,
seeded determinism, 2D and 3D), severity that grows with p, and each definition's formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medaudit.core.quality import ssim
from medaudit.plugins.attacks._corruption_ops import OPS

NAMES = {
    "general": {"gaussian-noise", "shot-noise", "defocus-blur", "motion-blur", "contrast", "gamma", "brightness",
                "pixelate", "downsample", "jpeg"},
    "mri": {"rician-noise", "gibbs-ringing", "kspace-spike", "bias-field", "ghosting", "motion"},
    "ct": {"ct-dose-noise", "ct-streaks", "slice-thickness", "hu-window-shift"},
    "rgb": {"stain-variation", "black-corners", "bubbles", "characters"},
}


def blobs(shape, seed=0, dtype=torch.float32):
    """Smooth test images: a few Gaussian blobs of different intensity per channel on a dim
    background, in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in spatial], indexing="ij")
    image = torch.full(shape, 0.15, dtype=torch.float64)
    for _ in range(4):
        centre = torch.rand(n, 1, len(spatial), generator=g, dtype=torch.float64) * 1.2 - 0.6
        width = 0.2 + 0.25 * torch.rand(n, 1, generator=g, dtype=torch.float64)
        amplitude = 0.2 + 0.4 * torch.rand(n, c, generator=g, dtype=torch.float64)
        r2 = sum((grid - centre[..., i].view(n, 1, *[1] * len(spatial))) ** 2 for i, grid in enumerate(grids))
        image = image + amplitude.view(n, c, *[1] * len(spatial)) * torch.exp(-r2 / (2 * width.view(n, 1, *[1] * len(spatial)) ** 2))
    return image.clamp(0.1, 0.9).to(dtype)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def shapes(name):
    """The shapes an operation takes: RGB operations and JPEG 2D only; the others 2D and 3D, one channel or more."""
    if OPS[name].modality == "rgb":
        return [(4, 3, 32, 32)]
    if name == "jpeg":
        return [(8, 1, 32, 32), (4, 3, 32, 32)]
    return [(8, 1, 32, 32), (2, 1, 8, 16, 16), (2, 2, 8, 16, 16)]


CASES = [(name, shape) for name in OPS for shape in shapes(name)]


def test_registry_names_and_fields():
    assert set(OPS) == set().union(*NAMES.values())
    for name, op in OPS.items():
        assert name in NAMES[op.modality], name
        assert op.p_max > 0 and op.parameter and op.source and callable(op.fn)


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{len(s) - 2}d-c{s[1]}" for n, s in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(name, shape, dtype):
    """Shape, dtype and device kept, output in [0, 1], p = 0 the identity, the same seed the
    same output; a random operation differs under another seed, a deterministic one does not."""
    op, x = OPS[name], blobs(shape, dtype=dtype)
    out = op.fn(x, op.p_max, seeded(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(op.fn(x, 0.0, seeded(0)), x)
    assert torch.equal(op.fn(x, op.p_max, seeded(0)), out)
    assert torch.equal(op.fn(x, op.p_max, seeded(1)), out) is not op.random


@pytest.mark.parametrize("name", [n for n in OPS if n != "bubbles"])
def test_small_strength_is_nearly_the_identity(name):
    """Not only p = 0: a thousandth of p_max barely changes the image (bubbles excepted: p
    counts whole discs, and the first shows at any p > 0)."""
    op = OPS[name]
    x = blobs((4, 3 if op.modality == "rgb" else 1, 32, 32))
    out = op.fn(x, 1e-3 * op.p_max, seeded(0))
    assert float((out - x).abs().mean()) < 0.01


@pytest.mark.parametrize("name", list(OPS))
def test_ssim_falls_as_the_strength_grows(name):
    """Mean SSIM against the clean images never rises along linspace(0, p_max, 4) (same seed)
    and has fallen at p_max."""
    op = OPS[name]
    x = blobs((8, 3 if op.modality == "rgb" else 1, 32, 32), seed=1)
    means = [float(ssim(op.fn(x, p, seeded(2)), x).mean()) for p in torch.linspace(0, op.p_max, 4).tolist()]
    assert all(b <= a + 1e-3 for a, b in itertools.pairwise(means)), means
    assert means[-1] < means[0] - 0.01, means


@pytest.mark.parametrize("name,x", [
    ("jpeg", torch.rand(2, 1, 4, 8, 8)), ("jpeg", torch.rand(2, 2, 8, 8)), ("characters", torch.rand(2, 1, 8, 8)),
    ("bubbles", torch.rand(2, 3, 4, 8, 8)), ("contrast", torch.rand(2, 8, 8)),
])
def test_rejects_shapes_it_cannot_corrupt(name, x):
    with pytest.raises(ValueError):
        OPS[name].fn(x, 0.5, seeded(0))


def test_rejects_negative_strength():
    with pytest.raises(ValueError, match="p must be"):
        OPS["gaussian-noise"].fn(torch.rand(1, 1, 8, 8), -0.1, seeded(0))


# -- formulas --------------------------------------------------------------------------------


def test_rician_noise_moments():
    """Rician magnitude of intensity a and noise sigma: E[M^2] = a^2 + 2 sigma^2; at a = 0 it is
    Rayleigh, mean sigma sqrt(pi / 2)."""
    sigma, n = 0.1, 2**16
    out = OPS["rician-noise"].fn(torch.full((1, 1, 256, 256), 0.5, dtype=torch.float64), sigma, seeded(0))
    assert float(out.pow(2).mean()) == pytest.approx(0.25 + 2 * sigma**2, abs=4 * 2 * 0.5 * sigma / n**0.5)
    out = OPS["rician-noise"].fn(torch.zeros(1, 1, 256, 256, dtype=torch.float64), sigma, seeded(1))
    rayleigh_sd = sigma * (2 - math.pi / 2) ** 0.5
    assert float(out.mean()) == pytest.approx(sigma * (math.pi / 2) ** 0.5, abs=4 * rayleigh_sd / n**0.5)


@pytest.mark.parametrize("name,x,sd", [
    ("gaussian-noise", 0.5, lambda p, x: p),
    ("shot-noise", 0.25, lambda p, x: p * x**0.5),
    ("ct-dose-noise", 0.3, lambda p, x: p * (x + 0.05) ** 0.5),
])
def test_noise_standard_deviation(name, x, sd):
    p = 0.05
    out = OPS[name].fn(torch.full((1, 1, 256, 256), x, dtype=torch.float64), p, seeded(0))
    assert float(out.mean()) == pytest.approx(x, abs=4 * sd(p, x) / 256)
    assert float(out.std()) == pytest.approx(sd(p, x), rel=0.02)


def test_gibbs_ringing_keeps_the_central_kspace_and_drops_the_rest():
    """p = 0.5 keeps the central half of k-space: a cosine of 2 cycles passes untouched, one of
    12 cycles vanishes; a strength too small to drop a line leaves the image as it was."""
    t = torch.arange(32, dtype=torch.float64)
    low = 0.5 + 0.2 * torch.cos(2 * math.pi * 2 * t / 32)
    high = 0.2 * torch.cos(2 * math.pi * 12 * t / 32)
    x = (low + high).view(1, 1, 1, 32).expand(1, 1, 32, 32)
    out = OPS["gibbs-ringing"].fn(x, 0.5, seeded(0))
    assert torch.allclose(out, low.view(1, 1, 1, 32).expand_as(x), atol=1e-9)
    image = blobs((2, 1, 32, 32))
    assert torch.allclose(OPS["gibbs-ringing"].fn(image, 0.01, seeded(0)), image, atol=1e-5)


def test_contrast_gamma_brightness_and_window_shift_formulas():
    x, p = blobs((3, 2, 16, 16), dtype=torch.float64), 0.3
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(OPS["contrast"].fn(x, p, seeded(0)), (mean + (1 - p) * (x - mean)).clamp(0, 1))
    assert torch.equal(OPS["gamma"].fn(x, p, seeded(0)), x ** (1 + p))
    assert torch.equal(OPS["brightness"].fn(x, p, seeded(0)), (x + p).clamp(0, 1))
    assert torch.equal(OPS["hu-window-shift"].fn(x, 0.1, seeded(0)), (x + 0.1).clamp(0, 1))


def test_defocus_blur_spreads_an_impulse_by_sigma_along_every_axis():
    x = torch.zeros(1, 1, 21, 21, 21, dtype=torch.float64)
    x[0, 0, 10, 10, 10] = 1
    out = OPS["defocus-blur"].fn(x, 1.5, seeded(0))[0, 0]
    assert float(out.sum()) == pytest.approx(1, abs=1e-9)
    offsets = torch.arange(21, dtype=torch.float64) - 10
    for line in (out[:, 10, 10], out[10, :, 10], out[10, 10, :]):
        assert float((line / line.sum() * offsets**2).sum()) == pytest.approx(1.5**2, rel=0.02)


def test_motion_blur_smears_along_one_axis_over_p_plus_one_pixels():
    x = torch.zeros(16, 1, 21, 21, dtype=torch.float64)
    x[:, 0, 10, 10] = 1
    out = OPS["motion-blur"].fn(x, 4, seeded(0))
    along_h = (out[:, 0, :, 10] > 0).sum(1) > 1
    along_w = (out[:, 0, 10, :] > 0).sum(1) > 1
    assert torch.equal(along_h, ~along_w) and along_h.any() and along_w.any()  # one axis per image, both occur
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.full((16,), 1 / 5, dtype=torch.float64))  # 5 equal taps


def test_slice_thickness_blurs_along_the_slices_only():
    x = blobs((2, 1, 8, 16, 16), dtype=torch.float64)
    flat_in_depth = x[:, :, :1].expand_as(x).contiguous()
    assert torch.allclose(OPS["slice-thickness"].fn(flat_in_depth, 2, seeded(0)), flat_in_depth)
    assert not torch.allclose(OPS["slice-thickness"].fn(x, 2, seeded(0)), x)


def test_pixelate_and_downsample_at_factor_two_match_pooling_and_interpolation():
    x = blobs((2, 1, 32, 32), dtype=torch.float64)
    pooled = F.avg_pool2d(x, 2)
    assert torch.allclose(OPS["pixelate"].fn(x, 1, seeded(0)), pooled.repeat_interleave(2, 2).repeat_interleave(2, 3))
    bilinear = F.interpolate(pooled, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(OPS["downsample"].fn(x, 1, seeded(0)), bilinear)


def test_kspace_spike_modulates_a_flat_image_between_one_minus_and_one_plus_p():
    """A spike of p times the peak (the DC term of a flat image c) adds a complex wave of
    amplitude p c: the magnitude swings between c (1 - p) and c (1 + p)."""
    c, p = 0.4, 0.5
    out = OPS["kspace-spike"].fn(torch.full((4, 1, 32, 32), c, dtype=torch.float64), p, seeded(0))
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.full((4,), c * (1 - p), dtype=torch.float64), atol=0.02)
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.full((4,), c * (1 + p), dtype=torch.float64), atol=0.02)


def test_ghosting_restores_the_centre_of_kspace():
    """A flat image lives on the central k-space line alone, which ghosting restores; an image
    with structure gets ghosts."""
    flat = torch.full((2, 1, 32, 32), 0.4, dtype=torch.float64)
    assert torch.allclose(OPS["ghosting"].fn(flat, 1.0, seeded(0)), flat)
    square = torch.full((2, 1, 32, 32), 0.2, dtype=torch.float64)
    square[..., 10:22, 8:20] = 0.8
    assert float((OPS["ghosting"].fn(square, 1.0, seeded(0)) - square).abs().max()) > 0.05


def test_bias_field_is_the_exponential_of_a_cubic_polynomial():
    """log(out / x) lies in the span of the monomials of degree <= 3 of the coordinates."""
    x = torch.full((2, 1, 8, 12, 12), 0.1, dtype=torch.float64)  # a field of at most e^1 stays below 1
    log_field = torch.log(OPS["bias-field"].fn(x, 0.05, seeded(0)) / x)[:, 0]
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in (8, 12, 12)], indexing="ij")
    basis = torch.stack([grids[0] ** i * grids[1] ** j * grids[2] ** k
                         for i in range(4) for j in range(4) for k in range(4) if i + j + k <= 3]).flatten(1).T
    for field in log_field:
        coefficients = torch.linalg.lstsq(basis, field.flatten()).solution
        assert torch.allclose(basis @ coefficients, field.flatten(), atol=1e-9)
        assert coefficients.abs().max() <= 0.05 + 1e-9


def test_ct_streaks_add_whole_multiples_of_p():
    x, p = torch.full((2, 1, 4, 16, 16), 0.5, dtype=torch.float64), 0.05
    steps = (OPS["ct-streaks"].fn(x, p, seeded(0)) - x) / p
    assert torch.allclose(steps, steps.round(), atol=1e-9)
    assert (steps != 0).any(dim=(3, 4)).all()  # lines on every slice


def test_stain_variation_scales_each_channels_optical_density():
    x = blobs((3, 3, 16, 16), dtype=torch.float64)
    p, eps = 0.3, 1 / 255
    out = OPS["stain-variation"].fn(x, p, seeded(0))
    ratio = torch.log(out + eps) / torch.log(x + eps)
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-9)
    assert ((per_channel - 1).abs() <= p + 1e-9).all()


def test_black_corners_bubbles_and_characters():
    x = blobs((4, 3, 32, 32), dtype=torch.float64)
    corners = OPS["black-corners"].fn(x, 0.4, seeded(0))
    assert (corners[..., 0, 0] == 0).all() and torch.equal(corners[..., 12:20, 12:20], x[..., 12:20, 12:20])
    bubbles = OPS["bubbles"].fn(x, 0.5, seeded(0))
    assert (bubbles >= x).all() and (bubbles > x).any()
    marked = OPS["characters"].fn(x, 0.5, seeded(0))
    assert (marked <= x).all()
    columns = (marked < x).any(dim=(1, 2)).sum(1)
    assert torch.equal(columns, torch.full((4,), 16))  # half the width
