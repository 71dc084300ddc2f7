"""Norms as objects: sizes, projections, steps and random starts for every norm the spec
accepts; linf and l2 keep the numbers of the formulas they replace; L0 works end to end
with the one attack that declares it, and a norm no attack bounds is refused by the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaudit.core.components import Norm
from medaudit.core.errors import SpecError
from medaudit.core.norms import L0, norm_of, perturbation_sizes
from medaudit.core.perturbation import ascent_step, project, random_start
from medaudit.core.spec import load_spec

#: Budgets per norm for 2 x 3 x 8 x 8 images: a few grey levels, a few L2 / L1 units, 10 % of pixels.
EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5, Norm.L1: 2.0, Norm.L0: 0.1}


def images(seed: int = 0, shape=(2, 3, 8, 8)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def far_point(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A point well outside every ball above, partly outside [0, 1]."""
    return x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# -- every norm: projections land in the ball and in [0, 1], and are idempotent ---------


@pytest.mark.parametrize("norm", list(Norm))
def test_projection_lands_in_the_ball_and_range_and_is_idempotent(norm):
    x, eps, geometry = images(), EPS[norm], norm_of(norm)
    p = project(far_point(x), x, eps, norm)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert p.min() >= 0 and p.max() <= 1
    assert (geometry.size(p - x) <= eps * (1 + 1e-5)).all(), geometry.size(p - x)
    assert (geometry.size(p - x) >= eps * 0.5).all()  # it did not just return x
    torch.testing.assert_close(project(p, x, eps, norm), p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", list(Norm))
def test_random_start_lies_in_the_ball_and_range_and_follows_the_seed(norm):
    x, eps = images(), EPS[norm]
    a = random_start(x, eps, norm, torch.Generator().manual_seed(3))
    assert a.min() >= 0 and a.max() <= 1
    assert (norm_of(norm).size(a - x) <= eps * (1 + 1e-5)).all()
    assert not torch.equal(a, x)
    assert torch.equal(a, random_start(x, eps, norm, torch.Generator().manual_seed(3)))


def test_sizes_of_a_known_perturbation():
    delta = torch.zeros(1, 3, 4, 4)
    delta[0, 0, 0, 0], delta[0, 2, 0, 0], delta[0, 1, 3, 2] = 0.5, -0.25, 0.125  # two positions change
    assert norm_of("linf").size(delta).item() == 0.5
    assert norm_of("l2").size(delta).item() == pytest.approx((0.25 + 0.0625 + 0.015625) ** 0.5)
    assert norm_of("l1").size(delta).item() == 0.875
    assert norm_of("l0").size(delta).item() == 2 / 16  # positions, all channels together
    sizes = perturbation_sizes(delta, Norm.L0)
    assert list(sizes) == ["linf", "l2", "l0"] and sizes["l0"].tolist() == [0.125]
    assert list(perturbation_sizes(delta, Norm.LINF)) == ["linf", "l2"]


# -- L1: the exact projection and the steepest-ascent step ------------------------------


def duchi_reference(v: np.ndarray, eps: float) -> np.ndarray:
    """Euclidean projection of one vector onto the L1 ball (Duchi et al. 2008, Fig. 1), slow and plain."""
    if np.abs(v).sum() <= eps:
        return v.copy()
    u = np.sort(np.abs(v))[::-1]
    css = np.cumsum(u)
    rho = max(j for j in range(len(u)) if u[j] - (css[j] - eps) / (j + 1) > 0)
    theta = (css[rho] - eps) / (rho + 1)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


@pytest.mark.parametrize("eps", [0.05, 1.0, 7.5, 1000.0])
def test_l1_projection_matches_the_reference(eps):
    delta = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = norm_of(Norm.L1).shrink(delta, eps)
    for i in range(len(delta)):
        want = duchi_reference(delta[i].flatten().numpy(), eps)
        np.testing.assert_allclose(got[i].flatten().numpy(), want, rtol=0, atol=1e-12)
    assert (got.flatten(1).abs().sum(1) <= eps + 1e-9).all()
    assert torch.equal(norm_of(Norm.L1).shrink(delta, 0.0), torch.zeros_like(delta))


def test_l1_step_moves_the_largest_gradient_coordinate_by_the_step_size():
    x, grad = torch.full((2, 1, 2, 2), 0.5), torch.tensor([[[[0.1, -3.0], [2.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.2]]]])
    moved = ascent_step(x, grad, 0.25, Norm.L1) - x
    assert torch.equal(moved, torch.tensor([[[[0.0, -0.25], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.25]]]]))


# -- L0: projection keeps the largest changes; no gradient step --------------------------


