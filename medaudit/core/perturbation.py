"""Perturbation geometry shared by attacks: steps, projections and random starts under a norm.

Images are in [0, 1]; every function keeps its result there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medaudit.core.components import Norm


def per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step: float, norm: Norm) -> torch.Tensor:
    """One steepest-ascent step of size ``step`` under ``norm``."""
    if norm is Norm.LINF:
        return x_adv + step * grad.sign()
    return x_adv + step * grad / per_sample_l2(grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` intersected with the valid range [0, 1]."""
    delta = x_adv - x
    if norm is Norm.LINF:
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / per_sample_l2(delta)).clamp(max=1.0)
    # Clipping to [0, 1] moves each coordinate towards x, so it never leaves the ball.
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """A random point of the eps-ball (uniform per coordinate for L-inf; random direction
    and radius for L2), clipped to [0, 1]."""
    if norm is Norm.LINF:
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        noise = direction / per_sample_l2(direction) * radius * eps
    return (x + noise).clamp(0.0, 1.0)


def input_gradient(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient of the summed cross-entropy w.r.t. the input."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return logits.detach(), grad


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i``: positive while the sample is classified correctly."""
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return logits.gather(1, y[:, None]).squeeze(1) - others
