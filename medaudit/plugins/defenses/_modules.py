"""The torch modules of the built-in defenses. Apart from the defense modules because a
class needs torch when it is defined, and registering the defenses (reading a spec) must not
import it; each defense module still hands its classes out under their old names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from medaudit.plugins.defenses.input_transforms import Gaussian, GaussianParams
from medaudit.plugins.defenses.randomized import random_resize_pad

if TYPE_CHECKING:
    from medaudit.plugins.defenses.detectors import MedicalAegisParams
    from medaudit.plugins.defenses.randomized import RandomResizePadParams


class _MeanLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)


class Cushion(nn.Module):
    """Medical Aegis's first tier: a differentiable low-pass filter of the input (methods.md
    1.2, options (a)-(c); the paper's filter is a gap)."""

    def __init__(self, p: MedicalAegisParams):
        super().__init__()
        self.p = p
        self.gaussian = Gaussian(GaussianParams(sigma=p.sigma))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.cushion == "gaussian":
            return self.gaussian.transform(x)
        if p.cushion == "resample":
            size = x.shape[2:]
            small = nn.functional.interpolate(x, scale_factor=1 / p.factor, mode="bilinear", align_corners=False)
            return nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)
        spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        h, w = x.shape[-2:]
        kh, kw = max(1, round(h * p.keep / 2)), max(1, round(w * p.keep / 2))
        mask = torch.zeros(h, w, device=x.device, dtype=x.dtype)
        mask[h // 2 - kh : h // 2 + kh + 1, w // 2 - kw : w // 2 + kw + 1] = 1
        kept = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
        return torch.fft.ifft2(kept).real.clamp(0.0, 1.0)


class EnsembleModule(nn.Module):
    """``log(mean_m softmax(f_m(x)))``: the average of the members' probabilities, as logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([m(x).float().log_softmax(1) for m in self.members])
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(self.members))))


class RandomResizePadded(nn.Module):
    """The deployed system: one fresh draw of the transform per forward pass."""

    def __init__(self, model: nn.Module, params: RandomResizePadParams):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        return self.model(random_resize_pad(x, p.ratio, p.mode, p.restore_size))


class EOTView(nn.Module):
    """The EOT view of a randomized system: logits averaged over ``samples`` draws, computed
    as one forward pass of the model on the batch repeated ``samples`` times."""

    def __init__(self, system: nn.Module, samples: int):
        super().__init__()
        self.system, self.samples = system, samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.samples, x.shape[0]
        logits = self.system(x.repeat(k, *([1] * (x.dim() - 1))))
        return logits.view(k, n, *logits.shape[1:]).mean(0)
