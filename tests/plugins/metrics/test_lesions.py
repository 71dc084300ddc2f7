"""Lesion-wise detection and missed/false-positive volumes on hand-drawn label maps."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import Facet
from medaudit.core.jobs import Records
from medaudit.plugins.metrics.lesions import (
    FalsePositiveVolume, LesionDetectionRate, MissedVolume, lesions_found,
)


def maps_2d():
    truth = torch.zeros(1, 12, 12, dtype=torch.long)
    truth[0, 1:3, 1:3] = 2  # lesion A of class 2
    truth[0, 8:10, 8:10] = 2  # lesion B of class 2, apart from A
    truth[0, 5:7, 1:11] = 1  # one structure of class 1
    pred = torch.zeros_like(truth)
    pred[0, 2, 2] = 2  # touches lesion A only
    pred[0, 5:7, 1:11] = 1
    pred[0, 0, 11] = 1  # 1 false-positive pixel of class 1
    return pred, truth


def test_a_lesion_counts_as_detected_when_the_prediction_touches_it():
    pred, truth = maps_2d()
    assert lesions_found(pred, truth, 3) == [[[1, 1], [1, 2]]]  # class 1: 1 of 1; class 2: 1 of 2


def test_lesions_are_found_in_3d_volumes():
    truth = torch.zeros(1, 6, 8, 8, dtype=torch.long)
    truth[0, 1:3, 1:3, 1:3] = 1
    truth[0, 4:6, 5:7, 5:7] = 1
    pred = torch.zeros_like(truth)
    pred[0, 5, 6, 6] = 1
    assert lesions_found(pred, truth, 2) == [[[1, 2]]]


def test_the_rate_pools_lesions_over_cases_and_gives_the_worst_class():
    rows = [{"adv_lesion_detection_rate": [[1, 1], [1, 2]]}, {"adv_lesion_detection_rate": [[2, 2], [0, 2]]}]
    value = LesionDetectionRate().compute(Records(rows, {Facet.SEGMENTATION, Facet.CASE_SCORES}))
    assert (value.value, value.n, value.successes) == (0.25, 4, 1)  # class 2: 1 of 4 lesions


def test_missed_and_false_positive_volumes_in_pixels_and_with_a_spacing():
    pred, truth = maps_2d()
    missed = MissedVolume().score_cases(pred, truth)
    assert missed == [[0.0, 7.0]]  # class 2: 8 pixels of truth, 1 predicted
    assert FalsePositiveVolume().score_cases(pred, truth) == [[1.0, 0.0]]
    assert MissedVolume().score_cases(pred, truth, spacing=(0.5, 2.0)) == [[0.0, 7.0]]  # 1 mm^2 a pixel
    assert MissedVolume().score_cases(pred, truth, spacing=[(2.0, 2.0)]) == [[0.0, 28.0]]
    value = MissedVolume().compute([{"adv_missed_volume": [0.0, 7.0]}, {"adv_missed_volume": [1.0, 2.0]}])
    assert value.value == pytest.approx(5.0) and value.per_case == (7.0, 3.0)
