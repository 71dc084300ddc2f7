"""Surface Dice metrics: surface_dice (under attack) and clean_surface_dice.

The normalized surface Dice (NSD; Nikolov et al. 2021, https://arxiv.org/abs/1809.04430)
is the fraction of both boundaries, predicted and true, that lies within a tolerance of
the other: it scores boundary agreement, which overlap Dice hides for large structures.
Computed with MONAI's ``compute_surface_dice`` in the job's batch loop
(:meth:`~medaudit.core.components.Metric.score_cases`): records keep, per case, the
per-class values of the foreground classes as ``clean_surface_dice`` and
``adv_surface_dice``; a case's value is their mean, the data set's the mean over cases
with a bootstrap interval. 2D and 3D.

Tolerance: ``TOLERANCE`` for every foreground class (or ``class_tolerances``, one per
foreground class), in mm when the data set gives a spacing, in pixels (voxels) otherwise.
Specs name metrics without params, so the spec cannot change it yet.

Empty masks follow :mod:`medaudit.core.segmentation`: a class absent from both the truth
and the prediction scores 1, present in exactly one 0. A case's list covers the classes up
to the largest label in its truth or prediction (or the model's classes, when given);
:meth:`compute` counts missing trailing classes as absent from both (1).

Under ``worst_case`` each case keeps the attack that lowered its Dice most (the
segmentation worst case), so ``surface_dice`` there is that attack's surface Dice.
``clean_surface_dice`` reads the clean values ``surface_dice`` wrote: list both.
"""

from __future__ import annotations

import warnings
from statistics import fmean
from typing import Any, Sequence

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Facet, Metric, MetricValue, Params, Task
from medaudit.core.lazy import torch

#: Boundary tolerance of every foreground class: mm with a spacing, else pixels (voxels).
TOLERANCE = 2.0


class SurfaceDiceParams(Params):
    tolerance: float = Field(
        TOLERANCE, ge=0, description="Boundary tolerance of every foreground class (mm, or pixels without a spacing)."
    )
    class_tolerances: list[float] | None = Field(
        None, description="One tolerance per foreground class (1..K-1), overriding ``tolerance``."
    )


def surface_dice_per_class(
    pred: torch.Tensor,
    truth: torch.Tensor,
    num_classes: int,
    tolerances: Sequence[float],
    spacing: Any = None,
) -> torch.Tensor:
    """``N x (K-1)`` surface Dice of the foreground classes of label maps ``N x *S``, with
    the empty-mask convention of :mod:`medaudit.core.segmentation`. ``spacing``: one for
    all cases, one per case, or None (pixels)."""
    from monai.metrics import compute_surface_dice

    from medaudit.core.segmentation import one_hot

    p, t = one_hot(pred.cpu(), num_classes)[:, 1:], one_hot(truth.cpu(), num_classes)[:, 1:]
    dims = tuple(range(2, p.dim()))
    p_any, t_any = p.any(dims), t.any(dims)
    out = torch.where(p_any | t_any, torch.zeros(p_any.shape), torch.ones(p_any.shape)).double()
    both = p_any & t_any
    if bool(both.any()):
        if spacing is not None and not isinstance(spacing[0], (int, float)):
            spacing = [list(s) for s in spacing]
        elif spacing is not None:
            spacing = list(spacing)
        # MONAI takes background plus foreground channels; include_background=False drops it.
        zeros = torch.zeros_like(p[:, :1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # empty classes: replaced by the convention
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside MONAI itself
            nsd = compute_surface_dice(
                torch.cat([zeros, p], 1).float(), torch.cat([zeros, t], 1).float(),
                class_thresholds=[float(v) for v in tolerances], include_background=False, spacing=spacing,
            ).double()
        out = torch.where(both, nsd, out)
    return out.float()


def _case_value(per_class: Sequence[float], width: int) -> float:
    values = list(per_class) + [1.0] * (width - len(per_class))  # classes absent from both
    return fmean(values) if values else 1.0


def _mean(records: Sequence[dict], field: str) -> MetricValue | None:
    rows = [r[field] for r in records if r.get(field) is not None]
    if not rows:
        return None
    width = max(len(row) for row in rows)
    values = [_case_value(row, width) for row in rows]
    return MetricValue(value=fmean(values), n=len(values), per_case=tuple(values))


class SurfaceDice(Metric):
    """Mean normalized surface Dice over cases under attack (boundary within TOLERANCE mm, or pixels without a spacing)."""

    name = "surface_dice"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    bounds = (0.0, 1.0)
    needs = frozenset({Facet.SEGMENTATION, Facet.CASE_SCORES})
    scores_cases = True
    Params = SurfaceDiceParams
    field = "adv_surface_dice"

    def score_cases(self, pred, truth, spacing=None, num_classes: int | None = None) -> list:
        p: SurfaceDiceParams = self.params
        if num_classes is None and p.class_tolerances:
            num_classes = len(p.class_tolerances) + 1
        k = num_classes or int(max(int(pred.max()), int(truth.max()))) + 1
        tolerances = p.class_tolerances or [p.tolerance] * (k - 1)
        if len(tolerances) != k - 1:
            raise ValueError(f"{self.name}: {len(tolerances)} class tolerances for {k - 1} foreground classes")
        values = surface_dice_per_class(pred, truth, k, tolerances, spacing)
        # Per case, the classes up to its largest label (the rest score 1 on read).
        if num_classes is not None:
            return values.tolist()
        top = [max(int(a.max()), int(b.max())) for a, b in zip(pred, truth)]
        return [row[:last].tolist() for row, last in zip(values, top)]

    def compute(self, records):
        return _mean(records, self.field)


class CleanSurfaceDice(SurfaceDice):
    """Mean normalized surface Dice over cases on unperturbed inputs (scored by surface_dice: list both)."""

    name = "clean_surface_dice"
    clean = True
    scores_cases = False
    field = "clean_surface_dice"


@hookimpl
def register_metrics(register):
    register(SurfaceDice)
    register(CleanSurfaceDice)
