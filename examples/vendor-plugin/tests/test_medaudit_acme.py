"""medaudit-acme's tests: medaudit's conformance suite on each component with cheap params,
plus one test of what each component is for.

The fixtures (``medaudit_model``, ``medaudit_data``) and the base classes come from
medaudit.testing's pytest plugin (enabled in pyproject.toml's pytest ``addopts``).
"""

from __future__ import annotations

import torch

from medaudit import Facet, Norm
from medaudit.testing import Records, check_metric
from medaudit.testing.pytest_plugin import AttackConformance, MetricConformance
from medaudit_acme import ContrastShift, UnchangedShare


class TestContrastShiftConformance(AttackConformance):
    component = ContrastShift
    cheap_params = {"steps": 2}


class TestUnchangedShareConformance(MetricConformance):
    component = UnchangedShare


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def test_contrast_shift_searches_a_global_intensity_change_that_fools_the_model(medaudit_model, medaudit_data):
    model, x, y = medaudit_model.module, medaudit_data.images[:32], medaudit_data.labels[:32]
    eps = 16 / 255
    attack = ContrastShift(ContrastShift.Params(steps=10))
    x_adv = attack.perturb(model, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(0))
    # The search does far worse to the model than a random brightness change of the same size.
    signs = torch.randn((5, len(x), 1, 1, 1), generator=torch.Generator().manual_seed(0)).sign()
    random_shift = min(accuracy(model, (x + eps * s).clamp(0, 1), y) for s in signs)
    assert accuracy(model, x_adv, y) < random_shift - 0.2
    # Where neither clipping applies, the change is gain * (x - mean) + offset: an affine
    # function of the pixel value, the same for every pixel of an image.
    delta = x_adv - x
    for i in range(len(x)):
        free = (delta[i].abs() < eps - 1e-6) & (x_adv[i] > 0) & (x_adv[i] < 1)
        if free.sum() < 3:
            continue
        design = torch.stack([x[i][free], torch.ones_like(x[i][free])], 1).double()
        fit = torch.linalg.lstsq(design, delta[i][free].double()[:, None]).solution
        residual = (design @ fit).squeeze(1) - delta[i][free].double()
        assert residual.abs().max() < 1e-5, f"case {i}: the change is not one affine map of the intensities"


def test_unchanged_share_counts_attacked_cases_left_exactly_as_they_were():
    rows = [
        {"attacked": True, "linf": 0.0},
        {"attacked": True, "linf": 0.01},
        {"attacked": True, "linf": 0.0},
        {"attacked": True, "linf": 0.02},
        {"attacked": False, "linf": 0.0},  # misclassified when clean: not attacked, not counted
    ]
    value = UnchangedShare().compute(Records(rows, {Facet.PERTURBATION}))
    assert (value.value, value.n, value.successes) == (0.5, 4, 2)
    assert UnchangedShare().compute(Records(rows[-1:], {Facet.PERTURBATION})) is None
    check_metric(UnchangedShare, Records(rows, {Facet.PERTURBATION}))  # the conformance check on these records too
