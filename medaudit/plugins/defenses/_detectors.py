"""Adversarial-input detectors on deep features: Mahalanobis (Lee et al. 2018; Li & Zhu's
MGM), kernel density + Bayesian uncertainty (Feinman et al. 2017), local intrinsic
dimensionality (Ma et al. 2018) and UAD (Li, Pan & Zhu 2021).

Library code for the defense plugins of :mod:`medaudit.plugins.defenses.detectors`: no
component is registered here. It also holds the Shield of Medical Aegis. Every detector has
the same interface:

- ``fit(model, images, labels, generator, adv_images=None) -> self`` on clean training
  images in pixel space ([0, 1]) and their labels. The supervised parts of the original
  methods (the logistic regressions of Lee et al., Feinman et al. and Ma et al.) also take
  adversarial examples *of the same training images* (``adv_images``, in the same order);
  without them each detector falls back to an unsupervised combination, documented on the
  class.
- ``score(model, x) -> Tensor[N]``: higher means more likely adversarial. When gradients
  are enabled and ``x`` requires grad, the score is part of the autograd graph, so an
  adaptive attacker can ascend ``loss - lambda * score`` jointly with the classifier
  (DESIGN.md: detectors are attacked jointly with the classifier).
- ``threshold_at_fpr(clean_scores, fpr=0.05)``: the threshold that flags at most
  ``fpr`` of the clean scores; it is kept as ``threshold`` and used by ``detect``.

Features are read with forward hooks (:func:`features`): by default the input of the last
``nn.Linear`` (the penultimate features); optionally the outputs of named modules, globally
average-pooled. Everything is torch on the model's device; scikit-learn is used only to fit
the logistic regressions (never in an attack loop). The model is not changed: hooks are
removed on exit and the only mode change (dropout on, for BU) is undone.

Choices where methods.md marks a gap or leaves one open are tagged [DESIGN] in the
docstrings below.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import ClassVar, Iterator, Literal, Sequence

from pydantic import Field

from medaudit.core.components import Params
from medaudit.core.lazy import nn, torch
from medaudit.core.probes import last_layer, model_device
from medaudit.core.statistics import auroc, threshold_at_fpr, tpr_at_fpr

#: Name of the penultimate features (the input of the model's last ``nn.Linear``).
PENULTIMATE = "penultimate"
#: Shorthand for :func:`stage_layers` plus the penultimate features.
AUTO = "auto"
#: Images per forward pass when the detectors run the model without gradients.
CHUNK = 256


# -- features -------------------------------------------------------------------------


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _module(model) -> nn.Module:
    """Accept a ``LoadedModel`` as well as its module."""
    return getattr(model, "module", model)


def stage_layers(model: nn.Module) -> list[str]:
    """Names of the model's stages: descending through wrappers with a single child that
    holds convolutions (such as the pixel-space adapter or an input transform), the
    children that contain a convolution, in module order. For a
    timm or torchvision ResNet: the stem and ``layer1`` .. ``layer4``. [DESIGN] Ma et al.
    take every layer; one feature per stage keeps the LID vector short and the pooled
    features cheap on large models."""
    root, prefix = _module(model), ""
    while True:
        children = [(n, c) for n, c in root.named_children() if any(_is_conv(m) for m in c.modules())]
        if len(children) != 1:
            break
        name, root = children[0]
        prefix += name + "."
    return [prefix + name for name, _ in children]


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Expand ``auto`` and check every name (``penultimate`` or a name from
    ``model.named_modules()``)."""
    model = _module(model)
    names: list[str] = []
    for name in [PENULTIMATE] if not layers else layers:
        if name == AUTO:
            names += stage_layers(model) + [PENULTIMATE]
        else:
            names.append(name)
    known = dict(model.named_modules())
    for name in names:
        if name == PENULTIMATE:
            if last_layer(model, nn.Linear) is None:
                raise ValueError("the model has no nn.Linear, so no penultimate features; name its layers instead")
        elif name not in known:
            raise ValueError(f"the model has no module {name!r}")
    if not names:
        raise ValueError("no layers to read features from")
    return list(dict.fromkeys(names))


def _reduce(t: torch.Tensor, pool: bool, channels_last: bool) -> torch.Tensor:
    """One row per sample: global average over the spatial (or token) dimensions, or the
    whole activation flattened. Done inside the hook, before any later in-place op can
    change the tensor."""
    t = t.float()
    if t.dim() <= 2:
        return t.reshape(t.shape[0], -1)
    if not pool:
        return t.flatten(1)
    return t.flatten(1, -2).mean(1) if channels_last else t.flatten(2).mean(2)


