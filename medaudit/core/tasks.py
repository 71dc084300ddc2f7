"""Task protocols: what a task (classification, segmentation) means for the engine.

One object per :class:`Task` holds what counts as truth, which cases an attack perturbs,
how a batch is scored clean and under attack, the record fields and facets that result,
the worst case over attacks, the headline metric and the conventions the report states.
The engine calls the protocol of the spec's task and has no task branch of its own.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

from medaudit.core.components import Facet, LoadedData, LoadedModel, Task
from medaudit.core.jobs import Records
from medaudit.core.lazy import torch
from medaudit.core.segmentation import case_mean, dense_scores

#: Shown for every audit with a rejecting defense (a detector).
REJECTION_CONVENTION = (
    "Defenses that reject inputs (detectors): a clean input the defense rejects counts as an error; an input "
    "under attack counts as robust when it is rejected or still classified correctly. Detection AUROC and TPR at 5% FPR compare the clean "
    "cases' scores with those of the adversarial inputs that fool the classifier."
)


class TaskProtocol(abc.ABC):
    """The shared shape; subclasses fill in one task."""

    task: Task
    #: The metric the validity checks and the report's summary read first.
    headline: str
    #: The clean metric the headline is compared with (a drop from clean, a corruption error).
    clean_headline: str
    #: How the numbers are defined, stated in results.json and the report.
    conventions: list[str]
    #: Facets every record of this task holds (a job adds rejection, extras... as they apply).
    facets: frozenset[Facet]
    #: Per-case scores of a prediction, each kept as ``clean_<name>`` and ``adv_<name>``.
    scores: tuple[str, ...]
    #: Bytes a record holds per class of the model (for the free-space estimate).
    class_record_bytes: int = 0
    #: Whether jobs keep the penultimate features of the first cases (the embedding figure).
    keeps_features: bool = False

    def class_names(self, data: LoadedData) -> list[str] | None:
        """The names results give the classes of a prediction."""
        return data.class_names

    def conventions_for(self, rejecting: bool) -> list[str]:
        return self.conventions + ([REJECTION_CONVENTION] if rejecting else [])

    @abc.abstractmethod
    def output_shape(self, model: LoadedModel, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of the model's outputs for a batch ``x``."""
        ...

    @abc.abstractmethod
    def attacked(self, y: torch.Tensor, clean: Sequence[dict] | None, rejection: bool) -> torch.Tensor:
        """Which cases of a batch the attack perturbs (``clean``: their clean records; None: a clean job)."""
        ...

    @abc.abstractmethod
    def score(self, logits: torch.Tensor, y: torch.Tensor, spacing: Any, num_classes: int) -> dict[str, list]:
        """Per-case scores (:attr:`scores`) of the predictions ``logits`` against ``y``."""
        ...

    def clean_scores(self, clean: Sequence[dict]) -> dict[str, list]:
        """The clean scores a clean job's records keep, for the attack jobs of the same model."""
        return {name: [row[f"clean_{name}"] for row in clean] for name in self.scores}

    def clean_prediction(self, clean: Sequence[dict], device: Any) -> torch.Tensor | None:
        """The clean predictions a clean job's records keep (None: records keep scores only)."""
        return None

    @abc.abstractmethod
    def rows(self, y: torch.Tensor, attacked: list[bool], sizes: dict[str, list], clean: dict[str, list],
             adv: dict[str, list]) -> list[dict]:
        """The records of a batch, fields in the order records keep them."""
        ...

    def target_fields(self, pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor, spacing: Any,
                      num_classes: int) -> list[dict]:
        """A targeted attack's per-case success (facet TARGET)."""
        raise NotImplementedError(f"targeted attacks are not scored for {self.task.value}")

    #: Whether a case can be "broken" for good (classification: a wrong answer), so that
    #: ``runtime.strategy: verdict`` carries an adversarial over instead of attacking again.
    carries: bool = False

    def carry(self, row: dict, source: dict, norm: Any) -> dict:
        """The record of a case not attacked because an earlier job's adversarial (``source``)
        already broke it: ``row``'s fields, with the attack's outcome taken from ``source``
        (every ``adv_`` field, the perturbation's sizes, its perceptibility) and ``carried``
        naming the job that found it. A minimum-norm job's ``min_norm`` becomes the carried
        perturbation's size: the smallest perturbation known for the case."""
        out = dict(row)
        for key, value in source.items():
            if key.startswith("adv_") and key in row and key != "adv_correct":
                out[key] = value
        for key in ("attacked", "in_range", "linf", "l2", "psnr", "ssim"):
            if key in source and key in row:
                out[key] = source[key]
        if "min_norm" in row:
            out["min_norm"] = source.get(norm.value)
        out["carried"] = source["carried"]
        return out

    def worst_case(self, per_attack: Sequence[Sequence[dict]]) -> Records:
        """Merge the records of several attacks at one epsilon, case by case (:class:`Records`
        with the facets every merged job shares)."""
        merged = []
        for rows in zip(*per_attack):
            row = self.worst_of(rows)
            row["in_range"] = all(r["in_range"] for r in rows)
            merged.append(row)
        return Records(merged, merged_facets(per_attack) - self.unmerged)

    #: Facets the worst case drops (they differ between attacks).
    unmerged: frozenset[Facet] = frozenset()

    @abc.abstractmethod
    def worst_of(self, rows: Sequence[dict]) -> dict:
        ...


