"""Segmentation metrics on hand-made masks with known Dice, IoU and HD95."""

from __future__ import annotations

import math

import pytest
import torch

from medaudit.audits.results import bootstrap_interval, worst_case_records
from medaudit.core.segmentation import (
    case_mean,
    dice_per_class,
    foreground_mean,
    hd95_per_class,
    iou_per_class,
    pixel_accuracy,
    soft_dice_loss,
)
from medaudit.core.targets import TargetMask, TargetMaker
from medaudit.plugins.metrics.segmentation import BrokenCaseRate, RobustDice, TargetSuccessRate


def squares(size: int, boxes: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
    """A label map with rectangles (cls, top, left, height, width) on background."""
    m = torch.zeros(size, size, dtype=torch.long)
    for cls, top, left, h, w in boxes:
        m[top : top + h, left : left + w] = cls
    return m


def test_dice_and_iou_of_overlapping_squares():
    # Truth: 4x4 square (16 px); prediction: the same square shifted by 2 columns:
    # overlap 8, so Dice = 2*8/32 = 0.5 and IoU = 8/24 = 1/3.
    truth = squares(10, [(1, 2, 2, 4, 4)])[None]
    pred = squares(10, [(1, 2, 4, 4, 4)])[None]
    dice = dice_per_class(pred, truth, 2)
    iou = iou_per_class(pred, truth, 2)
    assert dice[0, 1].item() == pytest.approx(0.5)
    assert iou[0, 1].item() == pytest.approx(1 / 3)
    # Background: 84 px each, overlap 76 -> Dice 2*76/168.
    assert dice[0, 0].item() == pytest.approx(152 / 168)
    assert pixel_accuracy(pred, truth).item() == pytest.approx(84 / 100)  # 8 + 8 pixels wrong


def test_empty_mask_convention():
    truth = torch.zeros(2, 8, 8, dtype=torch.long)
    pred = truth.clone()
    pred[1, 3, 3] = 2  # a one-pixel false positive of class 2 in the second case
    dice = dice_per_class(pred, truth, 3)
    assert dice[0].tolist() == [1.0, 1.0, 1.0]  # nothing to find, nothing found
    assert dice[1, 1].item() == 1.0 and dice[1, 2].item() == 0.0
    hd = hd95_per_class(pred, truth, 3)
    assert hd[0, 1].item() == 0.0
    assert hd[1, 2].item() == pytest.approx(math.sqrt(8**2 + 8**2))  # the image diagonal


def test_hd95_of_shifted_square_is_the_shift():
    # A square shifted by 3 pixels: every boundary point of one is at most 3 px from the
    # other's boundary, and the sides perpendicular to the shift are exactly 3 px away.
    truth = squares(32, [(1, 8, 8, 12, 12)])[None]
    pred = squares(32, [(1, 8, 11, 12, 12)])[None]
    hd = hd95_per_class(pred, truth, 2)
    assert hd[0, 1].item() == pytest.approx(3.0)
    # Spacing scales distances: 3 px of 0.5 mm.
    assert hd95_per_class(pred, truth, 2, spacing=(1.0, 0.5))[0, 1].item() == pytest.approx(1.5)


def test_metrics_work_on_volumes():
    truth = torch.zeros(1, 6, 8, 8, dtype=torch.long)
    truth[0, 1:5, 2:6, 2:6] = 1
    pred = torch.zeros_like(truth)
    pred[0, 1:5, 2:6, 4:8] = 1
    assert dice_per_class(pred, truth, 2)[0, 1].item() == pytest.approx(0.5)
    assert hd95_per_class(pred, truth, 2)[0, 1].item() == pytest.approx(2.0)


def test_foreground_mean_and_case_mean_skip_background():
    per_class = torch.tensor([[1.0, 0.5, 0.0]])
    assert foreground_mean(per_class).item() == pytest.approx(0.25)
    assert case_mean([1.0, 0.5, 0.0]) == pytest.approx(0.25)


def test_soft_dice_loss_is_low_for_confident_correct_logits():
    truth = squares(8, [(1, 2, 2, 3, 3)])[None]
    logits = torch.nn.functional.one_hot(truth, 2).movedim(-1, 1).float() * 20
    assert soft_dice_loss(logits, truth).item() < 0.01
    assert soft_dice_loss(-logits, truth).item() > 0.9


def record(clean: float, adv: float, **extra) -> dict:
    return {"clean_dice": [1.0, clean], "adv_dice": [1.0, adv], "in_range": True, **extra}


def test_worst_case_takes_the_lowest_dice_per_case():
    a = [record(0.9, 0.8), record(0.9, 0.2)]
    b = [record(0.9, 0.5), record(0.9, 0.6)]
    merged = worst_case_records([a, b])
    assert [case_mean(r["adv_dice"]) for r in merged] == [0.5, 0.2]
    for attack in (a, b):
        for m, r in zip(merged, attack):
            assert case_mean(m["adv_dice"]) <= case_mean(r["adv_dice"])


def test_broken_case_rate_uses_half_the_mean_clean_dice():
    # Mean clean Dice 0.8 -> threshold 0.4: cases at 0.3 and 0.39 are broken, 0.4 and 0.9 not.
    records = [record(0.8, 0.3), record(0.8, 0.39), record(0.8, 0.4), record(0.8, 0.9)]
    value = BrokenCaseRate().compute(records)
    assert (value.value, value.successes, value.n) == (0.5, 2, 4)


def test_robust_dice_carries_cases_for_a_bootstrap_interval():
    records = [record(0.9, v) for v in (0.2, 0.4, 0.6, 0.8)]
    value = RobustDice().compute(records)
    assert value.value == pytest.approx(0.5) and value.per_case == (0.2, 0.4, 0.6, 0.8)
    low, high = bootstrap_interval(value.per_case, 0.95)
    assert 0.2 <= low < 0.5 < high <= 0.8
    assert bootstrap_interval(value.per_case, 0.95) == (low, high)  # seeded


def test_target_success_counts_the_changed_pixels_only():
    records = [
        record(1, 1, target_hit=0.995, target_pixel_accuracy=0.999),
        record(1, 1, target_hit=0.5, target_pixel_accuracy=0.999),  # half the lesion still there
        record(1, 1, target_hit=None, target_pixel_accuracy=1.0),  # nothing to change: not counted
    ]
    value = TargetSuccessRate().compute(records)
    assert (value.value, value.n) == (0.5, 2)


def test_target_masks_remove_grow_and_shape():
    truth = squares(16, [(1, 0, 0, 16, 16), (2, 4, 4, 6, 6)])[None]  # class 2 inside class 1
    removed = TargetMaker(TargetMask(mode="remove_class", cls=2), 3)(truth)
    assert (removed == 2).sum() == 0 and (removed == 1).sum() == 256  # filled with the surrounding class
    grown = TargetMaker(TargetMask(mode="grow_class", cls=2, grow=1), 3)(truth)
    assert (grown == 2).sum() == 8 * 8
    shaped = TargetMaker(TargetMask(mode="shape", cls=2, shape="square", size=0.25, centre=(0.5, 0.5)), 3)(
        torch.zeros_like(truth)
    )
    assert (shaped == 2).sum() == 4 * 4  # side 0.25 * 16 = 4 pixels, centred at 7.5: rows and columns 6..9
