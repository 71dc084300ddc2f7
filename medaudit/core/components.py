"""Base classes of everything a plugin can provide.

A component is a class with a ``name``, the tasks and dimensionalities it supports, a
pydantic ``Params`` model (closed: unknown keys are errors) and one method that does the
work. Plugins hand the classes (not instances) to ``register`` in the hooks of
:mod:`medaudit.core.hookspecs`; the runner instantiates them with validated params.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterator, Sequence, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from medaudit.core.privacy import UNKNOWN_SOURCE

if TYPE_CHECKING:
    import jinja2
    import torch


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class Norm(str, enum.Enum):
    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"


class Access(str, enum.Enum):
    """What an attack needs from the model, from most to least access."""

    GRADIENTS = "gradients"  #: white box: input gradients
    SCORES = "scores"  #: logits or probabilities, no gradients
    DECISIONS = "decisions"  #: the predicted label only


class Facet(str, enum.Enum):
    """What a job's records hold, declared by the record file (``records/<id>.meta.json``):
    results, figures and reports ask for facets, never for the presence of a key."""

    CLASSIFICATION = "classification"  #: label, clean_pred, adv_pred (clean_correct, adv_correct on read)
    SEGMENTATION = "segmentation"  #: per-class clean_/adv_ dice, iou, hd95 and pixel accuracy
    PERTURBATION = "perturbation"  #: attacked, linf, l2, in_range
    FINITE = "finite"  #: clean_finite, adv_finite: were all the model's outputs finite
    REJECTION = "rejection"  #: a rejecting defense's :class:`Screen`: clean_rejected, adv_rejected
    DETECTION_SCORE = "detection_score"  #: a detector's :class:`Screen`: clean_score, adv_score (higher: more suspect)
    MINIMUM_NORM = "minimum_norm"  #: min_norm: the smallest fooling perturbation found (None: none)
    TARGET = "target"  #: targeted segmentation: target_dice, target_pixel_accuracy, target_changed, target_hit
    EXTRAS = "extras"  #: ``extras``: an attack's per-sample values (PSNR, queries...)
    CASE_SCORES = "case_scores"  #: clean_<metric>, adv_<metric> of metrics that score cases
    COVARIATES = "covariates"  #: ``covariates``: the data set's per-case metadata (site, scanner...)
    PERCEPTIBILITY = "perceptibility"  #: psnr, ssim of each attacked case against its clean image (None elsewhere)
    #: ``carried`` (``runtime.strategy: verdict``): the job whose adversarial the case took
    #: over instead of being attacked again (None: attacked by this job, or not at all)
    CARRIED = "carried"


class AttackFamily(str, enum.Enum):
    """How an attack searches, declared as data so the strength checks (Carlini et al. 2019)
    hold for vendors' attacks too: iterative >= single-step, white-box >= score- and
    decision-based. A transfer attack (e.g. TI-FGSM) is meant to be weaker white-box."""

    SINGLE_STEP = "single-step"
    ITERATIVE = "iterative"
    MINIMUM_NORM = "minimum-norm"
    SCORE_BASED = "score-based"
    DECISION_BASED = "decision-based"
    TRANSFER = "transfer"
    UNIVERSAL = "universal"
    #: Natural or acquisition variation (noise, blur, artefacts): no search, so it is
    #: compared with no other family; sized by its own :class:`Budget`, not a norm.
    CORRUPTION = "corruption"
    OTHER = "other"


class Params(BaseModel):
    """Parameters of a component: closed, documented, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(value: Any, info: ValidationInfo) -> Path:
    """Resolve a path relative to the spec file's folder (passed as validation context)."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


_INPUT = object()  # marks InputPath among a field's annotations

#: A params field naming a file or folder the component reads, relative to the spec's
#: folder. Spec validation lists every one that does not exist (:func:`missing_inputs`),
#: so ``medaudit validate`` and ``medaudit run`` refuse it before anything loads.
InputPath = Annotated[Path, BeforeValidator(resolve_path), _INPUT]


def missing_inputs(params: Params) -> list[tuple[str, Path]]:
    """The :data:`InputPath` fields of ``params`` (also ``InputPath | None``) whose path does
    not exist, as (field name, resolved path)."""
    missing = []
    for name, field in type(params).model_fields.items():
        marked = _INPUT in field.metadata or any(
            get_origin(arg) is Annotated and _INPUT in get_args(arg)[1:] for arg in get_args(field.annotation)
        )
        value = getattr(params, name)
        if marked and isinstance(value, Path) and not value.exists():
            missing.append((name, value))
    return missing


class Component(abc.ABC):
    """Shared shape of all components."""

    #: Name used in specs; unique within its kind across all plugins.
    name: ClassVar[str]
    #: Tasks the component supports.
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CLASSIFICATION})
    #: Spatial dimensionalities supported (2 for images, 3 for volumes).
    dims: ClassVar[frozenset[int]] = frozenset({2})
    #: Parameters; subclass :class:`Params` and set this.
    Params: ClassVar[type[Params]] = Params

    #: Filled in by the registry: the plugin (and its distribution) that provided it.
    plugin: ClassVar[str] = ""

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def summary(cls) -> str:
        """First paragraph of the docstring, on one line: what ``medaudit plugins`` and the
        report show."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


