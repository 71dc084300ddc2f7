"""The operations of the corruption family: pure, batched torch functions on images in [0, 1].

Every operation takes ``N x C x H x W`` (2D) or ``N x C x D x H x W`` (3D) floating images,
a strength ``p >= 0`` and a ``torch.Generator``, and returns a tensor of the same shape and
dtype on the same device, clipped to [0, 1]. Larger ``p`` is always a stronger corruption
and ``p = 0`` returns the input unchanged. Random operations draw everything from the
generator (so a seed fixes the output) and draw the same numbers whatever ``p``, so the
corruptions at two strengths differ only in strength; deterministic ones ignore it.

:data:`OPS` names each operation with its strongest clinically plausible strength
(``p_max``), its modality, what ``p`` measures and where its definition comes from. The
definitions follow MONAI, TorchIO and the ImageNet-C / MedMNIST-C corruptions, written
here in torch so that they run batched on the model's device (those libraries work on one
image at a time, in numpy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

from medaudit.core.lazy import F, torch


@dataclasses.dataclass(frozen=True)
class Op:
    """One corruption operation and what its strength means."""

    fn: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    random: bool  # draws from the generator
    p_max: float  # the strongest p that is still clinically plausible (calibration searches [0, p_max])
    modality: str  # "mri" | "ct" | "general" | "rgb" (rgb: C == 3, 2D only)
    parameter: str  # what p is, with its unit
    source: str  # where the definition comes from
    dims: frozenset[int] = frozenset({2, 3})  # image dimensions it handles (2: slices and photographs only)


#: The dimensions of an operation that handles 2D images only (photographs, JPEG).
TWO_D = frozenset({2})


def _operation(fn):
    """Check the input, return it unchanged at p = 0, and clip the output to [0, 1] in the
    input's dtype: the contract every operation shares."""

    @functools.wraps(fn)
    def op(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        if x.dim() not in (4, 5) or not x.is_floating_point():
            raise ValueError(f"expected floating N x C x H x W or N x C x D x H x W images, got {x.dtype} {tuple(x.shape)}")
        p = float(p)
        if not p >= 0 or math.isinf(p):
            raise ValueError(f"the strength p must be finite and >= 0, got {p}")
        if p == 0:
            return x.clone()
        return fn(x, p, generator).clamp(0, 1).to(x.dtype)

    return op


# -- helpers ---------------------------------------------------------------------------------


def _spatial(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


def _per_image(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-image value (or flag) shaped to broadcast over ``x``."""
    return t.view(-1, *[1] * (x.dim() - 1))


def _conv_along(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Convolve every line of ``x`` along ``axis`` with the odd 1-D ``kernel``, reflect padding
    (the kernel is cut to the axis length, which reflect padding needs)."""
    size = x.shape[axis]
    radius = min(kernel.numel() // 2, size - 1)
    kernel = kernel[kernel.numel() // 2 - radius: kernel.numel() // 2 + radius + 1]
    kernel = kernel / kernel.sum()
    moved = x.movedim(axis, -1)
    lines = moved.reshape(-1, 1, size)
    if radius:
        lines = F.pad(lines, (radius, radius), mode="reflect")
    out = F.conv1d(lines, kernel.view(1, 1, -1).to(x.dtype))
    return out.reshape(moved.shape).movedim(-1, axis)


def _gaussian(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """A Gaussian kernel of standard deviation ``sigma`` pixels, truncated at 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    return torch.exp(-(t**2) / (2 * max(sigma, 1e-3) ** 2))  # below 1e-3 px: a delta


def _kspace(x: torch.Tensor) -> torch.Tensor:
    """Centred k-space over the spatial axes (zero frequency in the middle)."""
    axes = _spatial(x)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=axes), dim=axes)


def _image(k: torch.Tensor) -> torch.Tensor:
    """The complex image of a centred k-space."""
    axes = list(range(2, k.dim()))
    return torch.fft.ifftn(torch.fft.ifftshift(k, dim=axes), dim=axes)


def _in_plane_axis(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, True for H and False for W: the in-plane axis a directional artefact runs along."""
    return torch.randint(0, 2, (x.shape[0],), generator=generator, device=x.device) == 0


def _centred_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (rows ``H x 1``, columns ``1 x W``) from the image centre, in pixels."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2
    cols = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2
    return rows.view(h, 1), cols.view(1, w)


def _need_rgb(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} corrupts 2D RGB images (N x 3 x H x W), got {tuple(x.shape)}")


# -- general ---------------------------------------------------------------------------------


@_operation
def gaussian_noise(x, p, generator):
    """Additive Gaussian noise N(0, p^2) (ImageNet-C's gaussian_noise)."""
    return x + p * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@_operation
def shot_noise(x, p, generator):
    """Poisson (quantum) noise with ``1 / p^2`` counts at full intensity, so that ``p`` is the
    relative noise standard deviation at intensity 1 (ImageNet-C's shot_noise, rate parametrised)."""
    rate = 1.0 / max(p, 1e-6) ** 2  # Poisson sampling breaks down at astronomical rates
    return torch.poisson(x.clamp(min=0) * rate, generator=generator) / rate


@_operation
def defocus_blur(x, p, generator):
    """Gaussian blur of standard deviation ``p`` pixels along every spatial axis (separable,
    reflect padding); TorchIO's RandomBlur."""
    kernel = _gaussian(p, x)
    for axis in _spatial(x):
        x = _conv_along(x, kernel, axis)
    return x


@_operation
def motion_blur(x, p, generator):
    """Linear motion of ``p`` pixels during the exposure: a centred box of length ``p + 1``
    pixels (fractional ends) along H or W, chosen per image (ImageNet-C's motion_blur,
    simplified to the two grid directions)."""
    radius = math.ceil((p + 1) / 2)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = ((p + 2) / 2 - t.abs()).clamp(0, 1)
    along_h = _in_plane_axis(x, generator)
    return torch.where(_per_image(along_h, x), _conv_along(x, kernel, x.dim() - 2), _conv_along(x, kernel, x.dim() - 1))


@_operation
def contrast(x, p, generator):
    """Contrast reduction towards each image's mean: ``mean + (1 - p)(x - mean)`` (ImageNet-C's contrast)."""
    mean = x.mean(dim=list(range(1, x.dim())), keepdim=True)
    return mean + (1 - p) * (x - mean)


@_operation
def gamma(x, p, generator):
    """Gamma distortion ``x ** (1 + p)`` (darker mid-tones; TorchIO's RandomGamma with log-gamma ``log(1 + p)``)."""
    return x.clamp(min=0) ** (1 + p)


@_operation
def brightness(x, p, generator):
    """Brightness shift ``x + p`` (ImageNet-C's brightness, in intensity rather than HSV value)."""
    return x + p


def _resampling(size: int, factor: float, back: str, x: torch.Tensor) -> torch.Tensor:
    """The ``size x size`` matrix that averages a line over cells of ``factor`` pixels (exact
    fractional overlaps, the last cell cut at the edge) and interpolates it back at the pixel
    centres, nearest or linear. Cells of any real width keep the result continuous in the
    factor, where resizing to a whole number of pixels would jump."""
    cells = math.ceil(size / factor - 1e-9)
    edges = torch.arange(cells + 1, device=x.device, dtype=x.dtype) * factor
    edges[-1] = size
    pixels = torch.arange(size, device=x.device, dtype=x.dtype)
    overlap = (torch.minimum(edges[1:, None], pixels + 1) - torch.maximum(edges[:-1, None], pixels)).clamp(min=0)
    down = overlap / overlap.sum(1, keepdim=True)  # cells x size
    centres = pixels + 0.5
    if back == "nearest" or cells == 1:
        cell = (centres / factor).floor().long().clamp(max=cells - 1)
        up = (cell.view(size, 1) == torch.arange(cells, device=x.device)).to(x.dtype)  # size x cells
    else:
        middles = (edges[1:] + edges[:-1]) / 2
        left = (torch.searchsorted(middles, centres) - 1).clamp(0, cells - 2)
        weight = ((centres - middles[left]) / (middles[left + 1] - middles[left])).clamp(0, 1)
        up = torch.zeros(size, cells, device=x.device, dtype=x.dtype)
        up[pixels.long(), left] = 1 - weight
        up[pixels.long(), left + 1] += weight
    return up @ down


def _resample(x: torch.Tensor, p: float, back: str) -> torch.Tensor:
    """Average over cells of ``1 + p`` pixels along every spatial axis, then interpolate back
    to the pixel grid by ``back`` (nearest or linear), separably."""
    for axis in _spatial(x):
        matrix = _resampling(x.shape[axis], 1 + p, back, x)
        x = (x.movedim(axis, -1) @ matrix.T).movedim(-1, axis)
    return x


@_operation
def pixelate(x, p, generator):
    """Pixelation: area-average by a factor ``1 + p``, then nearest upsampling back (ImageNet-C's
    pixelate). How the cells fall on the anatomy shifts with ``p``, so the SSIM can tick up by
    a few thousandths between close strengths."""
    return _resample(x, p, "nearest")


@_operation
def downsample(x, p, generator):
    """Lower resolution: area-average by a factor ``1 + p``, then (bi/tri)linear upsampling
    back (TorchIO's RandomAnisotropy, on every spatial axis)."""
    return _resample(x, p, "linear")


JPEG_P_MAX = 1.0


@_operation
def jpeg(x, p, generator):
    """JPEG compression at quality ``round(100 - 95 p)`` clipped to [5, 100] (ImageNet-C's
    jpeg_compression), with torchvision's libjpeg codec on the CPU on 8-bit images; the result
    goes back to the input's device and dtype. 2D, 1 or 3 channels. (torchvision 0.29
    deprecates its codecs in favour of TorchCodec; its warning is silenced here.)"""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg compresses 2D images of 1 or 3 channels, got {tuple(x.shape)}")
    quality = int(min(100, max(5, round(100 - 95 * p / JPEG_P_MAX))))
    pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_jpeg(list(pixels), quality=quality)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY if x.shape[1] == 1 else ImageReadMode.RGB)
    return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255


# -- MRI -------------------------------------------------------------------------------------


@_operation
def rician_noise(x, p, generator):
    """Rician noise of magnitude MR images, ``sqrt((x + p n1)^2 + (p n2)^2)`` (MONAI's
    RandRicianNoise; Gudbjartsson & Patz 1995)."""
    n1 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    n2 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.sqrt((x + p * n1) ** 2 + (p * n2) ** 2)


@_operation
def gibbs_ringing(x, p, generator):
    """Gibbs ringing of a truncated acquisition: keep the central ``1 - p`` of k-space along
    every spatial axis, zero the rest, magnitude of the inverse FFT (TorchIO's
    RandomGibbsNoise / MONAI's GibbsNoise)."""
    k = _kspace(x)
    for axis in _spatial(x):
        size = x.shape[axis]
        keep = max(1, round((1 - p) * size))
        start = size // 2 - keep // 2
        line = torch.zeros(size, device=x.device, dtype=x.dtype)
        line[start: start + keep] = 1
        k = k * line.view(size, *[1] * (x.dim() - 1 - axis))
    return _image(k).abs()


@_operation
def kspace_spike(x, p, generator):
    """A k-space spike (herringbone artefact): add ``p`` times the spectrum's peak magnitude at
    one random k-space position, between 1/8 and 1/2 of the way from the centre to the edge
    along every spatial axis; magnitude of the inverse FFT (TorchIO's RandomSpike, MONAI's
    KSpaceSpikeNoise)."""
    k = _kspace(x)
    n, axes = x.shape[0], _spatial(x)
    fraction = torch.rand(n, len(axes), generator=generator, device=x.device)
    sign = torch.randint(0, 2, (n, len(axes)), generator=generator, device=x.device) * 2 - 1
    position = []
    for i, axis in enumerate(axes):
        size = x.shape[axis]
        low, high = max(1, size // 8), max(2, size // 2)
        offset = low + (fraction[:, i] * (high - low)).long()
        position.append((size // 2 + sign[:, i] * offset).clamp(0, size - 1))
    peak = k.abs().flatten(2).amax(2)
    index = (torch.arange(n, device=x.device), slice(None), *position)
    k[index] = k[index] + p * peak
    return _image(k).abs()


def _monomials(x: torch.Tensor, order: int = 3) -> torch.Tensor:
    """The monomials of total degree <= ``order`` of coordinates in [-1, 1] over the spatial
    grid (``T x *spatial``), in TorchIO's order."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, device=x.device, dtype=x.dtype) for s in x.shape[2:]],
                           indexing="ij")

    def terms(remaining, axes):
        if not axes:
            yield torch.ones_like(grids[0])
            return
        for power in range(remaining + 1):
            for rest in terms(remaining - power, axes[1:]):
                yield axes[0] ** power * rest

    return torch.stack(list(terms(order, list(grids))))


@_operation
def bias_field(x, p, generator):
    """A smooth multiplicative bias field ``exp(sum c_ijk x^i y^j z^k)`` over the monomials of
    degree <= 3 of coordinates in [-1, 1], coefficients uniform in [-p, p] per image
    (TorchIO's RandomBiasField, order 3)."""
    basis = _monomials(x)
    coefficients = (torch.rand(x.shape[0], basis.shape[0], generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * p
    field = torch.exp(torch.tensordot(coefficients, basis, dims=1))
    return x * field.unsqueeze(1)


GHOST_SPACING = 4


@_operation
def ghosting(x, p, generator):
    """Ghosting: every 4th k-space line along H or W (per image) scaled by ``1 - p``, the
    central line restored; real part of the inverse FFT (TorchIO's Ghosting with 4 ghosts
    and restore None)."""
    k = _kspace(x)
    factors = []
    for axis in (x.dim() - 2, x.dim() - 1):
        size = x.shape[axis]
        line = torch.arange(size, device=x.device)
        scaled = (line % GHOST_SPACING == 0) & (line != size // 2)
        factor = torch.where(scaled, 1 - p, 1.0).to(x.dtype)
        factors.append(factor.view(size, *[1] * (x.dim() - 1 - axis)))
    along_h = _per_image(_in_plane_axis(x, generator), x)
    return _image(k * torch.where(along_h, factors[0], factors[1])).real


MOTION_TRANSLATION = 0.1  # fraction of the image size at p = 1
MOTION_DEGREES = 10.0  # in-plane rotation at p = 1 (2D)


@_operation
def motion(x, p, generator):
    """Patient motion during the acquisition: a copy of the image moved by up to ``10 p`` %
    of its size in-plane (and, in 2D, rotated by up to ``10 p`` degrees) supplies a random
    contiguous half of the k-space lines along H or W; magnitude of the inverse FFT (after
    TorchIO's RandomMotion, with one movement)."""
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * MOTION_TRANSLATION * p
    angle = (torch.rand(n, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * math.radians(MOTION_DEGREES) * p
    start = torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)
    along_h = _in_plane_axis(x, generator)

    # affine_grid's normalised coordinates span 2 per axis; its columns are (W, H[, D])
    theta = torch.zeros(n, x.dim() - 2, x.dim() - 1, device=x.device, dtype=x.dtype)
    if x.dim() == 4:
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    else:
        theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1
    theta[:, 0, -1], theta[:, 1, -1] = 2 * shift[:, 0], 2 * shift[:, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    masks = []
    for axis in (x.dim() - 2, x.dim() - 1):
        size = x.shape[axis]
        half = size // 2
        first = (start * (size - half + 1)).floor().clamp(max=size - half).view(n, 1)
        line = torch.arange(size, device=x.device, dtype=x.dtype)
        inside = (line >= first) & (line < first + half)  # N x size
        masks.append(inside.view(n, *[1] * (axis - 1), size, *[1] * (x.dim() - 1 - axis)))
    from_moved = torch.where(_per_image(along_h, x), masks[0], masks[1])
    return _image(torch.where(from_moved, _kspace(moved), _kspace(x))).abs()


# -- CT --------------------------------------------------------------------------------------

CT_NOISE_FLOOR = 0.05  # electronic-noise floor added to the signal in the variance


@_operation
def ct_dose_noise(x, p, generator):
    """Reduced-dose quantum noise, image-domain approximation: ``x + N(0, p^2 (x + 0.05))``,
    variance growing with the attenuation plus an electronic floor. Dose-reduction tools
    insert noise in the sinogram (Yu et al., Med. Phys. 2012; Zeng et al., IEEE TNS 2015);
    that version is not built here."""
    scale = p * torch.sqrt(x.clamp(min=0) + CT_NOISE_FLOOR)
    return x + scale * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


CT_STREAKS = 6


@_operation
def ct_streaks(x, p, generator):
    """Streaks: 6 random lines through the image centre, 1 pixel wide, each adding ``+p`` or
    ``-p`` (per image, and per slice in 3D), a stand-in for metal and photon-starvation
    streaks; built from a rotated coordinate grid."""
    slices = x.shape[2] if x.dim() == 5 else 1
    shape = (x.shape[0], slices, CT_STREAKS, 1, 1)
    angle = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) * math.pi
    sign = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    rows, cols = _centred_grid(x)
    streaks = 0
    for line in range(CT_STREAKS):
        a = angle[:, :, line]  # N x slices x 1 x 1
        on_line = (cols * torch.sin(a) - rows * torch.cos(a)).abs() < 0.5  # N x slices x H x W
        streaks = streaks + sign[:, :, line] * on_line
    if x.dim() == 4:
        streaks = streaks.squeeze(1)
    return x + p * streaks.unsqueeze(1)


@_operation
def slice_thickness(x, p, generator):
    """Thicker slices: Gaussian blur of standard deviation ``p`` slices along D (3D); along
    H for 2D images, standing in for the through-plane axis."""
    return _conv_along(x, _gaussian(p, x), 2)


# -- RGB (dermoscopy, pathology) -------------------------------------------------------------

OD_EPS = 1 / 255


@_operation
def stain_variation(x, p, generator):
    """Stain variation: each RGB channel's optical density ``-log(x + eps)`` scaled by
    ``1 + u_c``, ``u_c`` uniform in [-p, p] per image (per-channel optical-density
    augmentation, after Tellez et al., Med. Image Anal. 2019, without the HED deconvolution)."""
    _need_rgb(x, "stain-variation")
    u = (torch.rand(x.shape[0], 3, 1, 1, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * p
    density = -torch.log(x.clamp(min=0) + OD_EPS)
    return torch.exp(-density * (1 + u)) - OD_EPS


@_operation
def black_corners(x, p, generator):
    """Dermoscope vignetting: pixels further from the centre than ``(1 - p)`` of the half
    diagonal turn black (MedMNIST-C's black_corner)."""
    _need_rgb(x, "black-corners")
    rows, cols = _centred_grid(x)
    half_diagonal = 0.5 * math.hypot(*x.shape[-2:])
    return x * (torch.sqrt(rows**2 + cols**2) <= (1 - p) * half_diagonal)


BUBBLES = 10
BUBBLE_ALPHA = 0.5


@_operation
def bubbles(x, p, generator):
    """Air bubbles under the dermoscope's glass: ``ceil(10 p)`` bright translucent discs
    (alpha 0.5, radius 5-15 % of the size) at random positions (after MedMNIST-C's
    gel_bubble). The ten discs are drawn whatever ``p``; ``p`` picks how many show."""
    _need_rgb(x, "bubbles")
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    draws = torch.rand(n, BUBBLES, 3, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    centre_row, centre_col = draws[:, :, 0] * h, draws[:, :, 1] * w
    radius = (0.05 + 0.10 * draws[:, :, 2]) * min(h, w)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(h, 1) + 0.5
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, w) + 0.5
    inside = (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2  # N x BUBBLES x H x W
    shown = torch.arange(BUBBLES, device=x.device).view(1, BUBBLES, 1, 1) < min(BUBBLES, math.ceil(BUBBLES * p))
    mask = (inside & shown).any(1, keepdim=True).to(x.dtype)
    return x + BUBBLE_ALPHA * mask * (1 - x)


@_operation
def characters(x, p, generator):
    """A ruler mark: a dark 1-pixel horizontal bar covering ``p`` of the image width, with
    ticks every 1/16 of the width (every fifth one longer), at a random row and position; a
    simple stand-in for MedMNIST-C's text and ruler marks."""
    _need_rgb(x, "characters")
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    draws = torch.rand(n, 2, generator=generator, device=x.device, dtype=x.dtype)
    p = min(p, 1.0)
    row = (h * (0.15 + 0.75 * draws[:, 0])).floor().view(n, 1, 1)
    first = (w * (1 - p) * draws[:, 1]).floor().view(n, 1, 1)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    spacing = max(2, w // 16)
    within = (cols >= first) & (cols < first + p * w)
    tick = torch.remainder(cols - first, spacing) == 0
    length = torch.where(torch.remainder(cols - first, 5 * spacing) == 0, max(2, h // 10), max(1, h // 20))
    mark = within & ((rows == row) | (tick & (rows < row) & (rows >= row - length)))
    return x * ~mark.unsqueeze(1)


# -- the registry ----------------------------------------------------------------------------

_FRACTION = "(fraction of the [0, 1] intensity range)"

OPS: dict[str, Op] = {
    # general
    "gaussian-noise": Op(gaussian_noise, True, 0.15, "general",
                         f"noise standard deviation {_FRACTION}", "ImageNet-C gaussian_noise (Hendrycks & Dietterich 2019)"),
    "shot-noise": Op(shot_noise, True, 0.4, "general",
                     "relative Poisson noise standard deviation at full intensity (1/p^2 counts)",
                     "ImageNet-C shot_noise (Hendrycks & Dietterich 2019), rate 1/p^2"),
    "defocus-blur": Op(defocus_blur, False, 3.0, "general",
                       "Gaussian blur standard deviation (pixels, every spatial axis)", "TorchIO RandomBlur (Gaussian)"),
    "motion-blur": Op(motion_blur, True, 10.0, "general",
                      "motion during the exposure (pixels, along H or W)",
                      "ImageNet-C motion_blur (Hendrycks & Dietterich 2019), box kernel along a grid axis"),
    "contrast": Op(contrast, False, 0.7, "general",
                   "contrast reduction towards the image mean (fraction; 1 is a flat image)",
                   "ImageNet-C contrast (Hendrycks & Dietterich 2019)"),
    "gamma": Op(gamma, False, 1.0, "general", "gamma exponent minus one (x ** (1 + p))",
                "TorchIO RandomGamma (x ** gamma)"),
    "brightness": Op(brightness, False, 0.4, "general", f"intensity offset {_FRACTION}",
                     "ImageNet-C brightness (Hendrycks & Dietterich 2019), in intensity"),
    "pixelate": Op(pixelate, False, 3.0, "general", "pixelation factor minus one (area average by 1 + p, nearest back)",
                   "ImageNet-C pixelate (Hendrycks & Dietterich 2019)"),
    "downsample": Op(downsample, False, 4.0, "general",
                     "downsampling factor minus one (area average by 1 + p, linear interpolation back)",
                     "TorchIO RandomAnisotropy, on every spatial axis"),
    "jpeg": Op(jpeg, False, JPEG_P_MAX, "general",
               "JPEG quality loss (quality round(100 - 95 p), clipped to [5, 100]; 2D, 1 or 3 channels)",
               "ImageNet-C jpeg_compression (Hendrycks & Dietterich 2019); torchvision's libjpeg codec, run on the CPU",
               dims=TWO_D),
    # MRI
    "rician-noise": Op(rician_noise, True, 0.1, "mri", f"noise standard deviation per channel {_FRACTION}",
                       "MONAI RandRicianNoise (Gudbjartsson & Patz, Magn. Reson. Med. 1995)"),
    "gibbs-ringing": Op(gibbs_ringing, False, 0.85, "mri",
                        "fraction of k-space truncated along every spatial axis",
                        "TorchIO RandomGibbsNoise / MONAI GibbsNoise"),
    "kspace-spike": Op(kspace_spike, True, 1.0, "mri", "spike magnitude relative to the k-space peak",
                       "TorchIO RandomSpike / MONAI KSpaceSpikeNoise (one spike)"),
    "bias-field": Op(bias_field, True, 1.0, "mri",
                     "bound of the log-field's polynomial coefficients (order 3, coordinates in [-1, 1])",
                     "TorchIO RandomBiasField (Sudre et al. 2017)"),
    "ghosting": Op(ghosting, True, 1.0, "mri",
                   "attenuation of every 4th k-space line along H or W (fraction removed)",
                   "TorchIO RandomGhosting (4 ghosts, central line restored)"),
    "motion": Op(motion, True, 1.0, "mri",
                 "movement halfway through the acquisition (p = 1: up to 10 % of the size and 10 degrees)",
                 "TorchIO RandomMotion (Shaw et al. 2019), one movement"),
    # CT
    "ct-dose-noise": Op(ct_dose_noise, True, 0.25, "ct",
                        "quantum noise standard deviation at full intensity, ~ p sqrt(x + 0.05)",
                        "image-domain approximation of reduced-dose noise; the sinogram insertion of Yu et al. "
                        "(Med. Phys. 2012) and Zeng et al. (IEEE TNS 2015) is not built"),
    "ct-streaks": Op(ct_streaks, True, 1.0, "ct", f"streak intensity {_FRACTION}, 6 lines through the centre",
                     "this package's own: thin lines through the centre standing in for metal/starvation streaks"),
    "slice-thickness": Op(slice_thickness, False, 4.0, "ct",
                          "through-plane Gaussian blur standard deviation (slices along D; 2D: rows along H)",
                          "this package's own: Gaussian slice-sensitivity profile"),
    "hu-window-shift": Op(brightness, False, 0.4, "ct",  # the same offset, read as a display-window level
                          "window level lowered by p of the window width, x + p clipped (400 HU window: p = 0.1 "
                          "is 40 HU)", "this package's own: display-window level shift"),
    # RGB
    "stain-variation": Op(stain_variation, True, 0.5, "rgb", "bound of the per-channel optical-density scaling",
                          "per-channel optical-density augmentation after Tellez et al. (Med. Image Anal. 2019); "
                          "MedMNIST-C (Di Salvo et al. 2024)", dims=TWO_D),
    "black-corners": Op(black_corners, False, 0.45, "rgb", "vignette: 1 - kept radius / half diagonal",
                        "MedMNIST-C black_corner (Di Salvo et al. 2024)", dims=TWO_D),
    "bubbles": Op(bubbles, True, 1.0, "rgb", "number of bubbles / 10 (translucent discs, alpha 0.5)",
                  "MedMNIST-C gel_bubble (Di Salvo et al. 2024), simplified to discs", dims=TWO_D),
    "characters": Op(characters, True, 1.0, "rgb", "fraction of the image width covered by a ruler mark",
                     "this package's stand-in for MedMNIST-C's text/ruler marks (Di Salvo et al. 2024)", dims=TWO_D),
}
