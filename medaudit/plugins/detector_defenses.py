"""Built-in detector defenses (``mahalanobis``, ``kd-bu``, ``lid``, ``uad``), Medical Aegis
(``medical-aegis``), ``ensemble`` and ``detect-then-route``.

A detector defense keeps the classifier and adds a detector that rejects inputs scoring
above a threshold. The threshold is set at ``fpr`` (5 %) on clean images of the training
split held out of the detector's fit (``calibration_fraction``), never on the evaluation
data. How the runner counts (DESIGN.md; methods.md 10.3):

- a clean input the detector rejects is an error (the cost of the detector);
- an adversarial input is defended when it is rejected or still classified correctly; so
  robust accuracy is one minus the "adversarial risk" of methods.md 10.3, over the cases
  classified correctly and not rejected when clean.

Each attack runs twice. The naive attack fools the classifier and ignores the detector;
the adaptive one attacks classifier and detector jointly (:class:`JointView`: an input
counts as fooling the view only if the classifier is fooled and the detector does not
flag it). For every (attack, epsilon) the report gives the detector's AUROC and its TPR at
5 % FPR on the evaluation data (clean cases against the adversarial inputs that fool the
classifier), and its TPR at the deployed threshold.

Detectors are fitted without adversarial examples by default (each falls back to the
unsupervised combination documented in :mod:`medaudit.plugins.detectors`): a detector
fitted on FGSM examples at one budget looks better against that attack than it is.
``fit_attack_eps`` fits the supervised variants on FGSM examples of the training split.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medaudit import hookimpl
from medaudit.core.adaptive import DetectorScore, JointView, RoutedModel, SoftRoutedView, TransformDefended
from medaudit.core.components import AttackContext, Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.models import prepare_for_audit
from medaudit.core.perturbation import input_gradient
from medaudit.plugins import detectors as lib
from medaudit.plugins.adversarial_training import standard_training
from medaudit.plugins.input_transforms import Gaussian, GaussianParams
from medaudit.plugins.trained_defenses import TrainingData, check_disjoint

#: Bump when fitting changes, so a resumed run does not mix detectors.
RECIPE_VERSION = 1

JOINT = (
    "Joint attack on classifier and detector: the true class's logit becomes "
    "max(z_y, max_j z_j + (score - threshold) / scale), so an input fools this view only if it "
    "fools the classifier undetected (Carlini & Wagner 2017, with the detected class folded into the true one)."
)


class DetectorDefenseParams(Params):
    train_data: TrainingData = Field(description="Clean training split the detector is fitted and calibrated on.")
    fpr: float = Field(0.05, gt=0.0, lt=1.0, description="False-positive rate of the threshold, on held-out clean images.")
    calibration_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="Share of the training split held out of the fit to set the threshold."
    )
    fit_attack_eps: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fit the supervised variants on FGSM examples (L-inf, this budget) of the training split; "
        "unset: no adversarial examples (unsupervised fallbacks).",
    )
    seed: int = Field(0, ge=0, description="Seed of the split and the fit.")


class _DetectorDefense(Defense):
    """A classifier behind a detector (see the module docstring)."""

    tasks = frozenset({Task.CLASSIFICATION})
    adaptive = JOINT
    #: The detector class of :mod:`medaudit.plugins.detectors`.
    detector_cls: ClassVar[type[lib.Detector]]

    def prepare(self, context: AttackContext) -> None:
        ref: TrainingData = self.params.train_data
        self.train = context.load_dataset(ref.dataset, ref.params)
        self.device = context.device
        if len(self.train) < 8:
            raise ValueError(f"train_data has {len(self.train)} images; a detector needs at least 8")

    def protect(self, module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Module, dict]:
        """The classifier the detector guards, and facts for the report: the audited one by
        default (Medical Aegis cushions it and may fine-tune it on ``images``)."""
        return module, {}

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        check_disjoint(self.train, data)
        p = self.params
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(p.seed)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(p.seed))
        held = max(4, round(p.calibration_fraction * len(order)))
        fit_rows, cal_rows = order[held:], order[:held]
        x = self.train.images[fit_rows].to(self.device)
        y = self.train.labels[fit_rows].to(self.device)
        protected, protect_facts = self.protect(model.module, x, y)
        protected = prepare_for_audit(protected)
        adv = _fgsm(protected, x, y, p.fit_attack_eps) if p.fit_attack_eps and self.detector_cls.uses_adversarial else None
        detector_params = self.detector_cls.Params.model_validate(p.model_dump(include=set(self.detector_cls.Params.model_fields)))
        detector = self.detector_cls(detector_params).fit(protected, x, y, generator, adv)
        with torch.no_grad():
            calibration = detector.score(protected, self.train.images[cal_rows].to(self.device))
        threshold = float(lib.threshold_at_fpr(calibration, p.fpr))
        scorer = DetectorScore(protected, detector, threshold, float(calibration.float().std()))
        facts = {
            "detector": detector.name,
            "fit_cases": len(fit_rows),
            "calibration_cases": len(cal_rows),
            "threshold": threshold,
            "calibration_fpr": float((calibration > threshold).float().mean()),
            "fitted_on_adversarial": adv is not None,
            **protect_facts,
            "train_seconds": round(time.perf_counter() - started, 3),
        }
        return dataclasses.replace(
            model,
            module=protected,
            detector=scorer,
            adaptive_module=JointView(protected, scorer),
            fingerprint=_fingerprint(self, model, self.train),
            description=f"{model.description}, behind a {detector.name} detector fitted on {len(fit_rows)} cases of "
            f"{p.train_data.dataset}",
            source={**model.source, "training": facts},
        )


def _fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    with torch.enable_grad():
        _, grad = input_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def _fingerprint(defense: Defense, model: LoadedModel, train: LoadedData | None = None, parts: tuple = ()) -> str:
    """The defended system's identity: what it is built from (fitting is seeded)."""
    config = {"defense": defense.name, "params": defense.params.model_dump(mode="json"), "model": model.fingerprint,
              "train": train.fingerprint if train is not None else None, "parts": list(parts), "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class MahalanobisDefenseParams(lib.MahalanobisParams, DetectorDefenseParams):
    pass


class Mahalanobis(_DetectorDefense):
    """Mahalanobis detector on deep features (Lee et al. 2018; the MGM of Li & Zhu 2020,
    methods.md 9.1) in front of the classifier; attacked naively and jointly."""

    name = "mahalanobis"
    Params = MahalanobisDefenseParams
    detector_cls = lib.MahalanobisDetector


class KdBuDefenseParams(lib.KernelDensityParams, DetectorDefenseParams):
    mc_samples: int = Field(20, ge=2, le=1000, description="Stochastic forward passes for the uncertainty (Feinman: 50).")


class KdBu(_DetectorDefense):
    """Kernel density and Bayesian uncertainty (Feinman et al. 2017; methods.md 9.2-9.3) in
    front of the classifier; attacked naively and jointly."""

    name = "kd-bu"
    Params = KdBuDefenseParams
    detector_cls = lib.KernelDensityDetector


class LidDefenseParams(lib.LIDParams, DetectorDefenseParams):
    pass


class Lid(_DetectorDefense):
    """Local intrinsic dimensionality of deep features (Ma et al. 2018, 2021; methods.md
    9.2, 9.4) in front of the classifier; attacked naively and jointly."""

    name = "lid"
    Params = LidDefenseParams
    detector_cls = lib.LIDDetector


class UadDefenseParams(lib.UADParams, DetectorDefenseParams):
    pass


class Uad(_DetectorDefense):
    """UAD, unsupervised adversarial detection (Li, Pan & Zhu 2021; methods.md 10.2): one
    Gaussian of clean penultimate features, no adversarial examples; best on an SSAT model."""

    name = "uad"
    Params = UadDefenseParams
    detector_cls = lib.UADDetector


class MedicalAegisParams(lib.ShieldParams, DetectorDefenseParams):
    cushion: Literal["gaussian", "resample", "fft"] = Field(
        "gaussian", description="Cushion low-pass: Gaussian blur, down- then up-sampling, or an ideal FFT low-pass."
    )
    sigma: float = Field(1.0, gt=0, le=10, description="Gaussian cushion: standard deviation in pixels.")
    factor: int = Field(2, ge=2, le=8, description="Resample cushion: down-sampling factor (bilinear).")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="FFT cushion: centred fraction of frequencies kept per axis.")
    fine_tune_epochs: int = Field(
        5, ge=0, le=1000,
        description="Fine-tune a copy of the classifier on cushioned training images (cross-entropy, Adam); 0: not at all.",
    )
    fine_tune_lr: float = Field(1e-3, gt=0, description="Learning rate of the fine-tune.")


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


