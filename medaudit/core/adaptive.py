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

from medaudit.core.components import Facet, Screen

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


# -- detectors and routing --------------------------------------------------------------


class DetectorScore(nn.Module, Screen):
    """A fitted detector as a module: ``forward(x)`` gives one score per input (higher =
    more likely adversarial), differentiable when ``x`` requires grad. Inputs scoring above
    ``threshold`` are flagged. ``scale`` (the spread of clean scores) puts scores on the
    scale of logits for the adaptive views below. As the defended model's :class:`Screen`
    it records each case's ``score`` and whether it is ``rejected``."""

    facets = frozenset({Facet.DETECTION_SCORE, Facet.REJECTION})
    fields = ("score", "rejected")

    def __init__(self, model: nn.Module, detector, threshold: float, scale: float):
        super().__init__()
        self.model, self.detector = model, detector
        self.threshold, self.scale = float(threshold), max(float(scale), 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score(self.model, x)

    def examine(self, x: torch.Tensor) -> dict[str, list]:
        with torch.no_grad():
            scores = self(x).float()
        return {"score": scores.tolist(), "rejected": (scores > self.threshold).tolist()}

    def flagged(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self(x) > self.threshold

    def excess(self, x: torch.Tensor) -> torch.Tensor:
        """How far above the threshold each input scores, in units of ``scale``."""
        return (self(x) - self.threshold) / self.scale


def _signature(x: torch.Tensor) -> torch.Tensor:
    """A coarse summary of each input (4 x 4 average pools per channel): an input within a
    small L-inf distance of another has a signature within that distance of the other's."""
    pool = nn.functional.adaptive_avg_pool2d if x.dim() == 4 else nn.functional.adaptive_avg_pool3d
    return pool(x.detach().float(), 4).flatten(1)


class JointView(nn.Module):
    """Classifier and detector as one classifier, for the adaptive attack on a detector
    defense (Carlini & Wagner 2017's construction, with the "detected" class folded into the
    true class): the logit of each input's true class becomes
    ``max(z_y, max_j z_j + (score - threshold) / scale)``.

    So an input counts as fooling this view exactly when it fools the classifier *and* the
    detector does not flag it, which is what fooling the defended system means; and any
    attack that lowers the true class's logit is pushed, once the input is flagged, to lower
    the detector's score. The labels come from :meth:`bind` (the runner binds the batch
    before each attack): an attack may query any subset of the batch's rows, so each
    queried input takes the label of the bound input it is near (see :func:`_signature`);
    an input near none of them (e.g. another data set) gets the classifier's plain logits.
    """

    #: Largest signature distance (L-inf, pixel units) at which a query is matched to a bound input.
    MATCH_DISTANCE = 0.1

    def __init__(self, model: nn.Module, scorer: DetectorScore):
        super().__init__()
        self.model, self.scorer = model, scorer
        self._keys: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def bind(self, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        self._keys = None if x is None else _signature(x)
        self._labels = y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if self._labels is None:
            return z
        distance = (_signature(x)[:, None] - self._keys[None]).abs().amax(-1)
        nearest, index = distance.min(1)
        known = nearest <= self.MATCH_DISTANCE
        y = self._labels[index].to(z.device)[:, None]
        rejected = z.detach().amax(1) + self.scorer.excess(x)
        folded = torch.maximum(z.gather(1, y).squeeze(1), rejected.to(z.dtype))
        return torch.where(known[:, None], z.scatter(1, y, folded[:, None]), z)


def bind_labels(module: nn.Module | None, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
    """Bind (or, with None, unbind) the batch's labels in every :class:`JointView` of ``module``."""
    if module is None:
        return
    for m in module.modules():
        if isinstance(m, JointView):
            m.bind(x, y)


class RoutedModel(nn.Module):
    """Detect-then-route: inputs the detector flags go to ``robust``, the others to
    ``standard``. The routing decision has no gradient; the chosen model's does."""

    def __init__(self, standard: nn.Module, robust: nn.Module, scorer: DetectorScore):
        super().__init__()
        self.standard, self.robust, self.scorer = standard, robust, scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flagged = self.scorer.flagged(x)[:, None]
        return torch.where(flagged, self.robust(x), self.standard(x))


class SoftRoutedView(nn.Module):
    """The adaptive view of :class:`RoutedModel`: its exact outputs, with the gradient of a
    soft routing, ``log((1 - w) softmax(standard) + w softmax(robust))`` where
    ``w = sigmoid((score - threshold) / scale)`` (BPDA through the hard decision), so the
    attacker sees both models and how moving the detector's score moves between them."""

    def __init__(self, routed: RoutedModel):
        super().__init__()
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routed
        if not x.requires_grad:
            return r(x)
        standard, robust, excess = r.standard(x), r.robust(x), r.scorer.excess(x)
        exact = torch.where((excess > 0)[:, None], robust, standard)  # excess > 0: score above the threshold
        w = torch.sigmoid(excess)[:, None]
        soft = torch.logsumexp(torch.stack([
            torch.log1p(-w.clamp(max=1 - 1e-6)) + standard.log_softmax(1),
            torch.log(w.clamp_min(1e-6)) + robust.log_softmax(1),
        ]), 0)
        return _BPDA.apply(soft, exact.detach())
