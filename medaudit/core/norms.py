"""The norms of a threat model as objects: a perturbation's size, the projection onto the
eps-ball, the steepest-ascent step and a random start, one class per norm.

Attacks, defenses and the engine all measure and bound perturbations here, so a norm the
spec accepts behaves the same everywhere (and a norm that cannot do something says so
instead of silently acting like another). Images are N x C x ... in [0, 1]; every
projection and random start keeps its result there. Clipping to [0, 1] moves each
coordinate towards ``x``, so it never makes a perturbation larger in any of these norms.

``eps`` is in pixel units of [0, 1] images: L-inf the largest change of one value, L2 and
L1 the norm of the whole perturbation, L0 the fraction of pixel positions that may change
(a position is one pixel or voxel with all its channels, as the spec's L0 budget reads).
"""

from __future__ import annotations

import abc

import math

from medaudit.core.components import Norm
from medaudit.core.lazy import torch


def per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t`` (never 0, so it can divide)."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector shaped to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _positions(t: torch.Tensor) -> torch.Tensor:
    """``t`` as N x C x P: dim 1 holds the channels, the rest are the pixel positions (an
    N x P tensor has one channel)."""
    return t.flatten(2) if t.dim() > 2 else t[:, None]


class NormBall(abc.ABC):
    """A norm's geometry. Subclasses define :meth:`size`, :meth:`shrink` (the projection of a
    perturbation onto the eps-ball), :meth:`direction` (the steepest-ascent direction of unit
    size) and :meth:`noise` (a random perturbation inside the ball)."""

    norm: Norm

    @abc.abstractmethod
    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """The norm of each sample of ``delta`` (a 1-D tensor)."""

    @abc.abstractmethod
    def shrink(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        """``delta`` projected onto the eps-ball."""

    @abc.abstractmethod
    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size."""

    @abc.abstractmethod
    def noise(self, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """A random perturbation inside the eps-ball."""

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Project onto the eps-ball around ``x`` intersected with the valid range [0, 1]."""
        return (x + self.shrink(x_adv - x, eps)).clamp(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, size: float) -> torch.Tensor:
        """One steepest-ascent step of ``size`` (in this norm) along ``grad``."""
        return x_adv + size * self.direction(grad)

    def random_start(self, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """A random point of the eps-ball around ``x``, clipped to [0, 1]."""
        return (x + self.noise(x, eps, generator)).clamp(0.0, 1.0)


class LInf(NormBall):
    """L-inf: the largest change of any value."""

    norm = Norm.LINF

    def size(self, delta):
        return delta.flatten(1).abs().amax(1)

    def shrink(self, delta, eps):
        return delta.clamp(-eps, eps)

    def direction(self, grad):
        return grad.sign()

    def noise(self, x, eps, generator):
        """Uniform per coordinate."""
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps


class L2(NormBall):
    """L2: the Euclidean norm of the whole perturbation."""

    norm = Norm.L2

    def size(self, delta):
        return delta.flatten(1).norm(dim=1)

    def shrink(self, delta, eps):
        return delta * (eps / per_sample_l2(delta)).clamp(max=1.0)

    def step(self, x_adv, grad, size):
        # Written out (not size * direction) so the numbers stay those of earlier releases.
        return x_adv + size * grad / per_sample_l2(grad)

    def direction(self, grad):
        return grad / per_sample_l2(grad)

    def noise(self, x, eps, generator):
        """A random direction and a radius uniform in [0, eps]."""
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        return direction / per_sample_l2(direction) * radius * eps


class L1(NormBall):
    """L1: the sum of the absolute changes."""

    norm = Norm.L1

    def size(self, delta):
        return delta.flatten(1).abs().sum(1)

    def shrink(self, delta, eps):
        """The exact Euclidean projection onto the L1 ball, sort-based (Duchi, Shalev-Shwartz,
        Singer & Chandra, "Efficient projections onto the l1-ball for learning in high
        dimensions", ICML 2008), batched; samples already inside are returned unchanged."""
        if eps <= 0:
            return torch.zeros_like(delta)
        flat = delta.flatten(1)
        v = flat.abs()
        mu = v.sort(dim=1, descending=True).values
        cumulative = mu.cumsum(1)
        j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
        # rho: the last (1-based) j with mu_j > (sum_{i<=j} mu_i - eps) / j; j = 1 always qualifies.
        rho = (mu * j > cumulative - eps).to(v.dtype).mul(j).argmax(1, keepdim=True)
        theta = (cumulative.gather(1, rho) - eps) / (rho + 1).to(v.dtype)
        projected = flat.sign() * (v - theta).clamp_min(0)
        inside = v.sum(1, keepdim=True) <= eps
        return torch.where(inside, flat, projected).view_as(delta)

    def direction(self, grad):
        """Steepest ascent under L1: the single coordinate of largest ``|grad|`` per sample
        (the first on ties), moved by the gradient's sign. A zero gradient gives no move."""
        flat = grad.flatten(1)
        top = flat.abs().argmax(1, keepdim=True)
        out = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top).sign())
        return out.view_as(grad)

    def noise(self, x, eps, generator):
        """A direction uniform on the L1 sphere (exponential magnitudes, normalised, random
        signs) and a radius uniform in [0, eps]."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        magnitude = -torch.log1p(-u)  # exponential(1)
        signs = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).lt(0.5).to(x.dtype) * 2 - 1
        radius = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
        total = _per_sample(magnitude.flatten(1).sum(1).clamp_min(1e-12), x)
        return signs * magnitude / total * radius * eps


class L0(NormBall):
    """L0: the fraction of pixel positions that change (a position changes when any of its
    channels does). It has no gradient step: an L0 attack searches (e.g. ``onepixel``)."""

    norm = Norm.L0

    @staticmethod
    def budget(eps: float, positions: int) -> int:
        """How many of ``positions`` may change under the fraction ``eps`` (rounded down,
        forgiving the rounding error of a fraction such as 3/4096)."""
        return max(0, min(positions, math.floor(eps * positions * (1 + 1e-9))))

    def size(self, delta):
        return _positions(delta).ne(0).any(1).float().mean(1)

    def project(self, x_adv, x, eps):
        """Clip to [0, 1] first, so the positions kept are those that still change; a kept
        position takes its value from ``x_adv`` exactly, the others from ``x``."""
        x_adv = x_adv.clamp(0.0, 1.0)
        keep = self._keep(_positions(x_adv - x), eps)
        return torch.where(keep[:, None], _positions(x_adv), _positions(x)).view_as(x)

    def shrink(self, delta, eps):
        """Keep the ``budget(eps)`` positions with the largest change (largest absolute change
        over their channels; ties broken by ``topk``) and reset the others."""
        d = _positions(delta)
        return torch.where(self._keep(d, eps)[:, None], d, torch.zeros_like(d)).view_as(delta)

    def _keep(self, d: torch.Tensor, eps: float) -> torch.Tensor:
        """N x P: the positions of ``d`` (N x C x P) that :meth:`shrink` keeps."""
        k = self.budget(eps, d.shape[2])
        keep = torch.zeros(d.shape[0], d.shape[2], dtype=torch.bool, device=d.device)
        if k >= d.shape[2]:
            return keep.fill_(True)
        if k > 0:
            keep.scatter_(1, d.abs().amax(1).topk(k, dim=1).indices, True)
        return keep

    def direction(self, grad):
        raise ValueError("the l0 norm has no steepest-ascent step; an l0 attack searches the pixels to change")

    def noise(self, x, eps, generator):
        return self.random_start(x, eps, generator) - x

    def random_start(self, x, eps, generator):
        """``budget(eps)`` positions drawn at random per sample, each set to a uniform value
        in [0, 1] in every channel."""
        xp = _positions(x)
        n, c, p = xp.shape
        keys = torch.rand((n, p), generator=generator, device=x.device)
        values = torch.rand((n, c, p), generator=generator, device=x.device, dtype=x.dtype)
        chosen = torch.zeros(n, p, dtype=torch.bool, device=x.device)
        k = self.budget(eps, p)
        if k > 0:
            chosen.scatter_(1, keys.topk(k, dim=1).indices, True)
        return torch.where(chosen[:, None], values, xp).view_as(x)


_NORMS: dict[Norm, NormBall] = {n.norm: n for n in (LInf(), L2(), L1(), L0())}


def norm_of(norm: Norm | str) -> NormBall:
    """The geometry of ``norm``."""
    return _NORMS[Norm(norm)]


def recorded_norms(threat: Norm | str) -> list[Norm]:
    """The norms a record measures a perturbation in: L-inf and L2 (always) and the threat
    model's norm, each stored under its name (``linf``, ``l2``, ``l1``, ``l0``), so the
    budget check reads ``record[threat.value]`` whatever the norm."""
    return list(dict.fromkeys([Norm.LINF, Norm.L2, Norm(threat)]))


def perturbation_sizes(delta: torch.Tensor, threat: Norm | str) -> dict[str, torch.Tensor]:
    """The sizes of each sample of ``delta`` in :func:`recorded_norms`, by norm name."""
    return {n.value: norm_of(n).size(delta) for n in recorded_norms(threat)}