class Classification(TaskProtocol):
    task = Task.CLASSIFICATION
    headline, clean_headline = "robust_accuracy", "clean_accuracy"
    conventions = [
        "Only samples classified correctly when clean are attacked; the others count as errors.",
        "Robust accuracy under worst_case: a sample counts only if it survives every attack at that epsilon.",
        "Intervals: Wilson score intervals on proportions.",
    ]
    facets = frozenset({Facet.CLASSIFICATION, Facet.PERTURBATION, Facet.FINITE})
    scores = ("pred", "finite")
    keeps_features = True
    carries = True

    def output_shape(self, model: LoadedModel, x: torch.Tensor) -> tuple[int, ...]:
        return (len(x), model.num_classes)

    def attacked(self, y, clean, rejection):
        """Only the cases the model gets right (and a rejecting defense lets through): the
        others are already errors."""
        if clean is None:
            return torch.zeros(len(y), dtype=torch.bool, device=y.device)
        ok = [r["clean_finite"] and r["clean_pred"] == label and not (rejection and r["clean_rejected"])
              for r, label in zip(clean, y.tolist())]
        return torch.tensor(ok, dtype=torch.bool, device=y.device)

    def clean_prediction(self, clean, device):
        return torch.tensor([r["clean_pred"] for r in clean], device=device)

    def score(self, logits, y, spacing, num_classes):
        return {"pred": logits.argmax(1).tolist(), "finite": finite(logits).tolist()}

    def rows(self, y, attacked, sizes, clean, adv):
        return [
            {"label": label, "clean_pred": clean["pred"][i], "adv_pred": adv["pred"][i], "attacked": attacked[i],
             **{k: v[i] for k, v in sizes.items()},
             "clean_finite": clean["finite"][i], "adv_finite": adv["finite"][i]}
            for i, label in enumerate(y.tolist())
        ]

    def worst_of(self, rows):
        """A sample is robust only if it survives every attack; a broken sample takes the
        record of the first attack that broke it."""
        broken = [r for r in rows if not r["adv_correct"]]
        return dict(broken[0] if broken else rows[0])


