"""Detector defenses: mahalanobis, kd-bu, lid, uad, medical-aegis.

The detectors themselves (fit, score) are library code in :mod:`._detectors`.

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
unsupervised combination documented in :mod:`medaudit.plugins.defenses._detectors`): a detector
fitted on FGSM examples at one budget looks better against that attack than it is.
``fit_attack_eps`` fits the supervised variants on FGSM examples of the training split.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import AttackContext, Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.lazy import nn, torch
from medaudit.core.models import prepare_for_audit
from medaudit.core.perturbation import input_gradient
from medaudit.core.probes import model_device
from medaudit.plugins.defenses import _detectors as lib
from medaudit.plugins.defenses._adversarial_training import standard_training
from medaudit.plugins.defenses._common import TrainingData, check_disjoint, fingerprint

if TYPE_CHECKING:
    from medaudit.core.adaptive import DetectorScore

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
    #: The detector class of :mod:`medaudit.plugins.defenses._detectors`.
    detector_cls: ClassVar[type[lib.Detector]]

    def prepare(self, context: AttackContext) -> None:
        ref: TrainingData = self.params.train_data
        self.train = context.load_dataset(ref.dataset, ref.params)
        self.device = context.device
        if len(self.train) < 8:
            raise ValueError(f"train_data has {len(self.train)} images; a detector needs at least 8")

    #: Whether :meth:`protect` returns a changed copy of the classifier, whose weights the
    #: fitted state then keeps (:meth:`shell` rebuilds its architecture).
    copies_classifier: ClassVar[bool] = False

    def protect(self, module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Module, dict]:
        """The classifier the detector guards, and facts for the report: the audited one by
        default (Medical Aegis cushions it and may fine-tune it on ``images``)."""
        return module, {}

    def shell(self, module: nn.Module) -> nn.Module:
        """:meth:`protect`'s architecture without its training, for the restored weights."""
        return module

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        from medaudit.core.adaptive import DetectorScore, JointView

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
            screen=scorer,
            adaptive_module=JointView(protected, scorer),
            fingerprint=fingerprint(self, model, self.train),
            description=f"{model.description}, behind a {detector.name} detector fitted on {len(fit_rows)} cases of "
            f"{p.train_data.dataset}",
            source={**model.source, "training": facts},
        )

    def export_state(self, defended: LoadedModel) -> dict[str, Any]:
        """The fitted detector, its threshold and scale, the guarded classifier's weights
        when it is a trained copy, and what the report says of the fit."""
        scorer: DetectorScore = defended.screen
        return {
            "detector": scorer.detector.export_state(),
            "threshold": scorer.threshold,
            "scale": scorer.scale,
            "classifier": scorer.model.state_dict() if self.copies_classifier else None,
            "fingerprint": defended.fingerprint,
            "description": defended.description,
            "facts": defended.source.get("training"),
        }

    def restore(self, model: LoadedModel, data: LoadedData, state: dict[str, Any]) -> LoadedModel:
        from medaudit.core.adaptive import DetectorScore, JointView

        device = model_device(model.module)
        protected = model.module
        if state["classifier"] is not None:
            protected = self.shell(model.module)
            protected.load_state_dict(state["classifier"])
            protected.to(device)
        protected = prepare_for_audit(protected)
        detector_params = self.detector_cls.Params.model_validate(
            self.params.model_dump(include=set(self.detector_cls.Params.model_fields)))
        detector = self.detector_cls(detector_params).load_state(state["detector"], device)
        scorer = DetectorScore(protected, detector, state["threshold"], state["scale"])
        return dataclasses.replace(
            model,
            module=protected,
            screen=scorer,
            adaptive_module=JointView(protected, scorer),
            fingerprint=state["fingerprint"],
            description=state["description"],
            source={**model.source, "training": state["facts"]},
        )


def _fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    with torch.enable_grad():
        _, grad = input_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


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
    copies_classifier = True

    def shell(self, module):
        from medaudit.core.adaptive import TransformDefended
        from medaudit.plugins.defenses._modules import Cushion

        return TransformDefended(copy.deepcopy(module), Cushion(self.params))

    def protect(self, module, images, labels):
        p = self.params
        cushioned = self.shell(module)
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


@hookimpl
def register_defenses(register):
    for cls in (Mahalanobis, KdBu, Lid, Uad, MedicalAegis):
        register(cls)


def __getattr__(name: str):
    """Modules moved to :mod:`._modules` (defining them needs torch), still importable from here."""
    if name in {"Cushion"}:
        from medaudit.plugins.defenses import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
