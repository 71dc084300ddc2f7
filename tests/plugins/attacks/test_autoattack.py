"""AutoAttack family: budget, range and determinism; strength against pgd and between members;
the 2-class fallback of apgd-t; Square without gradients; registration through the hook."""

from __future__ import annotations

import pytest
import torch

import medaudit.plugins.attacks._apgd as apgd_lib
import medaudit.plugins.attacks.autoattack as aa
from medaudit.core.components import Access, Norm
from medaudit.core.host import get_host
from medaudit.core.models import CallCounter
from medaudit.plugins.attacks.gradient import PGD, PGDParams

ATTACKS = [
    ("apgd-ce", lambda: aa.APGDCE(aa.APGDParams(steps=5))),
    ("apgd-ce-restarts", lambda: aa.APGDCE(aa.APGDParams(steps=3, restarts=2))),
    ("apgd-t", lambda: aa.APGDT(aa.APGDTParams(steps=5))),
    ("square", lambda: aa.Square(aa.SquareParams(queries=30))),
    ("apgd-dlr", lambda: aa.APGDDLR(aa.APGDParams(steps=5))),
    ("apgd-ce-eot", lambda: aa.APGDCE(aa.APGDParams(steps=3, eot_samples=2))),
    ("autoattack", lambda: aa.AutoAttack(aa.AutoAttackParams(apgd_steps=3, fab_steps=3, square_queries=20))),
    ("autoattack-plus", lambda: aa.AutoAttack(aa.AutoAttackParams(version="plus", apgd_steps=2, fab_steps=2,
                                                                  square_queries=10, restarts=2))),
    ("autoattack-rand", lambda: aa.AutoAttack(aa.AutoAttackParams(version="rand", apgd_steps=3, eot_samples=2))),
]
NORMS = [(Norm.LINF, 8 / 255), (Norm.L2, 0.5)]


def run(attack, model, x, y, eps, norm=Norm.LINF, seed=0):
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))


def correct(model, x, y) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).argmax(1) == y


def check_budget(x_adv, x, eps, norm, moved=True):
    assert x_adv.shape == x.shape
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > eps / 4).any() or not moved  # it did perturb


