"""Segmentation metrics: clean_dice, robust_dice, clean_iou, robust_iou, clean_hd95, robust_hd95, clean_pixel_accuracy, robust_pixel_accuracy, broken_case_rate, target_dice, target_success_rate.

Computed from per-case records.

A case's Dice (IoU, HD95) is the mean over the foreground classes (1..K-1) of the per-class
values; the dataset value is the mean over cases, with a bootstrap interval over cases.
Robust values under ``worst_case`` take, per case, the attack that lowered its Dice most.
Empty masks follow the convention of :mod:`medaudit.core.segmentation`.
"""

from __future__ import annotations

import math
from statistics import fmean

from medaudit import hookimpl
from medaudit.core.components import Facet, Metric, MetricValue, Task
from medaudit.core.segmentation import case_mean

SEG = frozenset({Task.SEGMENTATION})
#: What the records of a segmentation job hold (per-class Dice, IoU, HD95, pixel accuracy).
SCORES = frozenset({Facet.SEGMENTATION})
#: What a targeted attack's records add (the worst case over attacks has none).
TARGETS = frozenset({Facet.TARGET})
UNIT = (0.0, 1.0)

#: ROG's criterion: a case is broken when its Dice falls below this fraction of the mean
#: clean Dice of the data set.
BROKEN_FRACTION = 0.5
#: A targeted attack succeeds on a case when the prediction takes the target's label on at
#: least this fraction of the pixels the target changes.
TARGET_MATCH = 0.99


def _mean(values: list[float]) -> MetricValue | None:
    if not values:
        return None
    return MetricValue(value=fmean(values), n=len(values), per_case=tuple(values))


class _CaseMean(Metric):
    """Mean over cases of a per-case value from the records."""

    tasks = SEG
    field = ""
    bounds = UNIT
    needs = SCORES

    def compute(self, records):
        return _mean([case_mean(r[self.field]) for r in records if r.get(self.field) is not None])


class CleanDice(_CaseMean):
    """Mean Dice over cases on unperturbed inputs (foreground classes averaged per case)."""

    name, field, clean = "clean_dice", "clean_dice", True


class RobustDice(_CaseMean):
    """Mean Dice over cases under attack; for ``worst_case`` each case counts its lowest Dice over the attacks."""

    name, field, monotone = "robust_dice", "adv_dice", True


class CleanIoU(_CaseMean):
    """Mean intersection over union over cases on unperturbed inputs."""

    name, field, clean = "clean_iou", "clean_iou", True


class RobustIoU(_CaseMean):
    """Mean intersection over union over cases under attack."""

    name, field = "robust_iou", "adv_iou"


class CleanHD95(_CaseMean):
    """Mean 95th-percentile Hausdorff distance over cases on unperturbed inputs (pixels, or mm with spacing)."""

    name, field, clean, better, bounds = "clean_hd95", "clean_hd95", True, "lower", (0.0, math.inf)


class RobustHD95(_CaseMean):
    """Mean 95th-percentile Hausdorff distance over cases under attack (pixels, or mm with spacing)."""

    name, field, better, bounds = "robust_hd95", "adv_hd95", "lower", (0.0, math.inf)


class CleanPixelAccuracy(Metric):
    """Mean fraction of correctly labelled pixels (voxels) per case on unperturbed inputs."""

    name, clean, tasks, bounds, needs = "clean_pixel_accuracy", True, SEG, UNIT, SCORES

    def compute(self, records):
        return _mean([r["clean_pixel_accuracy"] for r in records])


class RobustPixelAccuracy(Metric):
    """Mean fraction of correctly labelled pixels (voxels) per case under attack."""

    name, tasks, bounds, needs = "robust_pixel_accuracy", SEG, UNIT, SCORES

    def compute(self, records):
        return _mean([r["adv_pixel_accuracy"] for r in records])


class BrokenCaseRate(Metric):
    """Fraction of cases an attack breaks: Dice under attack below half the mean clean Dice
    of the data set (ROG's success criterion, Daza et al. MICCAI 2021)."""

    name, better, tasks, bounds, needs = "broken_case_rate", "lower", SEG, UNIT, SCORES
    monotone = True

    def compute(self, records):
        if not records:
            return None
        threshold = BROKEN_FRACTION * fmean(case_mean(r["clean_dice"]) for r in records)
        broken = sum(case_mean(r["adv_dice"]) < threshold for r in records)
        return MetricValue(value=broken / len(records), n=len(records), successes=broken)


class TargetDice(Metric):
    """Targeted attacks: mean Dice between the prediction under attack and the attacker's
    target mask (higher means the attacker steered the segmentation further)."""

    name, better, tasks, bounds, needs = "target_dice", "lower", SEG, UNIT, TARGETS

    def compute(self, records):
        return _mean([case_mean(r["target_dice"]) for r in records if r.get("target_dice") is not None])


class TargetSuccessRate(Metric):
    """Targeted attacks: share of the cases whose target differs from the truth where the
    prediction under attack takes the target's label on at least 99% of the pixels the
    target changes. (ASMA's criterion, 99% of all pixels, would call an erased 10-pixel
    lesion a success before any attack; this one asks for the change itself.)"""

    name, better, tasks, bounds, needs = "target_success_rate", "lower", SEG, UNIT, TARGETS

    def compute(self, records):
        flags = [r["target_hit"] >= TARGET_MATCH for r in records if r.get("target_hit") is not None]
        if not flags:
            return None
        return MetricValue(value=sum(flags) / len(flags), n=len(flags), successes=sum(flags))


@hookimpl
def register_metrics(register):
    for cls in (
        CleanDice, RobustDice, CleanIoU, RobustIoU, CleanHD95, RobustHD95, CleanPixelAccuracy, RobustPixelAccuracy,
        BrokenCaseRate, TargetDice, TargetSuccessRate,
    ):
        register(cls)
