"""The ART bridge: runs ART attacks by name, validates their params, respects the budget."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import Norm
from medaudit.plugins.attacks.art import ARTAttack, ARTParams
from medaudit.plugins.attacks.gradient import FGSM


def test_unknown_attack_and_params_are_validation_errors():
    with pytest.raises(ValueError, match="did you mean 'DeepFool'"):
        ARTParams(attack="DeepFoo")
    with pytest.raises(ValueError, match="DeepFool takes no parameter steps"):
        ARTParams(attack="DeepFool", params={"steps": 3})


def test_fast_gradient_method_through_the_bridge_equals_native_fgsm(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    g = torch.Generator().manual_seed(0)
    bridged = ARTAttack(ARTParams(attack="FastGradientMethod")).perturb(model, x, y, eps=1 / 255, norm=Norm.LINF, generator=g)
    native = FGSM().perturb(model, x, y, eps=1 / 255, norm=Norm.LINF, generator=g)
    assert (torch.isclose(bridged, native, atol=1e-6).float().mean()) > 0.99


@pytest.mark.parametrize("norm,eps", [(Norm.L2, 0.3), (Norm.LINF, 2 / 255)])
def test_unbounded_attack_is_projected_into_the_budget(demo_model, demo_data, norm, eps):
    model, x, y = demo_model.module, demo_data.images[:16], demo_data.labels[:16]
    attack = ARTAttack(ARTParams(attack="DeepFool", params={"max_iter": 10}))
    x_adv = attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.inference_mode():
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()