class MedicalAegis(_DetectorDefense):
    """Medical Aegis (Yao et al. 2021; methods.md 1): the Cushion, a low-pass filter in
    front of the classifier, and the Shield, per-class CNNs predicting the classifier's
    logits from a shallow feature map, whose deviation flags attacks. Attacked naively
    (through the Cushion, ignoring the Shield) and jointly (methods.md 1.2's adaptive
    attack: fool the classifier while keeping the Shield's deviation low).

    A copy of the classifier is fine-tuned on cushioned images of the fit split
    (``fine_tune_epochs``; methods.md 1.2 asks for at most about a point of clean accuracy
    lost), then the Shield is trained on it. Both are seeded, neither is cached.
    """

    name = "medical-aegis"
    Params = MedicalAegisParams
    detector_cls = lib.ShieldDetector

    def protect(self, module, images, labels):
        p = self.params
        cushioned = TransformDefended(copy.deepcopy(module), Cushion(p))
        if p.fine_tune_epochs == 0:
            return cushioned, {"fine_tune": None}
        for param in cushioned.parameters():
            param.requires_grad_(True)
        with torch.enable_grad():
            facts = standard_training(
                cushioned, images, labels, generator=torch.Generator().manual_seed(p.seed), epochs=p.fine_tune_epochs,
                batch_size=32, optimizer="adam", lr=p.fine_tune_lr, weight_decay=0.0,
            )
        return cushioned, {"fine_tune": {k: facts[k] for k in ("epochs", "optimizer_steps", "final_loss") if k in facts}}


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loader: str = Field(description="A registered model loader.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params.")