# -- models ---------------------------------------------------------------------------


class Screen:
    """What a defense adds to every case's record, clean and under attack: a detector's
    score and whether it rejects the input, say. The records keep each field ``f`` of
    :attr:`fields` as ``clean_f`` and, in an attack job, ``adv_f`` (None for the cases not
    attacked). A screen that rejects inputs declares facet REJECTION and writes a boolean
    ``rejected``; records then follow the rejection rule for every such defense alike: a
    rejected clean input is an error, a rejected input under attack a defended case.
    The default screen adds nothing."""

    #: The facets the screen's fields give the records (REJECTION for a rejecting defense).
    facets: ClassVar[frozenset[Facet]] = frozenset()
    #: The per-case fields :meth:`examine` returns, as class data so readers know them before a batch runs.
    fields: ClassVar[tuple[str, ...]] = ()

    def examine(self, x: "torch.Tensor") -> "dict[str, list]":
        """One value per input of ``x`` for each of :attr:`fields` (JSON-able), without gradients."""
        return {}


#: The screen of a defended model that adds nothing to the records.
NO_SCREEN = Screen()


@dataclasses.dataclass
class LoadedModel:
    """A model ready to audit.

    ``module`` maps pixel-space input in [0, 1] (``N x C x H x W``) to logits; any
    normalisation lives inside it so that attacks differentiate through it. It is in eval
    mode with frozen parameters.
    """

    module: "torch.nn.Module"
    task: Task
    num_classes: int
    in_channels: int
    #: What the model gives an attacker (an ONNX model gives scores only).
    access: frozenset[Access]
    #: sha256 of the weights (the checkpoint file, or the state dict when built in memory).
    fingerprint: str
    description: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: A defense's adaptive view (see :class:`Defense`): the same outputs as ``module`` with
    #: gradients an attacker can use; None when ``module``'s own gradients serve.
    adaptive_module: "torch.nn.Module | None" = None
    #: What the defense adds to each case's record (:class:`Screen`), e.g. a detector
    #: defense's scorer (:class:`medaudit.core.adaptive.DetectorScore`), which rejects the
    #: inputs scoring above its threshold. None: nothing added, nothing rejected.
    screen: "Screen | None" = None
    #: Why ``access`` lacks something, for the planner's messages (e.g. "the model is an
    #: ONNX graph run by onnxruntime: no gradients"); empty when nothing is missing.
    access_reason: str = ""
    #: A defense's views other than the deployed system itself, by name (see
    #: :attr:`Defense.views`); ``adaptive_module`` is the view "adaptive".
    views: "dict[str, torch.nn.Module]" = dataclasses.field(default_factory=dict)

    def view(self, name: str) -> "torch.nn.Module":
        """The module an attack on view ``name`` differentiates (``naive``: the deployed ``module``)."""
        if name == "naive":
            return self.module
        if name == "adaptive" and self.adaptive_module is not None:
            return self.adaptive_module
        return self.views[name]


class ModelLoader(Component):
    """Builds a :class:`LoadedModel` from its params (checkpoint path, architecture...)."""

    #: The access every model of this loader gives, when known without loading it (e.g. an
    #: ONNX graph: scores and decisions), and why anything is missing: validation then
    #: refuses attacks that need more. None: known only once loaded (checked then).
    access: ClassVar[frozenset[Access] | None] = None
    access_reason: ClassVar[str] = ""

    @abc.abstractmethod
    def load(self, task: Task) -> LoadedModel:
        ...


# -- data -----------------------------------------------------------------------------


