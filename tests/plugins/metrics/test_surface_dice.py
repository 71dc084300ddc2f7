"""surface_dice and clean_surface_dice: MONAI's NSD per case, the empty-mask convention,
spacing in mm, and the mean over cases."""

from __future__ import annotations

import pytest
import torch
from monai.metrics import compute_surface_dice

from medaudit.core.components import Facet
from medaudit.core.segmentation import one_hot
from medaudit.plugins.metrics.surface_dice import CleanSurfaceDice, SurfaceDice, SurfaceDiceParams

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecations, in the references


def square(size: int, top: int, left: int, side: int, label: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.long) if out is None else out
    mask[top : top + side, left : left + side] = label
    return mask


def test_matches_monai_on_hand_made_masks():
    truth = torch.stack([square(32, 8, 8, 12), square(32, 4, 4, 20)])
    pred = torch.stack([square(32, 10, 9, 12), square(32, 4, 4, 14)])
    ours = SurfaceDice(SurfaceDiceParams(tolerance=1.0)).score_cases(pred, truth)
    reference = compute_surface_dice(one_hot(pred, 2).float(), one_hot(truth, 2).float(), [1.0])
    assert [v[0] for v in ours] == pytest.approx(reference[:, 0].tolist())
    assert 0 < ours[0][0] < 1 and 0 < ours[1][0] < 1
    wide = SurfaceDice(SurfaceDiceParams(tolerance=10.0)).score_cases(pred, truth)
    assert wide == [[1.0], [1.0]]  # every boundary pixel within 10 px of the other


def test_spacing_makes_the_tolerance_mm():
    truth, pred = square(32, 8, 8, 12)[None], square(32, 8, 10, 12)[None]  # shifted 2 px
    metric = SurfaceDice(SurfaceDiceParams(tolerance=2.0))
    assert metric.score_cases(pred, truth) == [[1.0]]  # 2 px <= 2
    in_mm = metric.score_cases(pred, truth, (2.0, 2.0))  # 2 px = 4 mm > 2 mm
    reference = compute_surface_dice(one_hot(pred, 2).float(), one_hot(truth, 2).float(), [2.0], spacing=[2.0, 2.0])
    assert in_mm[0][0] == pytest.approx(float(reference[0, 0])) and in_mm[0][0] < 1
    assert metric.score_cases(pred, truth, [(2.0, 2.0)]) == in_mm  # one spacing per case


def test_empty_mask_convention_and_foreground_only():
    empty = torch.zeros(32, 32, dtype=torch.long)
    lesion = square(32, 8, 8, 6)
    two = square(32, 20, 20, 6, label=2, out=lesion.clone())
    metric = SurfaceDice()
    # class 1 absent from both -> 1; present in one only -> 0 (either way round).
    assert metric.score_cases(torch.stack([empty, empty]), torch.stack([empty, empty])) == [[], []]
    assert metric.score_cases(torch.stack([lesion, empty]), torch.stack([empty, lesion])) == [[0.0], [0.0]]
    # class 2 absent from both in the first case, found in the second.
    values = metric.score_cases(torch.stack([lesion, two]), torch.stack([lesion, two]))
    assert values == [[1.0], [1.0, 1.0]]
    # with the model's classes known, every case lists them all
    assert metric.score_cases(torch.stack([lesion]), torch.stack([lesion]), num_classes=4) == [[1.0, 1.0, 1.0]]
    assert metric.score_cases(torch.stack([two]), torch.stack([lesion]), num_classes=3) == [[1.0, 0.0]]


def test_volumes():
    truth = torch.zeros(1, 12, 16, 16, dtype=torch.long)
    truth[0, 3:9, 4:12, 4:12] = 1
    pred = truth.roll(1, dims=1)
    ours = SurfaceDice(SurfaceDiceParams(tolerance=0.5)).score_cases(pred, truth, (1.0, 1.0, 1.0))
    reference = compute_surface_dice(one_hot(pred, 2).float(), one_hot(truth, 2).float(), [0.5], spacing=[1.0, 1.0, 1.0])
    assert ours[0][0] == pytest.approx(float(reference[0, 0])) and 0 < ours[0][0] < 1


def test_compute_means_over_cases_and_pads_absent_classes():
    records = [
        {"clean_surface_dice": [0.5, 0.0], "adv_surface_dice": [0.2]},
        {"clean_surface_dice": [1.0], "adv_surface_dice": []},
    ]
    clean = CleanSurfaceDice().compute(records)
    assert clean.value == pytest.approx((0.25 + 1.0) / 2) and clean.per_case == pytest.approx((0.25, 1.0))
    robust = SurfaceDice().compute(records)
    assert robust.value == pytest.approx(0.6) and robust.n == 2
    assert SurfaceDice().compute([{"clean_surface_dice": [1.0]}]) is None
    assert SurfaceDice.needs == frozenset({Facet.SEGMENTATION, Facet.CASE_SCORES}) and SurfaceDice.scores_cases
    assert CleanSurfaceDice.clean and not CleanSurfaceDice.scores_cases


def test_class_tolerances_per_class():
    truth = square(32, 20, 20, 8, label=2, out=square(32, 2, 2, 8))[None]
    pred = square(32, 20, 22, 8, label=2, out=square(32, 2, 4, 8))[None]  # both shifted 2 px
    values = SurfaceDice(SurfaceDiceParams(class_tolerances=[3.0, 1.0])).score_cases(pred, truth)
    assert values[0][0] == 1.0 and values[0][1] < 1.0
    with pytest.raises(ValueError, match="class tolerances"):
        SurfaceDice(SurfaceDiceParams(class_tolerances=[1.0])).score_cases(pred, truth, num_classes=3)
