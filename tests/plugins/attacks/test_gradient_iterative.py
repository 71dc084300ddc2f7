"""Iterative attacks (bim, mifgsm, tifgsm): budget, determinism, strength, TI's smoothing."""

from __future__ import annotations

import pydantic
import pytest
import torch

import medaudit.plugins.attacks.gradient as gradient
from medaudit.core.components import Norm
from medaudit.core.host import get_host
from medaudit.core.perturbation import input_gradient
from medaudit.plugins.attacks.gradient import (
    FGSM,
    BIM,
    MIFGSM,
    TIFGSM,
    BIMParams,
    MIFGSMParams,
    TIFGSMParams,
    gaussian_kernel,
    smooth,
)
from tests.helpers import accuracy, run

ATTACKS = [
    ("bim", lambda: BIM(BIMParams(steps=5))),
    ("mifgsm", lambda: MIFGSM(MIFGSMParams(steps=5))),
    ("tifgsm", lambda: TIFGSM(TIFGSMParams(steps=5))),
]


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
@pytest.mark.parametrize("name,make", ATTACKS)
def test_budget_and_range_hold_on_every_sample(name, make, norm, demo_model, demo_data):
    attack = make()
    assert norm in attack.norms
    x, y = demo_data.images[:32], demo_data.labels[:32]
    eps = 8 / 255 if norm is Norm.LINF else 0.5
    x_adv = run(attack, demo_model.module, x, y, eps, norm)
    assert x_adv.shape == x.shape
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > eps / 4).any()  # it did perturb


@pytest.mark.parametrize("name,make", ATTACKS)
def test_eps_zero_returns_the_input_without_calling_the_model(name, make, demo_data):
    def model(_):
        raise AssertionError("the model must not be called at eps = 0")

    x, y = demo_data.images[:16], demo_data.labels[:16]
    x_adv = run(make(), model, x, y, 0.0)
    assert torch.equal(x_adv, x) and x_adv is not x


@pytest.mark.parametrize("name,make", ATTACKS)
def test_deterministic(name, make, demo_model, demo_data):
    x, y = demo_data.images[:16], demo_data.labels[:16]
    # No randomness at all: even different generator seeds give the same output.
    a = run(make(), demo_model.module, x, y, 2 / 255, seed=1)
    b = run(make(), demo_model.module, x, y, 2 / 255, seed=2)
    assert torch.equal(a, b)


def test_each_attack_lowers_accuracy_and_bim_is_at_least_as_strong_as_fgsm(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images[:64], demo_data.labels[:64]
    eps = 2 / 255
    clean = accuracy(model, x, y)
    assert clean > 0.85
    robust = {name: accuracy(model, run(make(), model, x, y, eps), y) for name, make in ATTACKS}
    assert all(acc < clean for acc in robust.values()), (clean, robust)
    # At 2/255 FGSM already breaks nearly every sample; 1/255 is where BIM's steps show.
    for eps in (1 / 255, 2 / 255):
        bim10 = accuracy(model, run(BIM(BIMParams(steps=10)), model, x, y, eps), y)
        assert bim10 <= accuracy(model, run(FGSM(), model, x, y, eps), y), eps


@pytest.mark.parametrize("cls,params", [(BIM, BIMParams), (MIFGSM, MIFGSMParams), (TIFGSM, TIFGSMParams)])
def test_more_steps_never_weaken_the_attack(cls, params, demo_model, demo_data):
    # Same step size, so the longer run repeats the shorter one's iterates and keeps any that fooled.
    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    short = accuracy(model, run(cls(params(steps=2, step_size=0.5 / 255)), model, x, y, 1 / 255), y)
    long = accuracy(model, run(cls(params(steps=6, step_size=0.5 / 255)), model, x, y, 1 / 255), y)
    assert long <= short


def test_smoothing_spreads_a_delta_and_keeps_its_mass_per_channel():
    delta = torch.zeros(1, 2, 31, 31)
    delta[0, 0, 15, 15] = 1.0
    delta[0, 1, 15, 15] = -3.0
    out = smooth(delta, gaussian_kernel(9, 2.0, channels=2))
    assert out.shape == delta.shape
    assert torch.allclose(out.sum((2, 3)), delta.sum((2, 3)), atol=1e-5)
    assert (out[0, 0] > 0).sum() == 81  # spread over the whole 9 x 9 support
    assert out[0, 0].max() < 0.1 and out[0, 0].argmax() == 15 * 31 + 15  # lower peak, still centred
    assert (out[0, 1] <= 0).all()  # channels do not mix


def test_smoothing_makes_the_model_gradient_smoother(demo_model, demo_data):
    _, grad = input_gradient(demo_model.module, demo_data.images[:8], demo_data.labels[:8])

    def roughness(g):  # total variation relative to size: high for pixel-level noise
        tv = (g.diff(dim=-1).abs().sum((1, 2, 3)) + g.diff(dim=-2).abs().sum((1, 2, 3)))
        return tv / g.abs().sum((1, 2, 3)).clamp_min(1e-12)

    smoothed = smooth(grad, gaussian_kernel(31, 10.0, channels=grad.shape[1]))
    assert (roughness(smoothed) < 0.5 * roughness(grad)).all()


def test_tifgsm_params_are_validated():
    assert TIFGSMParams().kernel_size == 7 and TIFGSMParams().decay == 1.0
    for bad in ({"kernel_size": 8}, {"kernel_size": 1}, {"sigma": 0.0}, {"decay": -0.5}):
        with pytest.raises(pydantic.ValidationError):
            TIFGSMParams(**bad)
    with pytest.raises(pydantic.ValidationError):
        BIMParams(steps=0)


def test_tifgsm_rejects_volumes(demo_model):
    x = torch.zeros(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="2D"):
        run(TIFGSM(), demo_model.module, x, torch.zeros(1, dtype=torch.long), 2 / 255)


def test_registered_through_the_hook():
    host = get_host(load_entry_points=False)
    attacks = host.components["attack"]
    assert attacks["bim"].plugin == gradient.__name__
    assert {"bim", "mifgsm", "tifgsm"} <= set(attacks)
    assert attacks["tifgsm"] is TIFGSM and attacks["tifgsm"].dims == frozenset({2})
    assert all(attacks[n].summary() for n in ("bim", "mifgsm", "tifgsm"))
