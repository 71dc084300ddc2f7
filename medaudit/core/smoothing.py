"""Randomized smoothing: certified L2 robustness of a classifier under Gaussian noise.

Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019 (https://arxiv.org/abs/1902.02918). The *smoothed* classifier of a base
classifier ``f`` predicts the class ``f`` returns most often on ``x + delta`` with
``delta ~ N(0, sigma^2 I)``. If that class has probability ``pA`` then no L2 perturbation
smaller than ``sigma * Phi^-1(pA)`` changes the smoothed prediction (their Theorem 1,
with ``pB = 1 - pA``). :func:`certify` is the paper's CERTIFY: it estimates a lower bound
on ``pA`` by Monte Carlo and returns a radius that holds with probability at least
``1 - alpha`` over the draws; :func:`predict` is their PREDICT.

Units: inputs are images in [0, 1] and the noise is added in that unit, *not clamped* to
[0, 1]: the theorem is for the Gaussian itself, and clamping would smooth with another
distribution. Radii are therefore L2 distances in the [0, 1] pixel unit, comparable with
the audit's L2 epsilons. Normalisation stays inside the model, after the noise.

:class:`SmoothedLogits` is the *soft* smoothed classifier an attacker differentiates
(Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", NeurIPS 2019): the log of the base model's softmax averaged over noise draws.

Everything runs batched on the model's device; the noise of :func:`sample_counts` comes
from the ``generator`` passed in (drawn on its device and moved when it differs from the
input's), so the same generator state and ``batch`` give the same counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

#: The prediction of an input the smoothed classifier abstains on.
ABSTAIN = -1


def _gaussian(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn with ``generator`` (on its own device) and moved to ``device``."""
    source = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=source, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype, non_blocking=True)


def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, n: int, batch: int = 1000,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """How often the base ``model``'s argmax is each class under ``n`` Gaussian draws
    ``x + sigma * N(0, I)`` per input (unclamped, in the [0, 1] unit), as an ``N x C``
    int64 tensor on ``x``'s device whose rows sum to ``n``.

    The ``N * n`` noisy copies go through the model ``batch`` at a time, across inputs, so
    small ``n`` on many inputs fills each forward pass as well as large ``n`` on one."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be positive, got n={n}, batch={batch}")
    if x.shape[0] == 0:
        raise ValueError("sample_counts needs at least one input")
    count, shape = x.shape[0], x.shape[1:]
    counts: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, count * n, batch):
            stop = min(start + batch, count * n)
            owner = torch.arange(start, stop, device=x.device) // n  # which input each noisy copy belongs to
            noisy = x[owner] + sigma * _gaussian((stop - start, *shape), generator, x.device, x.dtype)
            logits = model(noisy)
            votes = logits.argmax(1)
            if counts is None:
                counts = torch.zeros(count, logits.shape[1], dtype=torch.long, device=x.device)
            counts.view(-1).index_add_(0, owner * counts.shape[1] + votes, torch.ones_like(votes))
    assert counts is not None
    return counts


def clopper_pearson_lower(successes: torch.Tensor | Sequence[int], n: int, alpha: float) -> torch.Tensor:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion from
    ``successes`` out of ``n``: ``Beta.ppf(alpha, k, n - k + 1)``, 0 when ``k == 0``. Exact
    (conservative), as CERTIFY needs; float64 on the CPU."""
    from scipy.stats import beta

    k = torch.as_tensor(successes).detach().cpu().double()
    if ((k < 0) | (k > n)).any():
        raise ValueError(f"successes must lie in [0, {n}]")
    bound = torch.from_numpy(beta.ppf(alpha, k.clamp(min=1).numpy(), (n - k + 1).numpy()))
    return torch.where(k > 0, bound, torch.zeros_like(bound))


def radius_from_p_lower(p_lower: torch.Tensor, sigma: float) -> torch.Tensor:
    """The certified L2 radius ``sigma * Phi^-1(p_lower)`` (Cohen et al., Theorem 1 with
    ``pB = 1 - pA``) where ``p_lower > 1/2``, else 0 (nothing is certified)."""
    p = torch.as_tensor(p_lower, dtype=torch.float64).cpu()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    return torch.where(p > 0.5, sigma * normal.icdf(p.clamp(0.5, 1.0)), torch.zeros_like(p))