class Segmentation(TaskProtocol):
    task = Task.SEGMENTATION
    headline, clean_headline = "robust_dice", "clean_dice"
    conventions = [
        "Every case is attacked. A case's Dice, IoU and HD95 are means over the foreground classes (class 0 is background).",
        "Empty masks: a class absent from both truth and prediction scores Dice 1, IoU 1, HD95 0; absent from exactly "
        "one of them, Dice 0, IoU 0 and HD95 the image diagonal. So a lesion an attack creates in a healthy case counts.",
        "HD95 is in pixels (voxels), or in mm when the data set gives a spacing.",
        "Robust Dice under worst_case: each case takes its lowest Dice over the attacks at that epsilon.",
        "Broken case (ROG, Daza et al. 2021): Dice under attack below half the mean clean Dice of the data set.",
        "Targeted attacks: target_dice is the Dice between the prediction under attack and the attacker's target; "
        "target_success_rate: over the cases whose target differs from the truth, the share where the prediction "
        "under attack takes the target's label on at least 99% of the pixels the target changes.",
        "Intervals: percentile bootstrap over cases (2000 resamples) on means; Wilson score intervals on proportions.",
    ]
    facets = frozenset({Facet.SEGMENTATION, Facet.PERTURBATION, Facet.FINITE})
    scores = ("dice", "iou", "hd95", "pixel_accuracy", "finite")
    unmerged = frozenset({Facet.TARGET})
    class_record_bytes = 200

    def class_names(self, data: LoadedData) -> list[str] | None:
        return data.mask_class_names

    def output_shape(self, model: LoadedModel, x: torch.Tensor) -> tuple[int, ...]:
        return (len(x), model.num_classes, *x.shape[2:])

    def attacked(self, y, clean, rejection):
        """Every case of an attack job (there is no 'already wrong' for a label map)."""
        return torch.full((len(y),), clean is not None, dtype=torch.bool, device=y.device)

    def score(self, logits, y, spacing, num_classes):
        scores = dense_scores(logits.argmax(1), y, num_classes, spacing)
        scores["finite"] = finite(logits).tolist()
        return scores

    def rows(self, y, attacked, sizes, clean, adv):
        return [
            {"attacked": attacked[i], **{k: v[i] for k, v in sizes.items()},
             **{f"clean_{k}": v[i] for k, v in clean.items()}, **{f"adv_{k}": v[i] for k, v in adv.items()}}
            for i in range(len(y))
        ]

    def target_fields(self, pred, y, target, spacing, num_classes):
        """Dice and pixel accuracy against the target, and the share of the pixels the
        target changes that the prediction takes the target's label on."""
        scores = dense_scores(pred, target, num_classes, spacing, distances=False)
        wanted = (target != y).flatten(1)
        hit = ((pred == target).flatten(1) & wanted).sum(1) / wanted.sum(1).clamp_min(1)
        return [
            {"target_dice": dice, "target_pixel_accuracy": acc, "target_changed": n, "target_hit": round(h, 6) if n else None}
            for dice, acc, n, h in zip(scores["dice"], scores["pixel_accuracy"], wanted.sum(1).tolist(), hit.tolist())
        ]

    def worst_of(self, rows):
        """Each case takes the record of the attack that left it the lowest Dice; targets
        differ between attacks, so the worst case has none."""
        row = dict(min(rows, key=lambda r: case_mean(r["adv_dice"])))
        for key in ("target_dice", "target_pixel_accuracy", "target_changed", "target_hit"):
            row.pop(key, None)
        return row


PROTOCOLS: dict[Task, TaskProtocol] = {p.task: p for p in (Classification(), Segmentation())}


def protocol(task: Task) -> TaskProtocol:
    return PROTOCOLS[Task(task)]


def finite(logits: torch.Tensor) -> torch.Tensor:
    """Per case: are all its outputs finite? A NaN or Inf output is no prediction (its argmax is arbitrary)."""
    return logits.flatten(1).isfinite().all(1)


def merged_facets(per_attack: Sequence[Sequence[dict]]) -> frozenset[Facet]:
    """The facets every one of several jobs' records declares (plain lists declare none)."""
    sets = [frozenset(getattr(rows, "facets", ())) for rows in per_attack]
    return frozenset.intersection(*sets) if sets else frozenset()


def worst_case_records(per_attack: Sequence[Sequence[dict]], task: Task | None = None) -> Records:
    """The worst case over attacks with the protocol of ``task`` (by default, of the task
    the records' facets declare; transitional: plain lists of dicts are read by their fields)."""
    if task is None:
        facets = merged_facets(per_attack)
        dense = Facet.SEGMENTATION in facets or (not facets and any("adv_dice" in rows[0] for rows in per_attack if rows))
        task = Task.SEGMENTATION if dense else Task.CLASSIFICATION
    return protocol(task).worst_case(per_attack)
