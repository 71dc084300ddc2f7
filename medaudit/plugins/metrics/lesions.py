"""Lesion and volume metrics: lesion_detection_rate, clean_lesion_detection_rate, missed_volume, clean_missed_volume, false_positive_volume, clean_false_positive_volume.

The direction of a segmenter's errors, which a mean Dice hides: how many lesions it misses
and how much tissue it leaves out or adds.

- **Lesion-wise detection.** Each connected component of a foreground class in the truth
  (scipy's ``ndimage.label``, faces connected; 2D and 3D) is a lesion; it is detected when
  the prediction gives that class to at least one of its pixels. Records keep, per case and
  foreground class, ``[detected, lesions]``. The metric pools the lesions of all cases per
  class and gives the class detected least often, as a proportion with a Wilson interval
  (a missed nodule is the finding a reader would act on; a large organ is rarely missed).
- **Missed and false-positive volume.** Per case and foreground class, the pixels (voxels)
  of the truth the prediction leaves out, and those it adds; in mm^2 (mm^3) when the data
  set gives a spacing. The metric is the mean over cases of the sum over the foreground
  classes, with a bootstrap interval.

Scored in the job's batch loop (``score_cases``) like the surface Dice: list the attack
metric and its ``clean_`` twin together. Under ``worst_case`` each case keeps the attack
that lowered its Dice most, so these are that attack's values.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

from medaudit import hookimpl
from medaudit.core.components import Facet, Metric, MetricValue, Task
from medaudit.core.lazy import torch
from medaudit.core.segmentation import _counts

NEEDS = frozenset({Facet.SEGMENTATION, Facet.CASE_SCORES})


def lesions_found(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[list[list[int]]]:
    """Per case, per foreground class: ``[lesions detected, lesions]`` (connected components
    of the truth that the prediction touches with the same class)."""
    import numpy as np
    from scipy import ndimage

    pred, truth = pred.cpu().numpy(), truth.cpu().numpy()
    out = []
    for p, t in zip(pred, truth):
        case = []
        for c in range(1, num_classes):
            components, count = ndimage.label(t == c)
            touched = np.unique(components[(p == c) & (components > 0)])
            case.append([int(len(touched)), int(count)])
        out.append(case)
    return out


def voxel_volumes(spacing: Any, n: int) -> list[float]:
    """The volume of one pixel (voxel) of each case: 1 without a spacing."""
    if spacing is None:
        return [1.0] * n
    if isinstance(spacing[0], (int, float)):
        return [float(math.prod(spacing))] * n
    return [float(math.prod(s)) for s in spacing]


class LesionDetectionRate(Metric):
    """Lesion-wise detection rate under attack of the foreground class detected least often
    (a lesion: a connected component of the truth; detected: the prediction touches it)."""

    name = "lesion_detection_rate"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    bounds = (0.0, 1.0)
    needs = NEEDS
    scores_cases = True
    field = "adv_lesion_detection_rate"

    def score_cases(self, pred, truth, spacing=None) -> list:
        k = int(max(int(pred.max()), int(truth.max()))) + 1
        return lesions_found(pred, truth, max(k, 2))

    def compute(self, records):
        rows = [r[self.field] for r in records if r.get(self.field) is not None]
        width = max((len(row) for row in rows), default=0)
        pooled = [[sum(row[c][i] for row in rows if c < len(row)) for i in (0, 1)] for c in range(width)]
        rates = [MetricValue(value=d / n, n=n, successes=d) for d, n in pooled if n]
        return min(rates, key=lambda v: v.value) if rates else None


class CleanLesionDetectionRate(LesionDetectionRate):
    """Lesion-wise detection rate on unperturbed inputs (scored by lesion_detection_rate: list both)."""

    name, clean, scores_cases, field = "clean_lesion_detection_rate", True, False, "clean_lesion_detection_rate"


class MissedVolume(Metric):
    """Mean over cases of the truth's foreground volume the prediction leaves out under
    attack (pixels or voxels; mm^2 or mm^3 with a spacing)."""

    name = "missed_volume"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    better = "lower"
    bounds = (0.0, math.inf)
    needs = NEEDS
    scores_cases = True
    field = "adv_missed_volume"
    #: Which count of :func:`~medaudit.core.segmentation._counts` (1: false positives, 2: false negatives).
    count = 2

    def score_cases(self, pred, truth, spacing=None) -> list:
        k = max(int(max(int(pred.max()), int(truth.max()))) + 1, 2)
        counts = _counts(pred, truth, k)[self.count][:, 1:]
        return [[v * volume for v in row] for row, volume in zip(counts.tolist(), voxel_volumes(spacing, len(pred)))]

    def compute(self, records):
        values = [sum(r[self.field]) for r in records if r.get(self.field) is not None]
        return MetricValue(value=fmean(values), n=len(values), per_case=tuple(values)) if values else None


class CleanMissedVolume(MissedVolume):
    """Mean missed foreground volume per case on unperturbed inputs (scored by missed_volume: list both)."""

    name, clean, scores_cases, field = "clean_missed_volume", True, False, "clean_missed_volume"


class FalsePositiveVolume(MissedVolume):
    """Mean over cases of the foreground volume the prediction adds under attack (pixels or
    voxels; mm^2 or mm^3 with a spacing)."""

    name, field, count = "false_positive_volume", "adv_false_positive_volume", 1


class CleanFalsePositiveVolume(FalsePositiveVolume):
    """Mean added foreground volume per case on unperturbed inputs (scored by false_positive_volume: list both)."""

    name, clean, scores_cases, field = "clean_false_positive_volume", True, False, "clean_false_positive_volume"


@hookimpl
def register_metrics(register):
    for cls in (LesionDetectionRate, CleanLesionDetectionRate, MissedVolume, CleanMissedVolume, FalsePositiveVolume,
                CleanFalsePositiveVolume):
        register(cls)