@dataclasses.dataclass(frozen=True, eq=False)
class Certificate:
    """What :func:`certify` found, per input (tensors of length N on the CPU) and the settings.

    An abstention has ``prediction == ABSTAIN`` (-1) and ``radius == 0``: no class is
    certified there, and a radius of 0 keeps the records JSON-able (no NaN) while
    :func:`certified_accuracy` never counts it (-1 is no label). A prediction that is not
    an abstention always has ``radius > 0``."""

    #: The certified class, or ABSTAIN.
    prediction: torch.Tensor
    #: Certified L2 radius in the [0, 1] pixel unit (0 when abstaining).
    radius: torch.Tensor
    #: One-sided ``1 - alpha`` lower bound on the top class's probability under noise.
    p_lower: torch.Tensor
    #: How many of the ``n`` draws voted for the guessed top class.
    counts_top: torch.Tensor
    #: The top class guessed from the ``n0`` selection draws (kept when abstaining too).
    guess: torch.Tensor
    sigma: float
    n0: int
    n: int
    alpha: float

    @property
    def abstained(self) -> torch.Tensor:
        return self.prediction == ABSTAIN

    def rows(self) -> list[dict[str, float | int]]:
        """One JSON-able dict per input: prediction, radius, p_lower, counts_top, guess."""
        return [
            {"prediction": int(c), "radius": float(r), "p_lower": float(p), "counts_top": int(k), "guess": int(g)}
            for c, r, p, k, g in zip(self.prediction.tolist(), self.radius.tolist(), self.p_lower.tolist(),
                                     self.counts_top.tolist(), self.guess.tolist())
        ]

    def settings(self) -> dict[str, float | int]:
        return {"sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha}


def certify(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 10_000, alpha: float = 0.001,
            batch: int = 1000, generator: torch.Generator | None = None) -> Certificate:
    """CERTIFY of Cohen et al. (2019), batched over the inputs of ``x`` (``N x C x H x W`` in
    [0, 1], on the base ``model``'s device): guess the top class from ``n0`` noise draws,
    count it on ``n`` fresh draws, bound its probability below at level ``alpha``
    (Clopper-Pearson) and certify radius ``sigma * Phi^-1(p_lower)`` when that bound
    exceeds 1/2, else abstain. Each certificate holds with probability at least
    ``1 - alpha`` over the draws. ``model`` is the *base* classifier (logits), not a smoothed one."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    guess = sample_counts(model, x, sigma, n0, batch, generator).argmax(1)
    counts = sample_counts(model, x, sigma, n, batch, generator)
    top = counts.gather(1, guess[:, None]).squeeze(1).cpu()
    guess = guess.cpu()
    p_lower = clopper_pearson_lower(top, n, alpha)
    certified = p_lower > 0.5
    return Certificate(
        prediction=torch.where(certified, guess, torch.full_like(guess, ABSTAIN)),
        radius=radius_from_p_lower(p_lower, sigma),
        p_lower=p_lower,
        counts_top=top,
        guess=guess,
        sigma=float(sigma), n0=int(n0), n=int(n), alpha=float(alpha),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothedPrediction:
    """What :func:`predict` found per input (CPU tensors): the class or ABSTAIN, and the
    two-sided binomial test's p-value of the top two counts."""

    prediction: torch.Tensor
    p_value: torch.Tensor
    counts: torch.Tensor


def predict(model: nn.Module, x: torch.Tensor, *, sigma: float, n: int = 1000, alpha: float = 0.001, batch: int = 1000,
            generator: torch.Generator | None = None) -> SmoothedPrediction:
    """PREDICT of Cohen et al. (2019): count the base ``model``'s votes over ``n`` noise
    draws and return the top class when a two-sided binomial test of its count against the
    runner-up's (``nA`` of ``nA + nB`` at 1/2) rejects at ``alpha``, else abstain. The
    prediction differs from the smoothed classifier's with probability at most ``alpha``."""
    from scipy.stats import binomtest

    counts = sample_counts(model, x, sigma, n, batch, generator).cpu()
    ranked = counts.topk(min(2, counts.shape[1]), dim=1)
    first = ranked.values[:, 0].tolist()
    second = ranked.values[:, 1].tolist() if counts.shape[1] > 1 else [0] * len(first)
    p_value = torch.tensor([binomtest(a, a + b, 0.5).pvalue for a, b in zip(first, second)], dtype=torch.float64)
    top = ranked.indices[:, 0]
    return SmoothedPrediction(torch.where(p_value <= alpha, top, torch.full_like(top, ABSTAIN)), p_value, counts)


def certified_accuracy(radii: torch.Tensor | Sequence[float], predictions: torch.Tensor | Sequence[int],
                       labels: torch.Tensor | Sequence[int], grid: Sequence[float]) -> list[tuple[float, float]]:
    """For each radius ``r`` of ``grid``: the fraction of inputs whose certified prediction
    is correct with a radius of at least ``r`` (abstentions never count), as ``(r, fraction)``."""
    radius = torch.as_tensor(radii, dtype=torch.float64).cpu().flatten()
    correct = torch.as_tensor(predictions).cpu().flatten() == torch.as_tensor(labels).cpu().flatten()
    if radius.numel() != correct.numel():
        raise ValueError(f"{radius.numel()} radii for {correct.numel()} predictions")
    if radius.numel() == 0:
        raise ValueError("certified_accuracy needs at least one input")
    return [(float(r), float((correct & (radius >= r)).double().mean())) for r in grid]


class SmoothedLogits(nn.Module):
    """The soft smoothed classifier, for attacks: ``log mean_k softmax(base(x + sigma * e_k))``
    over ``samples`` fresh draws ``e_k ~ N(0, I)`` per forward pass (unclamped, as in the
    certificate), computed as one pass of the base model on the batch repeated ``samples``
    times. Randomised on every call: noise comes from the default generator of ``x``'s
    device (reproducible under ``torch.manual_seed`` on one device). Its outputs are
    log-probabilities, so attacks that expect logits work unchanged; its gradient is that of
    the smoothed soft classifier, which Salman et al. (2019) attack (an EOT over the noise)."""

    def __init__(self, base: nn.Module, sigma: float, samples: int):
        super().__init__()
        if samples < 1:
            raise ValueError(f"samples must be positive, got {samples}")
        self.base, self.sigma, self.samples = base, float(sigma), int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, count = self.samples, x.shape[0]
        copies = x.repeat(k, *([1] * (x.dim() - 1)))
        logits = self.base(copies + self.sigma * torch.randn_like(copies))
        log_probs = torch.log_softmax(logits.float(), dim=1).view(k, count, *logits.shape[1:])
        return torch.logsumexp(log_probs, dim=0) - math.log(k)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, samples={self.samples}"