class _Materialised:
    """A LoadedData field (``images``, ``masks``) that a lazy data set builds from its cases
    on first read: small auxiliary sets (a defense's fit data) may read it; the audit engine
    never does for the evaluation set, which it reads through :meth:`LoadedData.batches`."""

    def __init__(self, name: str):
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the dataclass default
        value = obj.__dict__.get(self.slot)
        if value is None and obj.__dict__.get("_lazy"):
            value = obj._materialise(self.name)
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


class TensorCases:
    """The cases of an in-memory data set (index -> case dict), so that tensors and lazy
    readers look the same to the engine. Implements ``torch.utils.data.Dataset``'s protocol."""

    def __init__(self, images: "torch.Tensor", labels: "torch.Tensor", masks: "torch.Tensor | None" = None):
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, "torch.Tensor"]:
        case = {"image": self.images[i], "label": self.labels[i]}
        if self.masks is not None:
            case["mask"] = self.masks[i]
        return case


@dataclasses.dataclass(eq=False)
class LoadedData:
    """An evaluation set: its cases, labels, pseudonymous case ids and what the run reports.

    Two ways to build it. In memory: ``images`` is ``N x C x H x W`` (or ``N x C x D x H x W``)
    float32 in [0, 1], ``masks`` (segmentation) ``N x H x W`` integer class maps or None; they
    are wrapped as :attr:`cases`. Lazy: pass ``images=None`` and ``cases``, a
    ``torch.utils.data.Dataset`` mapping an index to ``{"image": C x H x W float32 in [0, 1],
    "label": int64 scalar, "mask": int64 H x W}`` ("mask" only when ``mask_class_names`` is
    set), reading or generating one case at a time; ``labels`` stays an in-memory tensor.

    The audit engine reads the evaluation set only through :meth:`batches`, so a lazy set is
    never held whole; ``images``/``masks`` of a lazy set are built on first read (for small
    auxiliary sets: a defense's fit data, a universal perturbation's fit images).
    """

    images: "torch.Tensor | None" = _Materialised("images")
    labels: "torch.Tensor" = None  # type: ignore[assignment]
    case_ids: list[str] = dataclasses.field(default_factory=list)
    class_names: list[str] = dataclasses.field(default_factory=list)
    fingerprint: str = ""
    masks: "torch.Tensor | None" = _Materialised("masks")
    mask_class_names: list[str] | None = None
    description: str = ""
    #: Voxel/pixel size in mm per spatial axis (D, H, W or H, W) shared by every case, for
    #: Hausdorff distances; None when unknown or when the cases differ (see ``case_spacings``).
    spacing: tuple[float, ...] | None = None
    #: Each case's own spacing when the cases do not share one (NIfTI volumes of different
    #: resolutions): distances in mm then use each case's own.
    case_spacings: list[tuple[float, ...]] | None = None
    #: The interval of raw intensities mapped to [0, 1], when it is the same for every case
    #: (e.g. a CT window of [-1000, 400] HU), and its unit: the report restates each budget
    #: in those units (an L-inf budget of 1/255 is 5.5 HU at that window).
    intensity_window: tuple[float, float] | None = None
    intensity_unit: str = "intensity units"
    #: Strings read from the inputs that could identify a patient (DICOM header values of
    #: the PS3.15 basic profile, file and folder names), each mapped to where it came from
    #: (``"file name of case case-…"``). Never written anywhere: the run checks its texts
    #: against them before the jobs and its output files before writing, and refuses if one
    #: appears, naming the sources. A plain set of values (older plugins) gets a generic source.
    sensitive_values: dict[str, str] = dataclasses.field(default_factory=dict)
    #: True when the pixels may carry burned-in identifying text (DICOM without Burned In
    #: Annotation = NO): the run then keeps no example images and the report shows none.
    pixels_may_identify: bool = False
    #: The cases, index -> case dict (see above); built from ``images``/``labels``/``masks``
    #: when not given.
    cases: Any = None
    #: Per-case metadata (site, scanner, sex, age band, lesion size...), one dict per case,
    #: kept in the records (facet COVARIATES); None when the data set has none.
    covariates: list[dict[str, Any]] | None = None
    #: Shape of one case's image, ``(C, H, W)`` or ``(C, D, H, W)``; read from the first case
    #: when not given.
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sensitive_values, dict):
            self.sensitive_values = dict.fromkeys(self.sensitive_values, UNKNOWN_SOURCE)
        images = self.__dict__.get("_images")
        self.__dict__["_lazy"] = self.cases is not None and images is None
        if self.cases is None:
            if images is None:
                raise ValueError("LoadedData needs images or cases")
            self.cases = TensorCases(images, self.labels, self.__dict__.get("_masks"))
        if self.labels is None:
            raise ValueError("LoadedData needs labels (class indices; zeros for segmentation-only data)")
        if self.image_shape is None:
            self.image_shape = tuple(images.shape[1:]) if images is not None else tuple(self.cases[0]["image"].shape)
        self.image_shape = tuple(int(d) for d in self.image_shape)
        if self.covariates is not None and len(self.covariates) != len(self.case_ids):
            raise ValueError(f"{len(self.covariates)} covariate rows for {len(self.case_ids)} cases")

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:  # never materialises a lazy set
        return f"LoadedData({len(self)} cases of {self.image_shape}, {self.description!r})"

    @property
    def has_masks(self) -> bool:
        return self.mask_class_names is not None or self.__dict__.get("_masks") is not None

    @property
    def is_lazy(self) -> bool:
        """True when the cases are read or generated on demand (no tensor of all images)."""
        return bool(self.__dict__.get("_lazy"))

    def _materialise(self, name: str) -> "torch.Tensor | None":
        import torch

        if name == "masks" and not self.has_masks:
            return None
        key = {"images": "image", "masks": "mask"}[name]
        return torch.stack([self.cases[i][key] for i in range(len(self))]).contiguous()

    def batches(
        self, start: int, stop: int, batch_size: int, workers: int = 0, task: "Task | str | None" = None,
        pin_memory: bool = False,
    ) -> "Iterator[tuple[int, torch.Tensor, torch.Tensor]]":
        """Yield ``(batch_start, x, truth)`` for cases ``[start, stop)`` in batches starting at
        ``start``, ``start + batch_size``, ...; ``x`` is float32 in [0, 1], ``truth`` the int64
        class indices (classification) or label maps (segmentation: pass ``task``; without it,
        a data set with masks is ambiguous and refused). Lazy cases are read through a
        ``torch.utils.data.DataLoader`` with ``workers`` processes, into page-locked memory
        with ``pin_memory`` (so a CUDA copy can overlap the next batch's reading); in-memory
        ones are sliced."""
        from torch.utils.data import DataLoader, Subset

        stop = min(stop, len(self))
        if task is None:
            if self.has_masks:
                raise ValueError("this data set has labels and masks: pass task= to batches()")
            task = Task.CLASSIFICATION
        use_masks = Task(task) is Task.SEGMENTATION
        if use_masks and not self.has_masks:
            raise ValueError("segmentation needs masks; this data set has none")
        if not self.is_lazy and isinstance(self.cases, TensorCases):
            truths = self.cases.masks if use_masks else self.labels
            for b in range(start, stop, batch_size):
                e = min(b + batch_size, stop)
                yield b, self.cases.images[b:e], truths[b:e]
            return
        loader = DataLoader(
            Subset(self.cases, range(start, stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate_cases,
            pin_memory=pin_memory,
        )
        b = start
        for batch in loader:
            x = batch["image"]
            truth = batch["mask"] if use_masks else self.labels[b : b + len(x)]
            yield b, x, truth
            b += len(x)


def _collate_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a list of case dicts (the image and truth keys only; metadata
    stays with :attr:`LoadedData.covariates`)."""
    import torch

    return {k: torch.stack([torch.as_tensor(c[k]) for c in cases]) for k in ("image", "label", "mask") if k in cases[0]}


class Dataset(Component):
    """Reads or generates the evaluation data."""

    @abc.abstractmethod
    def load(self) -> LoadedData:
        ...


# -- attacks --------------------------------------------------------------------------


@dataclasses.dataclass
class AttackContext:
    """What an attack may use beyond the batch it is given."""

    #: The evaluation data of the audit.
    data: LoadedData
    #: Loads another registered dataset by name and params (validated), e.g. to fit a
    #: universal perturbation on other images than the ones it is evaluated on.
    load_dataset: Callable[[str, dict[str, Any]], LoadedData]
    device: "torch.device"
    task: Task = Task.CLASSIFICATION
    #: Classes of the audited model's output (segmentation: classes of its label maps).
    num_classes: int = 0
    #: Loads another model by loader name and params (validated), e.g. an ensemble's members.
    load_model: "Callable[[str, dict[str, Any]], LoadedModel] | None" = None
    #: Applies another registered defense (name, params) to the audited model, e.g. the
    #: robust model a detect-then-route defense sends flagged inputs to.
    apply_defense: "Callable[[str, dict[str, Any]], LoadedModel] | None" = None


@dataclasses.dataclass
class AttackOutcome:
    """What :meth:`Attack.perturb` may return instead of a bare tensor: the adversarial
    inputs and per-sample extras (one JSON-able value per sample, e.g. ``min_norm``, PSNR,
    queries used) that the records keep under ``extras``."""

    adversarial: "torch.Tensor"
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, result: "torch.Tensor | AttackOutcome") -> "AttackOutcome":
        """What :meth:`Attack.perturb` returned, as an outcome (a bare tensor has no extras)."""
        return result if isinstance(result, AttackOutcome) else cls(result)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How an attack that no L-p norm bounds is sized: a natural corruption's severity, a
    watermark's strength. Its jobs run at the budget's levels (the spec attack's ``levels``,
    or :attr:`levels`), not at the threat model's epsilons, and :meth:`Attack.perturb` gets
    the level as ``eps``. The budget check does not measure an L-p norm for them: each case
    the attack changed records the size it applied under the extra :attr:`measure`, and the
    check holds when every one is at most :meth:`limit` of the job's level.
    """

    #: What a level is called in tables ("severity": rows read ``severity 3``).
    name: str
    #: The levels planned when the spec names none, mildest first.
    levels: tuple[float, ...]
    #: The per-sample extra (:class:`AttackOutcome`) holding the size each case got.
    measure: str
    #: What a level means and where that definition comes from, for the report.
    description: str = ""
    #: The largest ``measure`` a level allows, when it is not the level itself (e.g. a noise
    #: standard deviation of 0.02 per severity step).
    scale: float = 1.0
    #: The measure of each of :attr:`levels`, when a table defines it (a corruption's
    #: severities calibrated against SSIM): then only those levels exist.
    table: tuple[float, ...] | None = None

    def limit(self, level: float) -> float:
        if self.table is None:
            return self.scale * level
        return 0.0 if level == 0 else self.table[self.levels.index(level)]  # level 0: unchanged


#: Loss kinds (:attr:`Attack.loss_kinds`): cross-entropy, and margin-type losses (the logit
#: margin, CW, DLR, the distance to the decision boundary).
CROSS_ENTROPY, MARGIN = "cross-entropy", "margin"


class Attack(Component):
    """An evasion attack in pixel space.

    Subclasses implement :meth:`perturb` in native torch, batched, on the model's device:
    no numpy and no per-step ``.item()`` in the loop. The runner makes one instance per
    attack of the spec and reuses it for every job (defense x epsilon) and batch.
    """

    #: Norms under which the attack bounds its perturbation (empty for an attack sized by
    #: its own :attr:`budget`).
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    #: The attack's own budget when no norm bounds it (:class:`Budget`); None: the threat
    #: model's norm and epsilons.
    budget: ClassVar[Budget | None] = None
    #: True when the attack steers towards a target instead of away from the label.
    targeted: ClassVar[bool] = False
    #: What the attack needs from the model.
    needs: ClassVar[Access] = Access.GRADIENTS
    #: How it searches (:class:`AttackFamily`), for the strength checks.
    family: ClassVar[AttackFamily] = AttackFamily.OTHER
    #: Names of the extras (:class:`AttackOutcome`) :meth:`perturb` always returns, so the
    #: records of cases it was not run on (already wrong) hold them too, as None.
    extra_names: ClassVar[tuple[str, ...]] = ()
    #: The kinds of loss the attack drives (:data:`CROSS_ENTROPY`, :data:`MARGIN`), for the
    #: loss-diversity check (Carlini et al. 2019, C13); empty when it follows no loss.
    loss_kinds: ClassVar[frozenset[str]] = frozenset()

    def losses(self) -> frozenset[str]:
        """The kinds of loss this configuration drives (default :attr:`loss_kinds`)."""
        return self.loss_kinds

    def eot_samples(self) -> int:
        """Draws of the model's randomness each gradient or score of the attack averages over
        (Expectation over Transformation, Athalye et al. 2018); 1: a single draw. A randomised
        model counts as attacked properly only by an attack (or a defense's view) that averages."""
        return int(getattr(self.params, "eot_samples", 1) or 1)

    #: The integer parameters that set how long the attack searches, for :meth:`strengthened`.
    effort_params: ClassVar[tuple[str, ...]] = ("steps", "queries")

    def cost(self, num_classes: int) -> float:
        """Model passes per case the attack may spend, from its params (a gradient step counts
        3: forward and backward), only to run attacks cheapest first under ``runtime.strategy:
        verdict``; a rough, deterministic figure, not a measurement. Default: its largest
        :attr:`effort_params` value (1 without one) times its restarts, target classes (at
        most ``num_classes - 1``) and EOT draws."""
        p = self.params
        effort = [v for k in self.effort_params if isinstance(v := getattr(p, k, None), int)]
        total = float(max(effort, default=1))
        for name in ("restarts", "search_steps"):
            total *= getattr(p, name, None) or 1
        if isinstance(targets := getattr(p, "n_target_classes", None), int):
            total *= max(1, min(targets, num_classes - 1))
        total *= self.eot_samples()
        return total * (3 if self.needs is Access.GRADIENTS else 1)

    def strengthened(self, factor: int) -> "Attack | None":
        """A copy that searches ``factor`` times longer (each of its :attr:`effort_params`), for
        the convergence check (Carlini et al. 2019, C6); None when it has no such parameter."""
        longer = {k: v * factor for k in self.effort_params if isinstance(v := getattr(self.params, k, None), int)}
        return type(self)(self.params.model_copy(update=longer)) if longer else None

    @abc.abstractmethod
    def perturb(
        self,
        model: "torch.nn.Module",
        x: "torch.Tensor",
        y: "torch.Tensor",
        *,
        eps: float,
        norm: Norm,
        generator: "torch.Generator",
    ) -> "torch.Tensor":
        """Return adversarial inputs with ``||x_adv - x|| <= eps`` and values in [0, 1]."""
        ...

    def prepare(self, context: AttackContext) -> None:
        """Called once before any job, before the run directory exists: load or check what
        the attack needs beyond the batch here, so bad input fails early. Raise ValueError
        for a setting that does not fit the audit (the runner reports it as a spec error).
        Default: nothing."""

    def seed_key(self, job: Any) -> str:
        """What the per-batch random seed derives from (with the spec's seed and the batch's
        first case): the job, so each job draws its own random starts. An attack whose
        search does not depend on the budget (minimum norm) returns one key for all its
        epsilons, so every epsilon job sees the same search, in any process."""
        return job.id

    def export_state(self) -> "dict[str, Any] | None":
        """What :meth:`prepare` fitted (e.g. a universal perturbation), as tensors and JSON
        values, so another process restores it instead of fitting again. None: nothing fitted."""
        return None

    def restore_state(self, state: "dict[str, Any]") -> None:
        """Take back what :meth:`export_state` gave, instead of fitting in :meth:`prepare`."""

    def target_masks(self, y: "torch.Tensor") -> "torch.Tensor | None":
        """Targeted segmentation attacks return the label maps they steer the cases with
        truth ``y`` towards, so the runner can score the prediction against them. Default: None."""
        return None


class MinimumNormAttack(Attack):
    """An attack that searches for each sample's smallest fooling perturbation (DeepFool,
    C&W, FAB) instead of working within a budget.

    :meth:`perturb` computes each case's minimal adversarial once per model (cached case by
    case, and seeded by :meth:`seed_key`, which leaves out the budget) and projects it onto
    the eps-ball; each record also carries the minimal perturbation's size (``min_norm``;
    None where none was found), so one run yields a whole robustness curve. A batch searches
    only its cases not cached yet: under ``runtime.strategy: verdict`` a larger budget
    attacks a subset of the cases a smaller one did, and finds them all cached.
    """

    family: ClassVar[AttackFamily] = AttackFamily.MINIMUM_NORM
    extra_names: ClassVar[tuple[str, ...]] = ("min_norm",)
    #: Bytes of minimal adversarials kept (the oldest go first; a case searched again is
    #: found the same way: same seed and batch).
    cache_bytes: ClassVar[int] = 512 * 2**20

    @abc.abstractmethod
    def minimal(
        self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor", *, norm: Norm, generator: "torch.Generator"
    ) -> "torch.Tensor":
        """Return adversarials in [0, 1] as close to ``x`` as found (unbounded)."""

    def seed_key(self, job: Any) -> str:
        """One key per (defense, view, attack): every epsilon job searches the same way."""
        label = job.spec_attack if job.view == "naive" else f"{job.spec_attack}@{job.view}"
        return f"{job.defense}.{label}.minimal"

    def perturb(self, model, x, y, *, eps, norm, generator):
        import hashlib

        import torch

        from medaudit.core.perturbation import project

        cache = self.__dict__.setdefault("_minimal", {})
        rows = x.detach().cpu().contiguous().numpy()
        keys = [(id(model), norm, hashlib.sha256(row.tobytes()).hexdigest(), label)
                for row, label in zip(rows, y.tolist())]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            idx = torch.tensor(missing, device=x.device)
            x_min = self.minimal(model, x[idx], y[idx], norm=norm, generator=generator).detach()
            with torch.inference_mode():
                found = model(x_min).argmax(1) != y[idx]
            flat = (x_min - x[idx]).flatten(1)
            size = flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)
            for j, (i, s, f) in enumerate(zip(missing, size.tolist(), found.tolist())):  # two host syncs in all
                cache[keys[i]] = (x_min[j].clone(), float(s) if f else None)
        x_min, sizes = torch.stack([cache[key][0] for key in keys]), [cache[key][1] for key in keys]
        kept = sum(v[0].numel() * v[0].element_size() for v in cache.values())
        while kept > self.cache_bytes and cache:
            oldest = cache.pop(next(iter(cache)))
            kept -= oldest[0].numel() * oldest[0].element_size()
        x_adv = project(x_min, x, eps, norm) if eps > 0 else x.clone()
        return AttackOutcome(x_adv, {"min_norm": sizes})


# -- defenses -------------------------------------------------------------------------


class Defense(Component):
    """Wraps the audited model (input transform, detector, retrained weights...).

    Every gradient attack runs against the defended model as it is (the *naive* attack)
    and, when the defense sets ``adaptive``, a second time against the ``adaptive_module``
    its :meth:`apply` returns (the *adaptive* attack, e.g. BPDA through a
    non-differentiable transform); the report shows both and the worst case takes the
    stronger per case.
    """

    #: How the adaptive attack sees this defense, for the report; empty when the defended
    #: model's own gradients are exact and useful, so the naive attack is already adaptive.
    #: Shorthand for ``views = {"adaptive": ...}``.
    adaptive: ClassVar[str] = ""
    #: The views an attacker differentiates besides the deployed system (the implicit
    #: ``naive`` view), by name, each with how it sees the defense (BPDA, EOT, a joint
    #: detector view...). Class data, so the planner needs no model: every gradient attack
    #: runs once per view. The defended model's :attr:`LoadedModel.views` holds the modules.
    views: ClassVar[dict[str, str]] = {}
    #: The views that average the deployed system's outputs over its randomness (EOT): an
    #: attack on one of them counts as handling a randomised defense (Carlini et al. 2019, C9).
    averaging_views: ClassVar[frozenset[str]] = frozenset()
    #: Whether :meth:`certify` gives certificates (formal robustness bounds, ISO/IEC 24029-2)
    #: the runner records beside the empirical results.
    certifies: ClassVar[bool] = False

    def certify(self, model: LoadedModel, x: "torch.Tensor", generator: "torch.Generator") -> Any:
        """Certificates for the inputs ``x`` of the undefended ``model``: an object with
        ``rows()`` (per input: ``prediction``, -1 to abstain, and ``radius``) and ``settings()``.
        Only for defenses that set :attr:`certifies`."""
        raise NotImplementedError(f"{self.name} gives no certificates")

    def caveats(self) -> list[str]:
        """Warnings the report shows beside the defense's certificates (e.g. a noise model the
        base classifier was not trained for)."""
        return []

    @classmethod
    def view_names(cls) -> dict[str, str]:
        """The declared views (``views``, or ``{"adaptive": adaptive}`` for the shorthand)."""
        return dict(cls.views) or ({"adaptive": cls.adaptive} if cls.adaptive else {})

    def export_state(self, defended: LoadedModel) -> "dict[str, Any] | None":
        """What :meth:`apply` fitted (a detector's statistics, a threshold), as tensors and
        JSON values, so another process restores the defense instead of fitting it again.
        None: nothing is fitted (apply again is cheap and deterministic)."""
        return None

    def restore(self, model: LoadedModel, data: LoadedData, state: "dict[str, Any]") -> LoadedModel:
        """The defended model rebuilt from :meth:`export_state`'s state, without fitting."""
        return self.apply(model, data)

    def prepare(self, context: "AttackContext") -> None:
        """Load what the defense needs beyond the model, e.g. its training split (through
        ``context.load_dataset``); raise ValueError for a bad configuration."""

    @abc.abstractmethod
    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        """Return the defended model; attacks then run against the returned module."""
        ...


# -- metrics --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricValue:
    """A metric's estimate. Proportions set ``successes`` (Wilson intervals); means over
    cases set ``per_case`` (bootstrap intervals over cases)."""

    value: float
    n: int
    successes: int | None = None
    per_case: tuple[float, ...] | None = None


class Metric(Component):
    """Computes one number from the per-sample records of one (defense, attack, eps) group.

    Records are dicts, one per case (see ``medaudit.audits.records`` for the fields of
    each task): classification records hold ``clean_correct`` and ``adv_correct``,
    segmentation records per-class ``clean_dice`` and ``adv_dice``; all hold ``attacked``,
    ``linf`` and ``l2``.
    """

    #: 'higher' or 'lower': which direction is better (used for worst cases and plots).
    better: ClassVar[str] = "higher"
    #: Whether the metric describes clean performance (computed once per defense).
    clean: ClassVar[bool] = False
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CLASSIFICATION})
    #: The interval every value lies in, e.g. (0, 1) for a proportion: validation refuses an
    #: acceptance threshold that leaves a criterion unable to fail or unable to pass.
    bounds: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
    #: Facets (:class:`Facet`) the records must declare for :meth:`compute` to run on them;
    #: a group without one gets no value.
    needs: ClassVar[frozenset[Facet]] = frozenset()
    #: True when the metric is a rate of one class against the rest: ``compute_class(records,
    #: c)`` gives it per class, and a criterion may name the class (``class:``).
    per_class: ClassVar[bool] = False
    #: True when its value on the worst case can only move to the worse side (``better``) as
    #: more attacks run: it depends on each case only through the worst the attacks did to
    #: it (robust accuracy, robust Dice). ``runtime.strategy: verdict`` then stops at a
    #: criterion that fails before every attack at its budget has run.
    monotone: ClassVar[bool] = False
    #: True when the metric scores each case in the job's batch loop (:meth:`score_cases`),
    #: e.g. from the predicted and true masks, which records do not keep.
    scores_cases: ClassVar[bool] = False

    def score_cases(self, pred: "torch.Tensor", truth: "torch.Tensor", spacing: Any = None) -> list:
        """One JSON-able value per case of the batch (predicted and true class indices or
        label maps; ``spacing`` in mm, per case or shared, or None); the records keep them as
        ``clean_<name>`` and ``adv_<name>``, and :meth:`compute` aggregates them."""
        raise NotImplementedError

    @abc.abstractmethod
    def compute(self, records: Sequence[dict]) -> MetricValue | None:
        ...