class NoGradients(torch.nn.Module):
    """Fails the test as soon as anyone could differentiate through the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        assert not torch.is_grad_enabled() and not x.requires_grad, "square asked for gradients"
        return self.inner(x)


class NeverCalled(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the model was called at eps = 0")


@pytest.mark.parametrize("norm,eps", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("name,make", ATTACKS)
def test_budget_and_range_hold_on_every_sample(name, make, norm, eps, demo_model, demo_data):
    x, y = demo_data.images[:16], demo_data.labels[:16]
    check_budget(run(make(), demo_model.module, x, y, eps, norm), x, eps, norm)


@pytest.mark.parametrize("norm,eps", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("name,make", ATTACKS)
def test_budget_holds_on_3d_volumes_with_three_classes(name, make, norm, eps):
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))
    model.eval().requires_grad_(False)
    x = torch.rand(6, 1, 6, 10, 10, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    # autoattack returns the clean input of the samples it cannot break (all of them here)
    check_budget(run(make(), model, x, y, eps, norm), x, eps, norm, moved=not name.startswith("autoattack"))


@pytest.mark.parametrize("name,make", ATTACKS)
def test_eps_zero_returns_the_inputs_without_calling_the_model(name, make, demo_data):
    x, y = demo_data.images[:8], demo_data.labels[:8]
    for norm, _ in NORMS:
        x_adv = run(make(), NeverCalled(), x, y, 0.0, norm)
        assert torch.equal(x_adv, x) and x_adv is not x


@pytest.mark.parametrize("norm,eps", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("name,make", ATTACKS)
def test_deterministic_under_a_fixed_seed(name, make, norm, eps, demo_model, demo_data):
    x, y = demo_data.images[:8], demo_data.labels[:8]
    a = run(make(), demo_model.module, x, y, eps / 4, norm, seed=7)
    b = run(make(), demo_model.module, x, y, eps / 4, norm, seed=7)
    assert torch.equal(a, b)


def test_gradients_reach_the_input_only(demo_model, demo_data):
    before = {k: v.clone() for k, v in demo_model.module.state_dict().items()}
    run(aa.APGDT(aa.APGDTParams(steps=2)), demo_model.module, demo_data.images[:8], demo_data.labels[:8], 4 / 255)
    assert all(torch.equal(before[k], v) for k, v in demo_model.module.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in demo_model.module.parameters())


def test_checkpoints_follow_the_paper():
    assert sorted(apgd_lib.checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]  # intervals 22, 19, 16, 13, 10, 7, 6, 6
    assert sorted(apgd_lib.checkpoints(20)) == [5, 9, 12, 14, 16, 18, 19, 20]


def test_targeted_loss_is_dlr_with_enough_classes_and_the_margin_with_two():
    y, t = torch.tensor([1]), torch.tensor([4])
    z = torch.tensor([[1.0, 4.0, 2.0, 0.0, 3.0]])
    # DLR-targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 - 3) / (4 - (2 + 1) / 2)
    assert apgd_lib.targeted_loss(z, y, t).item() == pytest.approx(-1 / 2.5)
    # DLR is invariant to shifting and scaling the logits; the margin is not.
    assert apgd_lib.targeted_loss(3 * z + 5, y, t).item() == pytest.approx(-1 / 2.5)
    # 3 classes: no fourth logit, the untargeted DLR scale z_pi1 - z_pi3 = 4 - 1.
    assert apgd_lib.targeted_loss(torch.tensor([[1.0, 4.0, 2.0]]), y, torch.tensor([2])).item() == pytest.approx(-2 / 3)
    # 2 classes: no third logit, the plain margin z_t - z_y.
    two = torch.tensor([[1.0, 4.0], [0.5, -2.0]])
    assert apgd_lib.targeted_loss(two, torch.tensor([1, 0]), torch.tensor([0, 1])).tolist() == [-3.0, -2.5]
    assert apgd_lib.targeted_loss(3 * two, torch.tensor([1, 0]), torch.tensor([0, 1])).tolist() == [-9.0, -7.5]


def test_dlr_loss_is_the_scale_free_negative_margin_and_the_margin_with_two_classes():
    z, y = torch.tensor([[1.0, 4.0, 2.0, 0.0]]), torch.tensor([1])
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) = -(4 - 2) / (4 - 1)
    assert apgd_lib.dlr_loss(z, y).item() == pytest.approx(-2 / 3)
    assert apgd_lib.dlr_loss(3 * z + 5, y).item() == pytest.approx(-2 / 3)
    two = torch.tensor([[1.0, 4.0]])
    assert apgd_lib.dlr_loss(two, torch.tensor([1])).item() == -3.0 and apgd_lib.dlr_loss(two, torch.tensor([0])).item() == 3.0


def test_eot_averages_every_gradient_over_that_many_forward_passes(demo_model, demo_data):
    x, y = demo_data.images[:4], demo_data.labels[:4]
    calls = {}
    for draws in (1, 3):
        counter = CallCounter(demo_model.module)
        run(aa.APGDCE(aa.APGDParams(steps=4, eot_samples=draws)), counter, x, y, 1 / 255)
        calls[draws] = counter.samples
    assert calls[3] == 3 * calls[1] == 3 * 4 * (4 + 1)  # the start and each step, each over 3 draws


def test_eot_on_a_randomised_model_averages_out_its_noise():
    """A linear model whose gradient carries large zero-mean noise on every pass: one draw's
    gradient points nowhere, the mean over many draws points at the boundary."""
    torch.manual_seed(0)
    w = torch.randn(1, 64)

    class NoisyGradient(torch.nn.Module):
        def forward(self, x):
            flat = x.flatten(1)
            noise = torch.randn(1, 64) * 8
            # Centred on the boundary at x = 0.5; the noise changes the gradient, not the value.
            score = flat @ w.T - 0.5 * w.sum() + (flat - flat.detach()) @ noise.T
            return torch.cat([score, -score], 1)

    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = NoisyGradient()
    y = model(x).argmax(1)
    robust = {}
    for draws in (1, 64):
        x_adv = run(aa.APGDCE(aa.APGDParams(steps=20, eot_samples=draws)), model, x, y, 0.1)
        robust[draws] = float((model(x_adv).argmax(1) == y).float().mean())
    assert robust[64] < robust[1] - 0.3, robust  # measured: 0.56 with one draw, 0.09 with 64


def test_versions_run_the_reference_members_and_custom_needs_its_list():
    names = {v: [m.name for m in aa.AutoAttack(aa.AutoAttackParams(version=v)).members()] for v in aa.VERSIONS}
    assert names == {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
                     "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
                     "rand": ["apgd-ce", "apgd-dlr"]}
    plus = aa.AutoAttack(aa.AutoAttackParams(version="plus")).members()
    assert plus[0].params.restarts == 5 and plus[2].params.restarts == 5 and plus[4].params.restarts == 1
    custom = aa.AutoAttack(aa.AutoAttackParams(version="custom", attacks=["square", "apgd-ce"]))
    assert [m.name for m in custom.members()] == ["square", "apgd-ce"]
    with pytest.raises(ValueError, match="version custom needs"):
        aa.AutoAttackParams(version="custom")
    with pytest.raises(ValueError, match="is for version custom"):
        aa.AutoAttackParams(attacks=["square"])


@pytest.fixture(scope="module")
def strength(demo_model, demo_data):
    """Robust flags per sample at eps = 1/255 (20 steps, 100 Square queries) on 32 images."""
    torch.set_num_threads(2)
    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    attacks = {
        "pgd": PGD(PGDParams(steps=20)),
        "apgd-ce": aa.APGDCE(aa.APGDParams(steps=20)),
        "apgd-t": aa.APGDT(aa.APGDTParams(steps=20)),
        "square": aa.Square(aa.SquareParams(queries=100)),
        "autoattack": aa.AutoAttack(aa.AutoAttackParams(apgd_steps=20, fab_steps=20, square_queries=100)),
    }
    flags = {name: correct(model, run(a, model, x, y, 1 / 255), y) for name, a in attacks.items()}
    return dict(flags, clean=correct(model, x, y))


def test_apgd_ce_is_at_least_as_strong_as_pgd(strength):
    assert strength["clean"].float().mean() > 0.85
    assert strength["apgd-ce"].float().mean() <= strength["pgd"].float().mean() + 0.03


def test_apgd_t_runs_on_a_binary_model_and_lowers_accuracy(demo_model, strength):
    assert demo_model.num_classes == 2  # the reference AutoAttack would fail here
    assert strength["apgd-t"].float().mean() < strength["clean"].float().mean() - 0.3


def test_autoattack_leaves_no_sample_that_a_member_alone_breaks(strength):
    for member in ("apgd-ce", "apgd-t", "square"):
        assert (strength["autoattack"] <= strength[member]).all(), member
    assert strength["autoattack"].float().mean() <= strength["apgd-ce"].float().mean()


def test_square_lowers_accuracy_without_gradients(demo_model, demo_data):
    model, x, y = NoGradients(demo_model.module), demo_data.images[:32], demo_data.labels[:32]
    x_adv = run(aa.Square(aa.SquareParams(queries=300)), model, x, y, 4 / 255)
    check_budget(x_adv, x, 4 / 255, Norm.LINF)
    with torch.no_grad():
        assert correct(model, x_adv, y).float().mean() < correct(model, x, y).float().mean() - 0.2


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 4 / 255), (Norm.L2, 0.5)])
def test_square_early_exit_gives_the_same_result_in_fewer_queries(norm, eps, demo_model, demo_data):
    """Fooled samples leave the search, as in the reference: the same search (every sample
    still draws its candidates), fewer samples through the model. The model's floating-point
    results may differ in the last bits with the batch's size, which can turn a near-tie:
    at most one of the 32 cases may end differently."""
    x, y, queries = demo_data.images[:32], demo_data.labels[:32], 200
    frozen, dropped = CallCounter(demo_model.module), CallCounter(demo_model.module)
    x_frozen = run(aa.Square(aa.SquareParams(queries=queries, early_exit=False)), frozen, x, y, eps, norm)
    x_dropped = run(aa.Square(aa.SquareParams(queries=queries)), dropped, x, y, eps, norm)
    assert frozen.samples == len(x) * queries
    with torch.no_grad():
        right_dropped, right_frozen = correct(demo_model.module, x_dropped, y), correct(demo_model.module, x_frozen, y)
    assert (right_dropped != right_frozen).sum() <= 1
    same = (x_dropped - x_frozen).flatten(1).abs().amax(1) < 1e-6
    assert same.sum() >= len(x) - 1
    assert not right_dropped.all()  # some samples were fooled and left early
    assert dropped.samples < 0.9 * frozen.samples


def test_the_module_registers_its_attacks_through_the_hook():  # as a built-in
    host = get_host(load_entry_points=False)
    attacks = host.components["attack"]
    expected = {"apgd-ce": aa.APGDCE, "apgd-t": aa.APGDT, "square": aa.Square, "autoattack": aa.AutoAttack}
    for name, cls in expected.items():
        assert attacks[name] is cls and cls.norms == {Norm.LINF, Norm.L2} and not cls.targeted
    assert aa.Square.needs is Access.SCORES and aa.AutoAttack.needs is Access.GRADIENTS