class EnsembleParams(Params):
    members: list[ModelSpec] = Field(min_length=1, description="The other members (e.g. the same network from other seeds).")
    include_audited: bool = Field(True, description="The audited model is a member too.")


class EnsembleModule(nn.Module):
    """``log(mean_m softmax(f_m(x)))``: the average of the members' probabilities, as logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([m(x).float().log_softmax(1) for m in self.members])
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(self.members))))


class Ensemble(Defense):
    """Ensemble of Paul et al. (2020; methods.md 11.5): the average of several models'
    softmax probabilities. Differentiable, so the attacks see its exact gradient. Train the
    members yourself (Paul et al.: several random initialisations, adversarial images in
    the training set) and list their checkpoints."""

    name = "ensemble"
    Params = EnsembleParams
    tasks = frozenset({Task.CLASSIFICATION})

    def prepare(self, context: AttackContext) -> None:
        self.members = [context.load_model(m.loader, m.params) for m in self.params.members]

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        members = ([model] if self.params.include_audited else []) + self.members
        for i, m in enumerate(self.members):
            if m.num_classes != model.num_classes or m.task is not model.task:
                raise ValueError(f"members[{i}] gives {m.num_classes} {m.task.value} classes; the audited model "
                                 f"{model.num_classes} {model.task.value} classes")
        return dataclasses.replace(
            model,
            module=prepare_for_audit(EnsembleModule([m.module for m in members])),
            fingerprint=_fingerprint(self, model, parts=tuple(m.fingerprint for m in members)),
            description=f"ensemble of {len(members)} models (mean of softmax probabilities)",
            source={**model.source, "members": [m.description for m in members]},
            adaptive_module=None,
        )


class DefenseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A registered defense.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params.")


class RouteParams(Params):
    detector: DefenseSpec = Field(description="A detector defense (e.g. mahalanobis) that decides the route.")
    robust: DefenseSpec = Field(description="The defense whose model takes the flagged inputs (e.g. pgd-at).")


class DetectThenRoute(Defense):
    """Detect-then-route, the survey's proposal (Hu, Wen & Fang 2023, Discussion): inputs a
    detector flags go to an adversarially trained model, the others to the audited model.
    Nothing is rejected; the report gives the composite's clean and robust accuracy. The
    adaptive attack differentiates a soft routing (:class:`SoftRoutedView`)."""

    name = "detect-then-route"
    Params = RouteParams
    tasks = frozenset({Task.CLASSIFICATION})
    adaptive = ("BPDA through the routing: the exact routed outputs forward, the backward pass of "
                "(1 - w) softmax(standard) + w softmax(robust), w = sigmoid((score - threshold) / scale).")

    def prepare(self, context: AttackContext) -> None:
        self.context = context

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        p = self.params
        guarded = self.context.apply_defense(p.detector.name, p.detector.params)
        if guarded.detector is None:
            raise ValueError(f"detector: {p.detector.name!r} is not a detector defense")
        robust = self.context.apply_defense(p.robust.name, p.robust.params)
        routed = RoutedModel(model.module, robust.module, guarded.detector)
        return dataclasses.replace(
            model,
            module=prepare_for_audit(routed),
            adaptive_module=prepare_for_audit(SoftRoutedView(routed)),
            fingerprint=_fingerprint(self, model, parts=(guarded.fingerprint, robust.fingerprint)),
            description=f"{p.detector.name} routes flagged inputs to {robust.description}",
            source={**model.source, "training": {"detector": guarded.source.get("training"),
                                                 "robust": robust.source.get("training")}},
        )


@hookimpl
def register_defenses(register):
    for cls in (Mahalanobis, KdBu, Lid, Uad, MedicalAegis, Ensemble, DetectThenRoute):
        register(cls)
