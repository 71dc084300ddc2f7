"""Attacks: budget and range on every sample, determinism, and strength on a trained model."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import Norm
from medaudit.plugins.attacks.gradient import FGSM, PGD, PGDParams
from tests.helpers import accuracy, run

ATTACKS = [
    ("fgsm", lambda: FGSM()),
    ("pgd", lambda: PGD(PGDParams(steps=5))),
    ("pgd-restarts", lambda: PGD(PGDParams(steps=3, restarts=2))),
]


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
@pytest.mark.parametrize("name,make", ATTACKS)
def test_budget_and_range_hold_on_every_sample(name, make, norm, demo_model, demo_data):
    x, y = demo_data.images[:32], demo_data.labels[:32]
    eps = 8 / 255 if norm is Norm.LINF else 0.5
    x_adv = run(make(), demo_model.module, x, y, eps, norm)
    assert x_adv.shape == x.shape
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > eps / 4).any()  # it did perturb


@pytest.mark.parametrize("name,make", ATTACKS)
def test_eps_zero_leaves_inputs_unchanged(name, make, demo_model, demo_data):
    x, y = demo_data.images[:16], demo_data.labels[:16]
    assert torch.equal(run(make(), demo_model.module, x, y, 0.0), x)


@pytest.mark.parametrize("name,make", ATTACKS)
def test_deterministic_under_a_fixed_seed(name, make, demo_model, demo_data):
    x, y = demo_data.images[:16], demo_data.labels[:16]
    a = run(make(), demo_model.module, x, y, 2 / 255, seed=7)
    b = run(make(), demo_model.module, x, y, 2 / 255, seed=7)
    assert torch.equal(a, b)


def test_random_start_depends_on_the_seed(demo_model, demo_data):
    x, y = demo_data.images[:16], demo_data.labels[:16]
    attack = PGD(PGDParams(steps=1))
    assert not torch.equal(run(attack, demo_model.module, x, y, 2 / 255, seed=1), run(attack, demo_model.module, x, y, 2 / 255, seed=2))


def test_pgd_is_at_least_as_strong_as_fgsm_and_accuracy_falls_with_eps(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    clean = accuracy(model, x, y)
    assert clean > 0.85  # the demo model learned the task
    fgsm_curve, pgd_curve = [], []
    for eps in (0.5 / 255, 1 / 255, 2 / 255):
        fgsm_curve.append(accuracy(model, run(FGSM(), model, x, y, eps), y))
        pgd_curve.append(accuracy(model, run(PGD(PGDParams(steps=10)), model, x, y, eps), y))
    for f, p in zip(fgsm_curve, pgd_curve):
        assert p <= f
    assert pgd_curve == sorted(pgd_curve, reverse=True) and pgd_curve[0] > pgd_curve[-1]
    assert fgsm_curve[0] < clean and pgd_curve[-1] < 0.2


def test_restarts_never_weaken_pgd(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    one = accuracy(model, run(PGD(PGDParams(steps=3)), model, x, y, 1 / 255), y)
    three = accuracy(model, run(PGD(PGDParams(steps=3, restarts=3)), model, x, y, 1 / 255), y)
    assert three <= one


def test_attacks_leave_model_parameters_untouched(demo_model, demo_data):
    before = {k: v.clone() for k, v in demo_model.module.state_dict().items()}
    run(PGD(PGDParams(steps=2)), demo_model.module, demo_data.images[:8], demo_data.labels[:8], 4 / 255)
    assert all(torch.equal(before[k], v) for k, v in demo_model.module.state_dict().items())
    assert not any(p.requires_grad for p in demo_model.module.parameters())
