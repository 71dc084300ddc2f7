"""autoattack-seg (ROG's AutoAttack for segmentation): budget and range, the worst-of-members
rule, strength on the demo U-Net, eps = 0, determinism, the K < 3 rule, 3D volumes, and
the pieces (DLR per voxel, the L-inf projection onto a hyperplane)."""

from __future__ import annotations

import pytest
import torch

import medaudit.plugins.attacks.autoattack_seg as aas
from medaudit.core.components import Norm, Task
from medaudit.core.host import get_host

EPS = 8 / 255
#: Small enough for CPU tests: ROG's members, 10 iterations, 40 Square queries.
CHEAP = dict(steps=10, queries=40)


@pytest.fixture(autouse=True)
def _one_thread():
    # Several test runs share 2 cores; one thread per process avoids oversubscription.
    torch.set_num_threads(1)


def run(attack, model, x, y, eps=EPS, seed=0):
    return attack.perturb(model, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(seed))


def dice(model, x, y):
    with torch.no_grad():
        return aas.dice(model(x), y)


def check_budget(x_adv, x, eps=EPS):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert (linf <= eps + 1e-6).all(), linf.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.fixture(scope="module")
def unet_runs(seg_model, seg_data):
    """Each member alone and the ensemble, same seed, on 8 phantom slices at 8/255."""
    torch.set_num_threads(1)
    model, x, y = seg_model.module, seg_data.images[:8], seg_data.masks[:8]
    alone = {
        name: run(aas.AutoAttackSeg(aas.AutoAttackSegParams(attacks=[name], **CHEAP)), model, x, y)
        for name in aas.MEMBERS
    }
    worst = run(aas.AutoAttackSeg(aas.AutoAttackSegParams(**CHEAP)), model, x, y)
    return model, x, y, alone, worst


def test_budget_and_range_hold_for_every_member_and_the_ensemble(unet_runs):
    _, x, _, alone, worst = unet_runs
    for x_adv in [*alone.values(), worst]:
        check_budget(x_adv, x)
    assert all((x_adv - x).abs().amax() > EPS / 2 for x_adv in alone.values())  # each member perturbed


def test_each_case_keeps_the_lowest_dice_over_the_members(unet_runs):
    model, x, y, alone, worst = unet_runs
    member_dice = torch.stack([dice(model, x_adv, y) for x_adv in alone.values()])
    clean, robust = dice(model, x, y), dice(model, worst, y)
    assert (robust <= member_dice + 1e-6).all()
    # By construction: min over the members (and the clean input), and the member's own output.
    assert torch.equal(robust, torch.minimum(member_dice.amin(0), clean))
    for i in range(len(x)):
        assert any(torch.equal(worst[i], x_adv[i]) for x_adv in [x, *alone.values()])


def test_dice_falls_well_below_clean_at_8_over_255(unet_runs):
    model, x, y, _, worst = unet_runs
    clean, robust = dice(model, x, y).mean(), dice(model, worst, y).mean()
    assert clean > 0.6
    assert robust < clean - 0.05, (clean, robust)


def test_members_and_their_order():
    attack = aas.AutoAttackSeg()
    assert list(attack.members(5)) == ["apgd-ce", "apgd-dlr", "fab-t", "square"]
    assert list(attack.members(2)) == ["apgd-ce", "fab-t", "square"]
    picked = aas.AutoAttackSeg(aas.AutoAttackSegParams(attacks=["square", "apgd-ce"], steps=7, queries=9))
    members = picked.members(5)
    assert list(members) == ["apgd-ce", "square"]
    assert members["apgd-ce"].params.steps == 7 and members["square"].params.queries == 9


class NeverCalled(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the model was called at eps = 0")


def test_eps_zero_returns_the_input_without_calling_the_model(seg_data):
    x, y = seg_data.images[:2], seg_data.masks[:2]
    x_adv = run(aas.AutoAttackSeg(), NeverCalled(), x, y, eps=0.0)
    assert torch.equal(x_adv, x) and x_adv is not x


def test_deterministic_under_a_fixed_seed(seg_model, seg_data):
    model, x, y = seg_model.module, seg_data.images[8:11], seg_data.masks[8:11]
    attack = aas.AutoAttackSeg(aas.AutoAttackSegParams(steps=3, queries=10))
    a, b = run(attack, model, x, y, seed=5), run(attack, model, x, y, seed=5)
    assert torch.equal(a, b)
    generator = torch.Generator().manual_seed(5)
    attack.perturb(model, x, y, eps=EPS, norm=Norm.LINF, generator=generator)
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(5).get_state())  # moved on