# -- report sections ------------------------------------------------------------------


class ReportSection(Component):
    """A section of report.html, rendered from results.json only (so re-rendering works).

    The default :meth:`render` renders ``template`` (a jinja2 template name, found in the
    report's template folders plus ``template_dir``) with ``results``, ``section`` and
    whatever :meth:`context` derives from ``results``.
    """

    #: Position in the report; lower comes first.
    order: ClassVar[int] = 100
    #: Heading shown in the report and its table of contents.
    title: ClassVar[str] = ""
    template: ClassVar[str] = ""
    #: Extra folder holding this section's template (for vendor plugins).
    template_dir: ClassVar[Path | None] = None
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})

    def context(self, results: dict) -> dict[str, Any]:
        """Extra template variables derived from ``results`` (none by default)."""
        return {}

    def render(self, results: dict, env: "jinja2.Environment") -> str:
        return env.get_template(self.template).render(results=results, section=self, **self.context(results))


#: The kinds of component, their base class and the registration hook that provides them.
KINDS: dict[str, tuple[type[Component], str]] = {
    "model": (ModelLoader, "register_models"),
    "dataset": (Dataset, "register_datasets"),
    "attack": (Attack, "register_attacks"),
    "defense": (Defense, "register_defenses"),
    "metric": (Metric, "register_metrics"),
    "report_section": (ReportSection, "register_report_sections"),
}


def component_info(cls: type[Component]) -> dict[str, Any]:
    """A JSON-able description of a component class (for ``medaudit plugins``)."""
    info: dict[str, Any] = {
        "name": cls.name,
        "summary": cls.summary(),
        "tasks": sorted(t.value for t in cls.tasks),
        "dims": sorted(cls.dims),
        "params": cls.Params.model_json_schema(),
    }
    if issubclass(cls, Attack):
        info.update(norms=sorted(n.value for n in cls.norms), targeted=cls.targeted, needs=cls.needs.value)
        if cls.budget is not None:
            info["budget"] = dataclasses.asdict(cls.budget)
    return info