def test_l0_projection_keeps_the_positions_with_the_largest_change():
    x = torch.full((1, 2, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] += 0.1  # position (0, 0): change 0.1
    x_adv[0, 1, 0, 1] -= 0.4  # position (0, 1): change 0.4
    x_adv[0, 0, 1, 1] += 0.3  # position (1, 1): change 0.3 in one channel ...
    x_adv[0, 1, 1, 1] += 0.2  # ... and 0.2 in the other: both kept together
    p = project(x_adv, x, 0.5, Norm.L0)  # 2 of 4 positions
    want = x.clone()
    want[0, 1, 0, 1], want[0, 0, 1, 1], want[0, 1, 1, 1] = x_adv[0, 1, 0, 1], x_adv[0, 0, 1, 1], x_adv[0, 1, 1, 1]
    assert torch.equal(p, want)
    assert torch.equal(project(x_adv, x, 0.0, Norm.L0), x)
    assert L0.budget(3 / 4096, 64 * 64) == 3 and L0.budget(0.001, 4096) == 4


def test_l0_has_no_gradient_step():
    with pytest.raises(ValueError, match="l0 norm has no steepest-ascent step"):
        ascent_step(images(), images(1), 0.1, Norm.L0)


# -- linf and l2: the numbers of the formulas they replace ------------------------------


def _old_l2(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def old_step(x_adv, grad, step, norm):
    return x_adv + step * grad.sign() if norm is Norm.LINF else x_adv + step * grad / _old_l2(grad)


def old_project(x_adv, x, eps, norm):
    delta = x_adv - x
    delta = delta.clamp(-eps, eps) if norm is Norm.LINF else delta * (eps / _old_l2(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def old_random_start(x, eps, norm, generator):
    if norm is Norm.LINF:
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        noise = direction / _old_l2(direction) * radius * eps
    return (x + noise).clamp(0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_linf_and_l2_are_bit_identical_to_the_old_formulas(norm, dtype):
    x = images(0, (4, 1, 9, 7)).to(dtype)
    grad, z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype), far_point(x)
    for step in (1 / 255, 0.37):
        assert torch.equal(ascent_step(x, grad, step, norm), old_step(x, grad, step, norm))
    for eps in (0.0, 1 / 255, 0.3, 5.0):
        assert torch.equal(project(z, x, eps, norm), old_project(z, x, eps, norm))
        new = random_start(x, eps, norm, torch.Generator().manual_seed(9))
        assert torch.equal(new, old_random_start(x, eps, norm, torch.Generator().manual_seed(9)))
    # The record fields the engine has always written.
    delta = (z - x).float()
    assert torch.equal(norm_of(Norm.LINF).size(delta), delta.flatten(1).abs().amax(1))
    assert torch.equal(norm_of(Norm.L2).size(delta), delta.flatten(1).norm(dim=1))


# -- the spec: L0 works with onepixel, other attacks and L1 are refused -----------------


def test_spec_accepts_l0_for_onepixel_and_refuses_gradient_attacks(write_spec, host):
    threat = "threat_model:\n  norm: l0\n  epsilons: [0, 3/4096]"
    spec = load_spec(write_spec(threat_model=threat, attacks="attacks:\n  - name: onepixel\n    params: {pixels: 3}"), host)
    assert spec.threat_model.norm is Norm.L0
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(threat_model=threat, attacks="attacks:\n  - name: pgd"), host)
    assert any("attack 'pgd' does not bound the l0 norm" in p for p in info.value.problems)
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(threat_model="threat_model:\n  norm: l0\n  epsilons: [0, 2]",
                             attacks="attacks:\n  - name: onepixel"), host)
    assert any("fraction of pixels" in p for p in info.value.problems)


def test_no_built_in_attack_bounds_l1_so_the_spec_refuses_it(write_spec, host):
    assert not [name for name, cls in host.components["attack"].items() if Norm.L1 in cls.norms]
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(threat_model="threat_model:\n  norm: l1\n  epsilons: [0, 2.0]"), host)
    assert any("does not bound the l1 norm" in p for p in info.value.problems)


def test_onepixel_under_l0_stays_within_the_budget_as_the_engine_measures_it():
    from medaudit.plugins.attacks.onepixel import OnePixel, OnePixelParams

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2)).eval()
    x = images(0, (6, 1, 16, 16))
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts classified "correctly": all are attacked
    eps = 3 / (16 * 16)
    attack = OnePixel(OnePixelParams(pixels=3, population=8, generations=2))
    x_adv = attack.perturb(model, x, y, eps=eps, norm=Norm.L0, generator=torch.Generator().manual_seed(0))
    sizes = perturbation_sizes((x_adv - x).float(), Norm.L0)
    assert sizes["l0"].max() > 0 and sizes["l0"].max() <= eps
    assert torch.equal(project(x_adv, x, eps, Norm.L0), x_adv)  # already inside: the projection keeps it