def test_dlr_is_skipped_on_a_two_class_model(seg_data):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1).eval().requires_grad_(False)
    x = seg_data.images[:2]
    y = (x[:, 0] > 0.3).long()
    with pytest.raises(RuntimeError):  # DLR needs a third logit
        aas.dense_dlr(model(x), y)
    x_adv = run(aas.AutoAttackSeg(aas.AutoAttackSegParams(steps=2, queries=3)), model, x, y)
    check_budget(x_adv, x)
    only_dlr = aas.AutoAttackSeg(aas.AutoAttackSegParams(attacks=["apgd-dlr"]))
    assert torch.equal(run(only_dlr, model, x, y), x)  # nothing to run


def test_runs_in_3d_within_the_budget():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    model.eval().requires_grad_(False)
    x = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:, 2:6, 4:12, 4:12] = 2  # some truth the clean prediction misses
    attack = aas.AutoAttackSeg(aas.AutoAttackSegParams(steps=3, queries=10))
    x_adv = run(attack, model, x, y)
    check_budget(x_adv, x)
    assert torch.equal(run(attack, model, x, y), x_adv)
    assert dice(model, x_adv, y) <= dice(model, x, y)
    for name, member in attack.members(3).items():
        check_budget(run(member, model, x, y), x)


def test_square_starts_from_stripes_constant_along_depth():
    """With one query, Square returns its initialisation: +-eps per (channel, H, W), the
    same on every slice of a volume."""
    model = torch.nn.Conv3d(1, 3, 1).eval().requires_grad_(False)
    x = torch.full((2, 1, 4, 6, 6), 0.5)
    y = torch.zeros(2, 4, 6, 6, dtype=torch.long)
    delta = run(aas.SquareSeg(aas.SquareSegParams(queries=1)), model, x, y) - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, EPS))
    assert (delta == delta[:, :, :1]).all()


def test_dense_dlr_per_voxel():
    # one case, 4 classes, 2 voxels: DLR = -(z_y - max other) / (z_pi1 - z_pi3)
    z = torch.tensor([[[3.0, 0.0], [1.0, 2.0], [0.0, 1.0], [2.0, 4.0]]])  # 1 x 4 x 2
    y = torch.tensor([[0, 1]])
    expected = (-(3 - 2) / (3 - 1) + -(2 - 4) / (4 - 1)) / 2
    assert aas.dense_dlr(z, y).item() == pytest.approx(expected)
    assert aas.dense_dlr(5 * z - 2, y).item() == pytest.approx(expected)  # shift and scale invariant


def test_linf_projection_onto_a_hyperplane_is_minimal():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, 12, generator=g, dtype=torch.float64)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    c = torch.tensor([0.5, -0.8, 0.0, 1e-3, -2.0, 50.0], dtype=torch.float64)
    d = aas.linf_to_hyperplane(p, w, c)
    assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
    for i in range(5):  # feasible rows: on the hyperplane, with the smallest L-inf norm (an LP)
        assert (w[i] @ d[i]).item() == pytest.approx(c[i].item(), abs=1e-9)
        n = p.shape[1]
        # variables (d, t): minimise t with -t <= d <= t, w . d = c, -p <= d <= 1 - p
        cost = [0.0] * n + [1.0]
        a_ub = torch.cat([torch.eye(n), -torch.eye(n)])
        a_ub = torch.cat([a_ub, -torch.ones(2 * n, 1)], 1)
        bounds = [(-p[i, j].item(), 1 - p[i, j].item()) for j in range(n)] + [(0, None)]
        lp = scipy_optimize.linprog(cost, A_ub=a_ub.numpy(), b_ub=[0.0] * (2 * n), A_eq=[w[i].tolist() + [0.0]],
                                    b_eq=[c[i].item()], bounds=bounds)
        assert d[i].abs().max().item() == pytest.approx(lp.fun, abs=1e-7)
    # out of reach: every coordinate moves to the box, towards the hyperplane
    assert torch.allclose(d[5], torch.where(w[5] > 0, 1 - p[5], -p[5]))


def test_registered_for_segmentation_only():
    cls = get_host(load_entry_points=False).get("attack", "autoattack-seg")
    assert cls is aas.AutoAttackSeg
    assert cls.tasks == frozenset({Task.SEGMENTATION}) and cls.dims == frozenset({2, 3})
    assert cls.norms == frozenset({Norm.LINF}) and not cls.targeted