@contextlib.contextmanager
def _hooks(model: nn.Module, layers: Sequence[str], pool: bool, store: dict[str, torch.Tensor]) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in layers:
            if name == PENULTIMATE:
                # Tokens x features reach a Linear with the features last.
                def pre(module, args, name=name):
                    store[name] = _reduce(args[0], True, channels_last=True)

                handles.append(last_layer(model, nn.Linear).register_forward_pre_hook(pre))
            else:
                def post(module, args, output, name=name):
                    if isinstance(output, (tuple, list)):
                        output = output[0]
                    store[name] = _reduce(output, pool, channels_last=False)

                handles.append(modules[name].register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_features(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None, *, pool: bool = True, grad: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits and the features of ``layers`` (see :func:`features`) from one
    forward pass."""
    model = _module(model)
    names = resolve_layers(model, layers)
    store: dict[str, torch.Tensor] = {}
    context = contextlib.nullcontext() if grad else torch.no_grad()
    with context, _hooks(model, names, pool, store):
        logits = model(x.to(model_device(model)))
    missing = [name for name in names if name not in store or store[name].shape[0] != x.shape[0]]
    if missing:
        raise RuntimeError(f"layers {missing} did not run once on the whole batch")
    return logits, [store[name] for name in names]


def features(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None, *, pool: bool = True, grad: bool = False
) -> list[torch.Tensor]:
    """Activations of ``layers``, one ``N x D`` float tensor per layer, in order.

    ``layers``: ``penultimate`` (the default: the input of the last ``nn.Linear``, averaged
    over tokens if it has them), ``auto`` (the stages of :func:`stage_layers` and the
    penultimate features) or names from ``model.named_modules()`` (their outputs).
    Outputs with spatial dimensions are globally average-pooled (``pool=True``) or
    flattened. ``grad=True`` keeps the graph, so the features can be differentiated
    w.r.t. ``x``; otherwise they are computed without gradients. The model's mode is not
    changed.
    """
    return forward_features(model, x, layers, pool=pool, grad=grad)[1]


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _chunked(model, x: torch.Tensor, layers, pool: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`forward_features` without gradients, in chunks of :data:`CHUNK` images."""
    parts = [forward_features(model, x[i : i + CHUNK], layers, pool=pool) for i in range(0, len(x), CHUNK)]
    logits = torch.cat([p[0] for p in parts])
    return logits, [torch.cat([p[1][j] for p in parts]) for j in range(len(parts[0][1]))]


# -- statistics shared by the detectors -------------------------------------------------


def ledoit_wolf(centered: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of already-centred rows and its shrinkage (the
    estimator of scikit-learn's ``ledoit_wolf(assume_centered=True)``)."""
    x = centered.double()
    n, p = x.shape
    emp = x.T @ x / n
    mu = torch.trace(emp) / p
    x2 = x * x
    beta_ = (x2.T @ x2).sum()
    delta_ = (emp * emp).sum()
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * torch.trace(emp) + p * mu * mu) / p
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(beta) == 0 else float(beta / delta)
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    return (1 - shrinkage) * emp + shrinkage * mu * eye, shrinkage


def _whitener(cov: torch.Tensor) -> torch.Tensor:
    """``W`` with ``W^T W = cov^-1`` (so ``||W d||^2`` is the squared Mahalanobis norm),
    with a tiny ridge so a rank-deficient covariance stays invertible."""
    cov = cov.double()
    ridge = 1e-6 * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
    inv = torch.linalg.solve_triangular(chol, torch.eye(len(cov), dtype=cov.dtype, device=cov.device), upper=False)
    return inv.float()


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``len(a) x len(b)``, differentiable everywhere (no sqrt)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min(0.0)


def _pick_class(per_class: torch.Tensor, class_ids: torch.Tensor, predicted: torch.Tensor,
                fallback: torch.Tensor) -> torch.Tensor:
    """Column of ``per_class`` (``N x K``, columns ordered as ``class_ids``) of each row's
    predicted class; ``fallback`` where that class had no training image."""
    pos = torch.searchsorted(class_ids, predicted).clamp(max=len(class_ids) - 1)
    found = class_ids[pos] == predicted
    return torch.where(found, per_class.gather(1, pos.unsqueeze(1)).squeeze(1), fallback)


def _to(value, device: torch.device | None):
    """``value`` (a tensor, or lists of them) on ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    if isinstance(value, (list, tuple)):
        return [_to(v, device) for v in value]
    return value


class Combiner:
    """Turns a detector's per-sample features (``N x F``: one column per layer, or KD and
    BU) into one score, higher = adversarial.

    With adversarial examples: features are z-scored with the statistics of the fitting
    set and a logistic regression (scikit-learn ``LogisticRegressionCV``, 5 folds) is fitted
    with adversarial as the positive class, as in Lee et al., Feinman et al. and Ma et al.;
    the score is its logit, a linear function of the features (so it stays differentiable).
    Without them [DESIGN]: the sum of the features z-scored on the clean set, each
    multiplied by its ``orientation`` (+1 where larger means adversarial, -1 where
    smaller does).
    """

    def __init__(self, orientation: Sequence[float]):
        self.orientation = torch.tensor(list(orientation), dtype=torch.float32)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.supervised = False

    def fit(self, negatives: torch.Tensor, positives: torch.Tensor | None, seed: int) -> "Combiner":
        negatives = negatives.detach().float()
        pool = negatives if positives is None else torch.cat([negatives, positives.detach().float()])
        self.mean = pool.mean(0)
        self.std = pool.std(0).clamp_min(1e-8) if len(pool) > 1 else torch.ones_like(self.mean)
        device = negatives.device
        if positives is None or len(positives) == 0:
            self.weight, self.bias = self.orientation.to(device), torch.zeros((), device=device)
            self.supervised = False
            return self
        from sklearn.linear_model import LogisticRegressionCV

        z = ((pool - self.mean) / self.std).cpu().double().numpy()
        target = [0] * len(negatives) + [1] * len(positives)
        folds = max(2, min(5, len(negatives), len(positives)))
        with warnings.catch_warnings():  # scikit-learn's notices about future defaults
            warnings.simplefilter("ignore", FutureWarning)
            lr = LogisticRegressionCV(cv=folds, max_iter=1000, random_state=seed).fit(z, target)
        self.weight = torch.as_tensor(lr.coef_[0], dtype=torch.float32, device=device)
        self.bias = torch.as_tensor(float(lr.intercept_[0]), dtype=torch.float32, device=device)
        self.supervised = True
        return self

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.mean) / self.std) @ self.weight + self.bias

    def export_state(self) -> dict:
        """What :meth:`fit` learnt, as tensors (see :meth:`Detector.export_state`)."""
        return {"orientation": self.orientation, "mean": self.mean, "std": self.std, "weight": self.weight,
                "bias": self.bias, "supervised": self.supervised}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | None = None) -> "Combiner":
        combiner = cls(state["orientation"].tolist())
        for name in ("mean", "std", "weight", "bias"):
            setattr(combiner, name, _to(state[name], device))
        combiner.supervised = bool(state["supervised"])
        return combiner


def _noisy_copies(images: torch.Tensor, adv_images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Feinman et al.'s noisy negatives: Gaussian noise whose expected L2 norm matches the
    mean L2 norm of the adversarial perturbations, clipped to [0, 1]."""
    per_pixel = (adv_images - images).flatten(1).norm(dim=1).mean() / math.sqrt(images[0].numel())
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return (images + per_pixel * noise.to(images.device)).clamp(0.0, 1.0)


# -- base -----------------------------------------------------------------------------


class DetectorParams(Params):
    """Params shared by every detector."""

    correct_only: bool = Field(
        True,
        description="Fit the logistic regression only on training images the model classifies correctly (Feinman; Ma).",
    )


class Detector(abc.ABC):
    """Base class: fitted on clean images (and, where the method needs it, adversarial
    examples of those images), then scores inputs, higher = more likely adversarial."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = DetectorParams
    #: Whether the original method needs adversarial examples to fit (a logistic regression).
    uses_adversarial: ClassVar[bool] = False
    #: The fitted combination of several scores into one (Mahalanobis, KD-BU, LID), or None.
    combiner: "Combiner | None" = None

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()
        self.threshold: torch.Tensor | None = None
        self.fitted = False

    @abc.abstractmethod
    def fit(self, model, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
            adv_images: torch.Tensor | None = None) -> "Detector":
        """Fit on clean ``images`` (``N x C x ...`` in [0, 1]) and their ``labels``; the
        supervised methods also take ``adv_images``, adversarial examples of ``images``
        in the same order. Every random choice draws from ``generator``. Returns self."""

    @abc.abstractmethod
    def score(self, model, x: torch.Tensor) -> torch.Tensor:
        """``N`` scores, higher = more likely adversarial; differentiable w.r.t. ``x``
        when gradients are enabled and ``x`` requires grad."""

    #: Fitted attributes kept as they are by :meth:`export_state` (tensors, lists of them,
    #: numbers, strings); subclasses add what needs more (a combiner, networks).
    STATE: ClassVar[tuple[str, ...]] = ()

    def export_state(self) -> dict:
        """Everything :meth:`fit` learnt, as tensors, numbers, strings, lists and dicts (so
        ``torch.save`` and ``torch.load(weights_only=True)`` keep it), for :meth:`load_state`
        in another process: scoring then needs no refit."""
        self._require_fitted()
        state = {name: getattr(self, name) for name in self.STATE}
        state["threshold"] = self.threshold
        state["combiner"] = None if self.combiner is None else self.combiner.export_state()
        return state

    def load_state(self, state: dict, device: torch.device | None = None) -> "Detector":
        """Take back :meth:`export_state`'s state (tensors moved to ``device``) instead of fitting."""
        for name in self.STATE:
            setattr(self, name, _to(state[name], device))
        self.threshold = _to(state["threshold"], device)
        self.combiner = None if state.get("combiner") is None else Combiner.from_state(state["combiner"], device)
        self.fitted = True
        return self

    def threshold_at_fpr(self, clean_scores: torch.Tensor, fpr: float = 0.05) -> torch.Tensor:
        """Set and return :attr:`threshold`: at most ``fpr`` of ``clean_scores`` lie above it."""
        self.threshold = threshold_at_fpr(clean_scores, fpr)
        return self.threshold

    def detect(self, model, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``N``: flagged as adversarial (score above :attr:`threshold`)."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}: call threshold_at_fpr first")
        with torch.no_grad():
            return self.score(model, x) > self.threshold.to(x.device)

    # helpers

    def _check_fit_inputs(self, images, labels, adv_images, need_labels: bool) -> None:
        if images.dim() < 3 or len(images) < 2:
            raise ValueError("fit needs a batch of at least two images")
        if need_labels and (labels is None or len(labels) != len(images)):
            raise ValueError(f"{type(self).__name__} needs one label per training image")
        if adv_images is not None and adv_images.shape != images.shape:
            raise ValueError("adv_images must be adversarial examples of images: same shape, same order")

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted")

    def _lr_rows(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Training rows used for the logistic regression: all, or the correctly classified."""
        if labels is None or not getattr(self.params, "correct_only", False):
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        keep = logits.argmax(1) == labels.to(logits.device)
        return keep if int(keep.sum()) >= 2 else torch.ones_like(keep)


# -- Mahalanobis ------------------------------------------------------------------------


class MahalanobisParams(DetectorParams):
    layers: list[str] = Field(
        default_factory=lambda: [PENULTIMATE],
        description="Feature layers: 'penultimate', 'auto' (every stage and the penultimate) or module names.",
    )
    classes: Literal["labels", "predicted", "none"] = Field(
        "labels",
        description="Class-conditional Gaussians keyed by the true labels (Lee), by the model's predictions, or one Gaussian.",
    )
    assign: Literal["min", "predicted"] = Field(
        "min", description="Score with the nearest class mean (Lee) or with the predicted class's mean."
    )
    shrinkage: Literal["auto", "ledoit-wolf", "none"] = Field(
        "auto", description="Shared covariance: Ledoit-Wolf when dim > n/10 ('auto'), always, or the empirical one."
    )
    noise_magnitude: float = Field(
        0.0, ge=0.0, le=0.1,
        description="Lee et al.'s input pre-processing step (pixel units) towards the nearest mean; 0 disables it.",
    )


class MahalanobisDetector(Detector):
    """Class-conditional Gaussians with a shared covariance on deep features (Lee et al.,
    NeurIPS 2018; the MGM detector of Li & Zhu, ISBI 2020, methods.md 9.1 and 9.4).

    Fit: per layer, the class means of the training features (keyed by the true labels by
    default) and one covariance of the features minus their class means, shrunk with
    Ledoit-Wolf when the feature dimension exceeds a tenth of the number of images
    (methods.md 9.1). Score per layer: the squared Mahalanobis distance to the nearest class
    mean (``assign='min'``, Lee's confidence score with its sign flipped) or to the predicted
    class's mean (methods.md 9.1 [DESIGN]).

    One layer: that distance is the score and no adversarial examples are needed (Li & Zhu
    call it unsupervised). Several layers: Lee et al. weight the per-layer scores with a
    logistic regression fitted on clean versus adversarial features (pass ``adv_images``);
    without them [DESIGN] the per-layer distances are z-scored on the clean training set
    and summed. The optional input pre-processing (``noise_magnitude``, Lee's epsilon,
    0.0005 in the HFC re-implementation) moves the input a signed-gradient step towards
    the nearest class mean before scoring; [DESIGN] it is off by default (one more
    backward pass per score), and when the score is differentiated the step is treated
    as a constant (the sign has zero gradient almost everywhere).
    """

    name = "mahalanobis"
    Params = MahalanobisParams
    STATE = ("layers", "class_ids", "means", "whiteners", "shrinkages")

    def fit(self, model, images, labels, generator, adv_images=None):
        p: MahalanobisParams = self.params
        model = _module(model)
        need_labels = p.classes == "labels"
        self._check_fit_inputs(images, labels, adv_images, need_labels)
        self.layers = resolve_layers(model, p.layers)
        logits, feats = _chunked(model, images, self.layers, pool=True)
        if p.classes == "labels":
            keys = labels.to(logits.device).long()
        elif p.classes == "predicted":
            keys = logits.argmax(1)
        else:
            keys = torch.zeros(len(images), dtype=torch.long, device=logits.device)
        self.class_ids = torch.unique(keys)
        self.means, self.whiteners, self.shrinkages = [], [], []
        for f in feats:
            means = torch.stack([f[keys == k].mean(0) for k in self.class_ids])
            centered = f - means[torch.searchsorted(self.class_ids, keys)]
            use_lw = p.shrinkage == "ledoit-wolf" or (p.shrinkage == "auto" and f.shape[1] > len(f) / 10)
            if use_lw:
                cov, s = ledoit_wolf(centered)
            else:
                cov, s = centered.double().T @ centered.double() / len(f), 0.0
            self.means.append(means)
            self.whiteners.append(_whitener(cov).to(f.device))
            self.shrinkages.append(s)
        self.fitted = True
        # Combine the layers (a no-op scaling for one layer: its distance is the score).
        self.combiner = None
        if len(self.layers) > 1:
            clean = self._distances(model, images)
            rows = self._lr_rows(logits, labels)
            adv = None if adv_images is None else self._distances(model, adv_images)[rows]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
            self.combiner = Combiner([1.0] * len(self.layers)).fit(clean[rows], adv, seed)
        return self

    def _layer_distances(self, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """``N x L`` squared Mahalanobis distances per layer."""
        out = []
        for f, means, w in zip(feats, self.means, self.whiteners):
            d = ((f.unsqueeze(1) - means.unsqueeze(0)) @ w.T).pow(2).sum(2)  # N x K
            nearest = d.min(1).values
            if self.params.assign == "predicted":
                out.append(_pick_class(d, self.class_ids, logits.argmax(1), nearest))
            else:
                out.append(nearest)
        return torch.stack(out, 1)

    def _distances(self, model, x: torch.Tensor) -> torch.Tensor:
        grad = _wants_grad(x)
        if self.params.noise_magnitude > 0:
            # Lee's pre-processing needs an input gradient even when scoring without one.
            with torch.inference_mode(False), torch.enable_grad():
                x_in = x.detach().clone().requires_grad_(True)
                logits, feats = forward_features(model, x_in, self.layers, grad=True)
                (g,) = torch.autograd.grad(self._layer_distances(logits, feats).sum(), x_in)
            x = (x - self.params.noise_magnitude * g.sign().to(x.device)).clamp(0.0, 1.0)
        if grad:
            logits, feats = forward_features(model, x, self.layers, grad=True)
        else:
            logits, feats = _chunked(model, x, self.layers, pool=True)
        return self._layer_distances(logits, feats)

    def score(self, model, x):
        self._require_fitted()
        d = self._distances(_module(model), x)
        return d[:, 0] if self.combiner is None else self.combiner(d)

    def score_from(self, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """The score from a forward pass already run with :func:`forward_features` on
        :attr:`layers` (one forward pass for the classifier and the detector, e.g. in an
        adaptive attack). Without the input pre-processing, which needs its own pass."""
        self._require_fitted()
        if self.params.noise_magnitude > 0:
            raise ValueError("score_from cannot apply the input pre-processing; use score(model, x)")
        d = self._layer_distances(logits, feats)
        return d[:, 0] if self.combiner is None else self.combiner(d)


# -- KD + BU ----------------------------------------------------------------------------


class KernelDensityParams(DetectorParams):
    bandwidth: float | None = Field(
        None, gt=0,
        description="Gaussian kernel bandwidth on the penultimate features; unset: chosen at fit (see the class docs).",
    )
    uncertainty: bool = Field(True, description="Add Bayesian uncertainty (MC-dropout variance) as a second feature.")
    mc_samples: int = Field(50, ge=2, le=1000, description="Stochastic forward passes for the uncertainty (Feinman: 50).")
    dropout: Literal["auto", "model", "head"] = Field(
        "auto",
        description="Dropout for BU: the model's own dropout layers ('model'), dropout on the input of the last Linear "
        "('head'), or the model's when it has any, else the head ('auto').",
    )
    dropout_rate: float = Field(0.5, gt=0.0, lt=1.0, description="Rate of the head dropout (when the head is used).")
    noisy_negatives: bool = Field(
        True, description="Add Gaussian-noisy copies of the clean images as negatives of the logistic regression (Feinman)."
    )


class KernelDensityDetector(Detector):
    """Kernel density and Bayesian uncertainty (Feinman, Curtin, Shintre & Gardner 2017,
    arXiv 1703.00410; methods.md 9.2-9.3).

    KD: a Gaussian kernel density on the penultimate features (the input of the last
    ``nn.Linear``, the "last hidden layer") of the training images of each class (true
    labels), evaluated under the class the model *predicts* for the input:
    ``log (1/|X_t|) sum_i exp(-||phi(x) - phi(x_i)||^2 / (2 h^2))`` (scikit-learn's kernel,
    as in the reference code, without the constant normaliser). Low density means
    adversarial. When the density of a training image is needed to fit the regression,
    that image is left out of its own class's kernel sum [DESIGN] (the reference fits the
    regression on test images instead).

    Bandwidth [DESIGN]: the papers tune it per data set (Feinman 0.26 to 1.20, Ma et al.
    1.0 for medical images) on features of a very different scale from this model's; when
    unset it is the median distance from each training feature to its nearest same-class
    neighbour, so it follows the feature scale.

    BU: ``mean over classes of Var_t softmax(f_t(x))`` over ``mc_samples`` passes with
    dropout on. A model without dropout layers (the demo ResNet has none) gets [DESIGN]
    inverted dropout of rate ``dropout_rate`` on the input of its last ``nn.Linear``
    (last-layer MC dropout); when the model's output is that layer's output, the network
    body runs once and only the head is resampled. The dropout masks come from a
    generator seeded at fit, re-seeded on every call, so a score is a deterministic
    function of its input (differentiable through the head dropout; with the model's own
    dropout layers, the global RNG is forked and seeded the same way).

    Combination: with ``adv_images`` (adversarial examples of the training images, needed
    by the paper's detector), a logistic regression on the z-scored ``[KD, BU]`` with
    adversarial as positives and clean plus Gaussian-noisy copies (noise matched to the
    adversarial L2, ``noisy_negatives``) as negatives; without them [DESIGN]
    ``-z(KD) + z(BU)``, z-scored on the clean training set. ``uncertainty=False`` uses KD
    alone (score ``-KD`` without adversarial examples).
    """

    name = "kernel-density"
    Params = KernelDensityParams
    uses_adversarial = True
    STATE = ("class_ids", "train_features", "bandwidth", "_seed")

    def fit(self, model, images, labels, generator, adv_images=None):
        p: KernelDensityParams = self.params
        model = _module(model)
        self._check_fit_inputs(images, labels, adv_images, True)
        logits, (f,) = _chunked(model, images, [PENULTIMATE], pool=True)
        labels = labels.to(f.device).long()
        self.class_ids = torch.unique(labels)
        self.train_features = [f[labels == k] for k in self.class_ids]
        self.bandwidth = p.bandwidth if p.bandwidth is not None else self._median_nn_distance()
        self._seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        self.fitted = True

        rows = self._lr_rows(logits, labels)
        index = torch.arange(len(images), device=f.device)
        # Position of each training image in its class's kernel sum (left out of it).
        own = torch.empty_like(index)
        for k, cls in enumerate(self.class_ids):
            members = index[labels == cls]
            own[members] = torch.arange(len(members), device=f.device)
        clean = self.kd_bu_features(model, images, leave_out=(labels, own))[rows]
        adv = None
        if adv_images is not None:
            adv = self.kd_bu_features(model, adv_images)[rows]
            if p.noisy_negatives:
                noisy = _noisy_copies(images[rows.to(images.device)], adv_images[rows.to(images.device)], generator)
                clean = torch.cat([clean, self.kd_bu_features(model, noisy)])
        orientation = [-1.0, 1.0] if p.uncertainty else [-1.0]
        self.combiner = Combiner(orientation).fit(clean, adv, self._seed)
        return self

    def _median_nn_distance(self) -> float:
        dists = []
        for f in self.train_features:
            if len(f) < 2:
                continue
            d = _sq_dist(f, f)
            d.fill_diagonal_(float("inf"))
            dists.append(d.min(1).values.sqrt())
        if not dists:
            return 1.0
        return float(torch.cat(dists).median().clamp_min(1e-6))

    def log_density(self, feats: torch.Tensor, predicted: torch.Tensor, leave_out=None) -> torch.Tensor:
        """KD of each feature row under the kernel of its predicted class (of the densest
        class when no training image has the predicted class). ``leave_out = (class,
        position)`` drops one training point per row from that class's sum."""
        per_class = []
        for k, cls in enumerate(self.class_ids):
            ref = self.train_features[k]
            logk = -_sq_dist(feats, ref) / (2 * self.bandwidth**2)
            count = torch.full((len(feats),), float(len(ref)), device=feats.device)
            if leave_out is not None:
                same = (leave_out[0] == cls).nonzero().squeeze(1)
                logk = logk.index_put((same, leave_out[1][same]), torch.tensor(float("-inf"), device=feats.device))
                count[same] -= 1
            per_class.append(torch.logsumexp(logk, 1) - count.clamp_min(1).log())
        per_class = torch.stack(per_class, 1)
        return _pick_class(per_class, self.class_ids, predicted, per_class.max(1).values)

    def _uncertainty(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        p: KernelDensityParams = self.params
        own = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        use_model = p.dropout == "model" or (p.dropout == "auto" and own)
        if use_model:
            if not own:
                raise ValueError("dropout='model' but the model has no dropout layers")
            probs = []
            devices = [x.device] if x.device.type == "cuda" else []
            modes = [(m, m.training) for m in own]
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self._seed)
                try:
                    for m in own:
                        m.train()
                    for _ in range(p.mc_samples):
                        context = contextlib.nullcontext() if _wants_grad(x) else torch.no_grad()
                        with context:
                            probs.append(model(x).float().softmax(1))
                finally:
                    for m, mode in modes:
                        m.training = mode
            return torch.stack(probs).var(0).mean(1)
        head = last_layer(model, nn.Linear)
        g = torch.Generator(device=feats.device).manual_seed(self._seed)
        keep = 1.0 - p.dropout_rate
        fast = logits.shape == (len(x), head.out_features)
        if fast:
            with torch.no_grad():
                fast = torch.allclose(head(feats.detach()).float(), logits.detach().float(), rtol=1e-4, atol=1e-4)
        probs = []
        for _ in range(p.mc_samples):
            mask = (torch.rand(feats.shape, generator=g, device=feats.device) < keep).float() / keep
            if fast:
                probs.append(head(feats * mask).float().softmax(1))
            else:  # the head feeds more layers: run the model with the mask applied by a pre-hook
                def pre(module, args, mask=mask):
                    return (args[0] * mask.view(mask.shape[0], *([1] * (args[0].dim() - 2)), -1),) + tuple(args[1:])

                handle = head.register_forward_pre_hook(pre)
                try:
                    context = contextlib.nullcontext() if _wants_grad(x) else torch.no_grad()
                    with context:
                        probs.append(model(x).float().softmax(1))
                finally:
                    handle.remove()
        return torch.stack(probs).var(0).mean(1)

    def kd_bu_features(self, model, x: torch.Tensor, leave_out=None) -> torch.Tensor:
        """``N x 2`` (KD, BU), or ``N x 1`` (KD) without uncertainty: the features of the
        logistic regression."""
        model = _module(model)
        grad = _wants_grad(x)
        if grad:
            logits, (f,) = forward_features(model, x, [PENULTIMATE], grad=True)
        else:
            logits, (f,) = _chunked(model, x, [PENULTIMATE], pool=True)
        kd = self.log_density(f, logits.argmax(1), leave_out)
        if not self.params.uncertainty:
            return kd.unsqueeze(1)
        bu = self._uncertainty(model, x, logits, f)
        return torch.stack([kd, bu], 1)

    def score(self, model, x):
        self._require_fitted()
        return self.combiner(self.kd_bu_features(_module(model), x))


# -- LID ------------------------------------------------------------------------------


class LIDParams(DetectorParams):
    layers: list[str] = Field(
        default_factory=lambda: [AUTO],
        description="Feature layers: 'auto' (every stage and the penultimate), 'penultimate' or module names.",
    )
    k: int = Field(20, ge=2, le=1000, description="Nearest neighbours in the LID estimate (Ma et al.: 20).")
    batch_size: int = Field(100, ge=3, le=10_000, description="Size of the clean minibatch the neighbours come from (100).")
    reference_batches: int = Field(
        4, ge=1, le=100, description="Clean reference minibatches drawn at fit; each input's LID is averaged over them."
    )
    pool: bool = Field(
        True, description="Globally average-pool the activations (true) or use them flattened as Ma et al. do (false)."
    )


def lid(query: torch.Tensor, reference: torch.Tensor, k: int, self_index: torch.Tensor | None = None) -> torch.Tensor:
    """Maximum-likelihood LID of each query row from its ``k`` nearest reference rows
    (Ma et al. 2018): ``-(1/k sum_i log(r_i / r_k))^-1``. ``self_index[i]`` (or -1) is the
    query's own position in ``reference``, skipped as a neighbour. Differentiable."""
    d2 = _sq_dist(query, reference)
    if self_index is not None:
        hit = self_index >= 0
        d2 = d2.index_put((hit.nonzero().squeeze(1), self_index[hit]), torch.tensor(float("inf"), device=d2.device))
    k = min(k, reference.shape[0] - (1 if self_index is not None else 0))
    r = d2.topk(k, dim=1, largest=False).values.clamp_min(1e-20).sqrt()
    ratio = (r / r[:, -1:]).log().mean(1)
    return -1.0 / ratio.clamp(max=-1e-12)


class LIDDetector(Detector):
    """Local intrinsic dimensionality (Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song,
    Houle & Bailey, ICLR 2018; the medical study of Ma et al. 2021; methods.md 9.2, 9.4).

    Per layer, the maximum-likelihood LID of an input's features from its ``k`` nearest
    neighbours in a minibatch of clean images; the LID vector over the layers is the
    feature of a logistic regression (adversarial = positive), fitted on the clean
    training images and *their adversarial examples* (``adv_images``: the method needs
    them). Without them [DESIGN] the per-layer LIDs are z-scored on the clean set and
    summed (adversarial regions have higher LID).

    [DESIGN] The papers estimate LID inside the minibatch being scored at fit time; a
    deployed detector scores inputs one batch at a time against clean data. Here
    ``reference_batches`` clean minibatches of ``batch_size`` training images are drawn
    at fit (with the fit generator) and kept; every input, at fit and at score time, gets
    the mean of its LIDs against each of them, a training image being left out of a
    reference batch that holds it. The layers default to the stages of the network plus
    the penultimate features (``auto``), globally average-pooled (``pool``), where Ma et
    al. use every layer's full activation.
    """

    name = "lid"
    Params = LIDParams
    uses_adversarial = True
    STATE = ("layers", "references")

    def fit(self, model, images, labels, generator, adv_images=None):
        p: LIDParams = self.params
        model = _module(model)
        self._check_fit_inputs(images, labels, adv_images, False)
        self.layers = resolve_layers(model, p.layers)
        logits, feats = _chunked(model, images, self.layers, p.pool)
        n = len(images)
        size = min(p.batch_size, n)
        batches = [torch.randperm(n, generator=generator, device=generator.device)[:size].to(logits.device)
                   for _ in range(p.reference_batches)]
        self.references = [[f[b] for f in feats] for b in batches]
        self.fitted = True
        # Where each training image sits in each reference batch (-1 when absent).
        self_index = []
        for b in batches:
            pos = torch.full((n,), -1, dtype=torch.long, device=logits.device)
            pos[b] = torch.arange(len(b), device=logits.device)
            self_index.append(pos)
        rows = self._lr_rows(logits, labels)
        clean = self._lid_features(feats, self_index)[rows]
        adv = None
        if adv_images is not None:
            _, adv_feats = _chunked(model, adv_images, self.layers, p.pool)
            adv = self._lid_features(adv_feats)[rows]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        self.combiner = Combiner([1.0] * len(self.layers)).fit(clean, adv, seed)
        return self

    def _lid_features(self, feats: list[torch.Tensor], self_index=None) -> torch.Tensor:
        """``N x L`` LIDs averaged over the reference batches."""
        per_layer = []
        for j, f in enumerate(feats):
            vals = [lid(f, ref[j], self.params.k, None if self_index is None else self_index[r])
                    for r, ref in enumerate(self.references)]
            per_layer.append(torch.stack(vals).mean(0))
        return torch.stack(per_layer, 1)

    def lid_features(self, model, x: torch.Tensor) -> torch.Tensor:
        """``N x L``: the input's LID per layer (the logistic regression's features)."""
        self._require_fitted()
        if _wants_grad(x):
            _, feats = forward_features(_module(model), x, self.layers, pool=self.params.pool, grad=True)
        else:
            _, feats = _chunked(_module(model), x, self.layers, self.params.pool)
        return self._lid_features(feats)

    def score(self, model, x):
        return self.combiner(self.lid_features(model, x))


# -- UAD ------------------------------------------------------------------------------


class UADParams(Params):
    classes: Literal["none", "predicted"] = Field(
        "none",
        description="One Gaussian of all clean features (unsupervised), or class-conditional on the model's predictions.",
    )
    shrinkage: Literal["auto", "ledoit-wolf", "none"] = Field(
        "auto", description="Covariance: Ledoit-Wolf when dim > n/10 ('auto'), always, or the empirical one."
    )
    fpr: float = Field(0.05, gt=0.0, lt=1.0, description="False-positive rate of the threshold set at fit (95 % TNR).")
    validation_fraction: float = Field(
        0.2, ge=0.0, lt=1.0,
        description="Share of the clean images held out of the Gaussian to set the threshold; 0 uses the fit images.",
    )


class UADDetector(Detector):
    """Unsupervised adversarial detection (Li, Pan & Zhu, ISBI 2021, arXiv 2006.13555;
    methods.md 10.2).

    The paper's exact form is a gap; following methods.md 10.2 [MEM/DESIGN] it is the MGM
    detector of 9.1 (:class:`MahalanobisDetector`) on the penultimate features of clean
    images (meant to be those of the SSAT-trained model, labelled and unlabelled images
    alike), fitted without any adversarial example: ``adv_images`` is ignored and
    ``labels`` may be None. [DESIGN] Because unlabelled images have no labels, the default
    is one Gaussian of all clean features (``classes='none'``); ``'predicted'`` keys
    class-conditional Gaussians with a shared covariance on the model's predictions (the
    score is then the distance to the nearest class mean). The score is the squared
    Mahalanobis distance. The fit also sets :attr:`threshold` at ``fpr`` (95 % TNR by
    default) on a held-out ``validation_fraction`` of the clean images [DESIGN], so
    :meth:`detect` works right after ``fit``.
    """

    name = "uad"
    Params = UADParams

    def export_state(self) -> dict:
        return dict(super().export_state(), mgm=self.mgm.export_state(), mgm_params=self.mgm.params.model_dump(mode="json"))

    def load_state(self, state, device=None):
        super().load_state(state, device)
        params = MahalanobisParams.model_validate(state["mgm_params"])
        self.mgm = MahalanobisDetector(params).load_state(state["mgm"], device)
        return self

    def fit(self, model, images, labels, generator, adv_images=None):
        p: UADParams = self.params
        n = len(images)
        held = int(round(p.validation_fraction * n))
        if n - held < 2:
            held = 0
        order = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
        fit_rows, val_rows = order[held:], order[:held]
        self.mgm = MahalanobisDetector(
            MahalanobisParams(layers=[PENULTIMATE], classes=p.classes, assign="min", shrinkage=p.shrinkage)
        ).fit(model, images[fit_rows], None, generator)
        self.fitted = True
        with torch.no_grad():
            self.threshold_at_fpr(self.score(model, images[val_rows] if held else images[fit_rows]), p.fpr)
        return self

    def score(self, model, x):
        self._require_fitted()
        return self.mgm.score(model, x)


# -- Medical Aegis: the Shield ----------------------------------------------------------


class ShieldParams(Params):
    layer: str | None = Field(
        None, description="Shallow layer whose feature map the Shield reads; unset: the model's first stage."
    )
    widths: tuple[int, int, int] = Field((64, 128, 256), description="Channels of each S_k's three conv blocks.")
    epochs: int = Field(30, ge=1, le=1000, description="Training epochs of each S_k (Adam).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, le=4096, description="Training minibatch size.")


def _shield_net(in_channels: int, num_classes: int, widths: Sequence[int], dims: int) -> nn.Module:
    """[DESIGN] 3 conv-BN-ReLU blocks of stride 2, global average pooling, a linear layer."""
    from medaudit.plugins.defenses._modules import _MeanLast

    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    layers: list[nn.Module] = []
    for width in widths:
        layers += [conv(in_channels, width, 3, stride=2, padding=1, bias=False), norm(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers, nn.Flatten(2), _MeanLast(), nn.Linear(in_channels, num_classes))


class ShieldDetector(Detector):
    """The Shield of Medical Aegis (Yao, He, Yu & Zhou 2021/2024; methods.md 1.2): per
    class ``k`` a small CNN ``S_k`` regresses the protected model's logits from the feature
    map of a shallow layer (the "robust trail"); the score is
    ``|| S_khat(h(x)) - F(x) ||_2`` with ``khat`` the predicted class.

    [DESIGN] choices where the paper is silent (methods.md 1.2): the layer is the model's
    first stage (:func:`stage_layers`) unless named; ``S_k`` is trained on the clean images
    the model *predicts* as ``k`` (a class with fewer than two such images borrows the
    network of all images); 3 conv-BN-ReLU blocks (64/128/256, stride 2), global average
    pooling and a linear layer; Adam, lr 1e-3, 30 epochs, mean squared error; the
    protected model stays frozen. No adversarial examples are used (``adv_images`` is
    ignored).
    """

    name = "shield"
    Params = ShieldParams
    STATE = ("layer",)

    def export_state(self) -> dict:
        # Classes that borrowed the fallback network share it: each keeps its own copy of the weights.
        first = self.nets[0]
        shape = {"in_channels": first[0].in_channels, "num_classes": first[-1].out_features,
                 "dims": first[0].weight.dim() - 2}
        return dict(super().export_state(), nets=[net.state_dict() for net in self.nets], **shape)

    def load_state(self, state, device=None):
        super().load_state(state, device)
        self.nets = nn.ModuleList()
        for weights in state["nets"]:
            net = _shield_net(state["in_channels"], state["num_classes"], self.params.widths, state["dims"])
            net.load_state_dict(weights)
            net.to(device if device is not None else weights[next(iter(weights))].device).eval()
            for param in net.parameters():
                param.requires_grad_(False)
            self.nets.append(net)
        return self

    def _trail(self, model: nn.Module, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the shallow feature map, from one forward pass."""
        store: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            store["h"] = output[0] if isinstance(output, (tuple, list)) else output

        handle = dict(model.named_modules())[self.layer].register_forward_hook(hook)
        try:
            with contextlib.nullcontext() if grad else torch.no_grad():
                logits = model(x.to(model_device(model)))
        finally:
            handle.remove()
        return logits.float(), store["h"].float()

    def fit(self, model, images, labels, generator, adv_images=None):
        p: ShieldParams = self.params
        model = _module(model)
        self._check_fit_inputs(images, None, None, need_labels=False)
        self.layer = p.layer or (stage_layers(model) or [None])[0]
        if self.layer not in dict(model.named_modules()):
            raise ValueError(f"the model has no module {self.layer!r} to read the Shield's features from")
        parts = [self._trail(model, images[i : i + CHUNK], grad=False) for i in range(0, len(images), CHUNK)]
        logits, trail = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        if trail.dim() < 4:
            raise ValueError(f"layer {self.layer!r} gives no spatial feature map; name a convolutional stage")
        k, device = logits.shape[1], logits.device
        predicted = logits.argmax(1)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
        fallback = None
        self.nets = nn.ModuleList()
        for c in range(k):
            rows = (predicted == c).nonzero().flatten()
            if len(rows) < 2:
                if fallback is None:
                    fallback = self._train(trail, logits, torch.arange(len(trail), device=device), generator)
                self.nets.append(fallback)
            else:
                self.nets.append(self._train(trail, logits, rows, generator))
        self.fitted = True
        return self

    def _train(self, trail, logits, rows, generator) -> nn.Module:
        p: ShieldParams = self.params
        net = _shield_net(trail.shape[1], logits.shape[1], p.widths, trail.dim() - 2).to(trail.device)
        optimizer = torch.optim.Adam(net.parameters(), lr=p.lr)
        net.train()
        with torch.enable_grad():
            for _ in range(p.epochs):
                order = rows[torch.randperm(len(rows), generator=generator, device=generator.device).to(rows.device)]
                for i in range(0, len(order), p.batch_size):
                    batch = order[i : i + p.batch_size]
                    if len(batch) < 2:
                        continue  # batch norm needs two samples
                    loss = (net(trail[batch]) - logits[batch]).pow(2).sum(1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        net.eval()
        for param in net.parameters():
            param.requires_grad_(False)
        return net

    def score(self, model, x):
        self._require_fitted()
        logits, trail = self._trail(_module(model), x, grad=_wants_grad(x))
        expected = torch.stack([net(trail) for net in self.nets])  # K x N x K
        chosen = expected[logits.argmax(1), torch.arange(len(x), device=logits.device)]
        return (chosen - logits).norm(dim=1)


__all__ = [
    "AUTO", "PENULTIMATE", "Combiner", "Detector", "DetectorParams", "KernelDensityDetector", "KernelDensityParams",
    "LIDDetector", "LIDParams", "MahalanobisDetector", "MahalanobisParams", "ShieldDetector", "ShieldParams",
    "UADDetector", "UADParams", "auroc",
    "features", "forward_features", "ledoit_wolf", "lid", "resolve_layers", "stage_layers", "threshold_at_fpr",
    "tpr_at_fpr",
]


def __getattr__(name: str):
    """Modules moved to :mod:`._modules` (defining them needs torch), still importable from here."""
    if name in {"_MeanLast"}:
        from medaudit.plugins.defenses import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
