"""Randomized defenses: random-resize-pad (Xie et al. 2018), attacked naively and through EOT.

``random-resize-pad`` is the input randomization of Xie et al., "Mitigating adversarial
effects through randomization", ICLR 2018 (https://arxiv.org/abs/1711.01991): each image is
resized to a random size between its own and ``1 + ratio`` times it (nearest neighbour, as
in the paper), then zero-padded at a random offset to that largest size, and the model
classifies the result. Every forward pass draws new sizes and offsets from torch's global
random generator, which the engine seeds per batch: the deployed system is random, and
reproducible under the same seed.

A naive attack differentiates one draw of the transform, whose gradient says little about
the next draw: the defense looks robust. Athalye et al., "Obfuscated Gradients Give a False
Sense of Security", ICML 2018, broke it with Expectation over Transformation (EOT): the
view ``eot`` averages the model's logits over ``eot_samples`` draws in one forward pass, so
its gradient is the average over draws (the usual implementation of EOT; averaging logits
rather than losses keeps the view a plain model for every attack).

The model must accept the padded size (a CNN with global pooling, as the paper's
Inception); ``restore_size`` resizes the padded image back for models of fixed input size
(not in the paper). Classification only: a resized, padded input has no pixel-aligned
label map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.lazy import F, torch
from medaudit.core.models import prepare_for_audit


class RandomResizePadParams(Params):
    ratio: float = Field(
        0.1, gt=0, le=1,
        description="Largest enlargement: sizes are drawn from [H, H * (1 + ratio)] (Xie et al.: 299 -> 331, about 0.1).",
    )
    mode: Literal["nearest", "bilinear"] = Field("nearest", description="Interpolation of the resize (the paper: nearest).")
    eot_samples: int = Field(10, ge=1, le=1000, description="Draws of the transform the EOT view averages the logits over.")
    restore_size: bool = Field(
        False, description="Resize the padded image back to H x W (bilinear) for models of fixed input size; not in the paper."
    )


def random_resize_pad(x: torch.Tensor, ratio: float, mode: str = "nearest", restore_size: bool = False) -> torch.Tensor:
    """One draw of the transform per image of ``x`` (``N x C x H x W``), from torch's global
    generator (on the CPU, so a seed gives the same draws on every device). Differentiable."""
    n, _, h, w = x.shape
    big_h, big_w = math.floor(h * (1 + ratio)), math.floor(w * (1 + ratio))
    sizes = torch.randint(h, big_h + 1, (n,)).tolist()
    # Offsets as fractions of the free space, drawn for the whole batch at once.
    tops, lefts = torch.rand(n).tolist(), torch.rand(n).tolist()
    out = []
    for i, size in enumerate(sizes):
        size_w = min(big_w, max(w, round(w * size / h)))
        resized = F.interpolate(x[i : i + 1], size=(size, size_w), mode=mode,
                                **({} if mode == "nearest" else {"align_corners": False}))
        top = min(big_h - size, math.floor(tops[i] * (big_h - size + 1)))
        left = min(big_w - size_w, math.floor(lefts[i] * (big_w - size_w + 1)))
        out.append(F.pad(resized, (left, big_w - size_w - left, top, big_h - size - top)))
    padded = torch.cat(out)
    if restore_size:
        padded = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)
    return padded


class RandomResizePad(Defense):
    """Random resizing and padding of the input (Xie et al. 2018): a random size in
    [H, H (1 + ratio)], zero padding at a random offset; new randomness every forward pass.
    Attacked naively and with EOT over ``eot_samples`` draws (Athalye et al. 2018)."""

    name = "random-resize-pad"
    Params = RandomResizePadParams
    tasks = frozenset({Task.CLASSIFICATION})
    views = {"eot": "EOT (Athalye et al. 2018): logits averaged over eot_samples draws of the random transform, "
                    "so the gradient is the average over draws"}
    averaging_views = frozenset({"eot"})

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        p: RandomResizePadParams = self.params
        from medaudit.plugins.defenses._modules import EOTView, RandomResizePadded

        system = prepare_for_audit(RandomResizePadded(model.module, p))
        eot = prepare_for_audit(EOTView(system, p.eot_samples))
        params = ", ".join(f"{k}={v}" for k, v in p.model_dump().items())
        return dataclasses.replace(
            model,
            module=system,
            adaptive_module=None,
            views={"eot": eot},
            description=f"{model.description}, behind {self.name} ({params}; randomized)",
        )


@hookimpl
def register_defenses(register):
    register(RandomResizePad)


def __getattr__(name: str):
    """Modules moved to :mod:`._modules` (defining them needs torch), still importable from here."""
    if name in {"RandomResizePadded", "EOTView"}:
        from medaudit.plugins.defenses import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
