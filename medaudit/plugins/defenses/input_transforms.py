"""Input transforms: jpeg, bit-depth, median, gaussian, lgs.

Each puts a transform of the pixel-space image in front of the model. None is trained.
The naive attack differentiates through the transform as written; the adaptive attack
(planned automatically, labelled ``<attack>@adaptive``) uses BPDA
(:mod:`medaudit.core.adaptive`) where the transform's gradient is useless:

==============  ===========================  ================================================
defense         gradient as written          adaptive attack
==============  ===========================  ================================================
``jpeg``        none (encoded to bytes)      BPDA, identity backward
``bit-depth``   zero almost everywhere       BPDA, identity backward
``median``      sparse (one pixel a window)  BPDA, backward of a mean filter of the same size
``gaussian``    exact                        none needed: the naive attack is adaptive
``lgs``         through the mask's edges     BPDA, ``1 - mask`` held constant (methods.md 11.1)
==============  ===========================  ================================================

All work on 2D images (``N x C x H x W``); ``bit-depth`` and ``gaussian`` also on volumes.

The adaptive twin is not always the stronger attack: on the demo classifier at 4/255, PGD
through the median filter's exact (sparse) gradient left 17% robust accuracy, PGD with the
mean-filter BPDA 44% and with the identity BPDA 48%. The worst case keeps, per case, the
stronger of the two, which is why both run. ``jpeg`` encodes with ``torchvision.io``
(deprecated in torchvision 0.29 in favour of TorchCodec, still working in the pinned
0.29), on the CPU, one image at a time.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.lazy import F, torch
from medaudit.core.models import prepare_for_audit

if TYPE_CHECKING:
    from medaudit.core.adaptive import Transform

BOTH_TASKS = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})


class _TransformDefense(Defense):
    """A transform in front of the model, with BPDA for the adaptive attack."""

    tasks = BOTH_TASKS

    @abc.abstractmethod
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The defense's transform of pixel-space images, as the defended system applies it."""

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable stand-in whose gradient the adaptive attack uses (identity)."""
        return x

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        from medaudit.core.adaptive import AdaptiveView, TransformDefended

        transform: Transform = self.transform
        adaptive = prepare_for_audit(AdaptiveView(model.module, transform, self.surrogate)) if self.adaptive else None
        params = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return dataclasses.replace(
            model,
            module=prepare_for_audit(TransformDefended(model.module, transform)),
            adaptive_module=adaptive,
            description=f"{model.description}, behind {self.name} ({params})",
        )


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1)


class JpegParams(Params):
    quality: int = Field(75, ge=1, le=100, description="JPEG quality (libjpeg scale, 1-100).")


class Jpeg(_TransformDefense):
    """JPEG compression of the input (Dziugaite et al. 2016; Das et al. 2017): encode and
    decode at ``quality``; 1 or 3 channels. Non-differentiable: attacked with BPDA."""

    name = "jpeg"
    Params = JpegParams
    adaptive = "BPDA: the exact JPEG round trip forward, the identity backward (Athalye et al. 2018)."

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg

        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"jpeg needs N x 1 x H x W or N x 3 x H x W images, got {tuple(x.shape)}")
        pixels = (_to_unit(x.detach()) * 255).round().to(torch.uint8).cpu()
        decoded = decode_jpeg(encode_jpeg(list(pixels), quality=self.params.quality))
        return (torch.stack(decoded).to(x.device, x.dtype) / 255).reshape(x.shape)


class BitDepthParams(Params):
    bits: int = Field(4, ge=1, le=8, description="Bits kept per pixel: 2**bits grey levels.")


class BitDepth(_TransformDefense):
    """Bit-depth reduction, the feature squeezing of Xu et al. (2018): round each pixel to
    one of ``2**bits`` levels. Its gradient is zero almost everywhere: attacked with BPDA."""

    name = "bit-depth"
    Params = BitDepthParams
    dims = frozenset({2, 3})
    adaptive = "BPDA: the exact quantisation forward, the identity backward."

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.params.bits - 1
        return torch.round(_to_unit(x) * levels) / levels


class MedianParams(Params):
    kernel: int = Field(3, ge=3, le=15, description="Window size in pixels (odd).")


class Median(_TransformDefense):
    """Median filter over ``kernel x kernel`` windows (reflect padding), per channel. The
    gradient reaches one pixel per window: attacked with BPDA through a mean filter."""

    name = "median"
    Params = MedianParams
    adaptive = "BPDA: the exact median filter forward, the backward pass of a mean filter of the same size."

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        k = self.params.kernel | 1
        n, c, h, w = x.shape
        padded = F.pad(x, [k // 2] * 4, mode="reflect")
        return F.unfold(padded.reshape(n * c, 1, *padded.shape[-2:]), k).reshape(n, c, k * k, h, w)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x).median(dim=2).values

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x).mean(dim=2)


class GaussianParams(Params):
    sigma: float = Field(1.0, gt=0, le=10, description="Standard deviation of the Gaussian, in pixels.")


class Gaussian(_TransformDefense):
    """Gaussian smoothing (kernel of 2 * ceil(3 sigma) + 1 pixels, reflect padding). It is
    differentiable, so the attacks see its exact gradient and no adaptive twin is needed."""

    name = "gaussian"
    Params = GaussianParams
    dims = frozenset({2, 3})

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self.params.sigma
        radius = math.ceil(3 * sigma)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        out = x
        spatial = x.dim() - 2
        for axis in range(spatial):  # separable: one 1D convolution per spatial axis
            shape = [1] * spatial
            shape[axis] = kernel.numel()
            weight = kernel.reshape(1, 1, *shape).expand(x.shape[1], 1, *shape)
            pad = [0, 0] * spatial
            pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = radius
            conv = F.conv2d if spatial == 2 else F.conv3d
            out = conv(F.pad(out, pad, mode="reflect" if spatial == 2 else "replicate"), weight, groups=x.shape[1])
        return out


class LgsParams(Params):
    window: int = Field(15, ge=3, le=64, description="Window size in pixels.")
    overlap: int = Field(5, ge=0, le=32, description="Overlap of neighbouring windows in pixels (stride = window - overlap).")
    threshold: float = Field(0.1, ge=0, le=1, description="A window is kept when the mean of its normalised gradient exceeds this.")
    smoothing: float = Field(2.3, gt=0, le=20, description="lambda: the mask is clip(lambda * kept gradient, 0, 1).")


class LocalGradientsSmoothing(_TransformDefense):
    """Local gradients smoothing (Naseer et al. 2019; methods.md 11.1), meant for patch
    attacks: suppress pixels in windows of high normalised first-order gradient,
    ``x * (1 - clip(lambda * g_kept, 0, 1))``. Windows of ``window`` pixels overlap by
    ``overlap``; a window is kept when its mean gradient exceeds ``threshold`` (the port's
    mean, not the paper's normalised L1 norm). The grey image is the channel mean."""

    name = "lgs"
    Params = LgsParams
    adaptive = "BPDA as methods.md 11.1 prescribes: the exact output forward, 1 - mask held constant backward."

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        grey = x.mean(1, keepdim=True)
        dx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1))
        dy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
        g = torch.sqrt(dx**2 + dy**2 + 1e-12)
        low = g.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = g.flatten(1).amax(1).view(-1, 1, 1, 1)
        g = (g - low) / (high - low).clamp_min(1e-12)
        stride = max(1, p.window - p.overlap)
        h, w = g.shape[-2:]
        pad_h = (-(h - p.window) % stride) if h > p.window else p.window - h
        pad_w = (-(w - p.window) % stride) if w > p.window else p.window - w
        padded = F.pad(g, (0, pad_w, 0, pad_h))
        means = F.avg_pool2d(padded, p.window, stride)
        keep = (means > p.threshold).to(g.dtype)
        # a pixel is kept if any kept window covers it: spread each window's flag over it
        covered = F.conv_transpose2d(keep, torch.ones(1, 1, p.window, p.window, dtype=g.dtype, device=g.device), stride=stride)
        covered = covered[..., :h, :w] > 0
        return (p.smoothing * g * covered).clamp(0, 1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.mask(x))

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.mask(x).detach())


@hookimpl
def register_defenses(register):
    for cls in (Jpeg, BitDepth, Median, Gaussian, LocalGradientsSmoothing):
        register(cls)
