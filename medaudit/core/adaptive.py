"""Defenses as a wrapped model, and the views an adaptive attacker takes of them.

A defense that transforms the input is ``TransformDefended(model, transform)``: the audited
system. Attacking it naively differentiates through ``transform`` as written, which for
quantisation, JPEG or a median filter gives zero, useless or no gradients: the attack
fails and the defense looks strong (obfuscated gradients, Athalye et al. 2018). The
adaptive view keeps the forward pass exact and replaces the backward pass:

BPDA (Backward Pass Differentiable Approximation): the forward pass is ``transform(x)``,
the backward pass is that of a differentiable ``surrogate`` (the identity by default).
EOT for randomised transforms is not built: no built-in defense is randomised.

Carlini et al. (2019), item 13; methods.md section 12 (check C10).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


class _BPDA(torch.autograd.Function):
    """Forward: the exact value; backward: the gradient reaches the surrogate unchanged."""

    @staticmethod
    def forward(ctx, approx, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bpda(x: torch.Tensor, transform: Transform, surrogate: Transform | None = None) -> torch.Tensor:
    """``transform(x)`` exactly, with the gradient of ``surrogate`` (the identity if None)."""
    with torch.no_grad():
        exact = transform(x)
    approx = x if surrogate is None else surrogate(x)
    return _BPDA.apply(approx, exact) if approx.requires_grad else exact


class TransformDefended(nn.Module):
    """``model(transform(x))``: the defended system, attacked as it is written."""

    def __init__(self, model: nn.Module, transform: Transform):
        super().__init__()
        self.model, self.transform = model, transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.transform(x)
        if x.requires_grad and not out.requires_grad:
            out = out + 0 * x  # the transform cuts the graph: a naive attacker gets a zero gradient
        return self.model(out)


class AdaptiveView(nn.Module):
    """The defended system as an adaptive attacker differentiates it: the exact forward
    pass, with BPDA through ``transform``."""

    def __init__(self, model: nn.Module, transform: Transform, surrogate: Transform | None = None):
        super().__init__()
        self.model, self.transform, self.surrogate = model, transform, surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(bpda(x, self.transform, self.surrogate))
