"""The universal adversarial perturbation attack ``uap``: one v for every image, fitted once
per model and epsilon; budget, range, determinism; stronger than random noise; transfer
from another dataset; targeted variant; registration."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import AttackContext, Norm
from medaudit.core.errors import DataError
from medaudit.core.host import get_host
from medaudit.plugins.attacks.universal import UAP, FitData, UAPParams

EPS = 2 / 255


def predict(model, x):
    with torch.inference_mode():
        return model(x).argmax(1)


def context(data):
    datasets = get_host(load_entry_points=False).components["dataset"]

    def load_dataset(name, params):
        try:
            cls = datasets[name]
        except KeyError:
            raise DataError(f"unknown dataset {name!r}") from None
        return cls(cls.Params.model_validate(params)).load()

    return AttackContext(data=data, load_dataset=load_dataset, device=torch.device("cpu"))


def run(attack, model, x, y, eps=EPS, norm=Norm.LINF, seed=0):
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted(demo_model, demo_data):
    """An untargeted UAP fitted (transductively) on the demo data at eps 2/255 L-inf."""
    attack = UAP(UAPParams(max_passes=3))
    attack.prepare(context(demo_data))
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    x_adv = run(attack, model, x, y)
    return attack, x_adv


def test_one_perturbation_for_all_images_fitted_once(fitted, demo_model, demo_data):
    attack, _ = fitted
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    a, b = x[:16], x[40:56]
    da, db = run(attack, model, a, y[:16], seed=1) - a, run(attack, model, b, y[40:56], seed=2) - b
    # Where no clipping to [0, 1] happened, both batches got exactly the same v.
    v = attack.universal_perturbation(model, a, eps=EPS, norm=Norm.LINF, generator=torch.Generator())
    inside = ((a + v) >= 0) & ((a + v) <= 1) & ((b + v) >= 0) & ((b + v) <= 1)
    assert inside.float().mean() > 0.5
    assert torch.allclose(da[inside], db[inside], atol=1e-6)
    assert torch.allclose(da[inside], v.expand_as(a)[inside], atol=1e-6)
    assert attack.fit_count == 1  # the fit ran once, on the first call
    assert v.abs().amax() <= EPS + 1e-7 and v.abs().amax() > EPS / 4
    assert 0 < attack.last_fit_zeta < 0.05


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, EPS), (Norm.L2, 0.5)])
def test_budget_and_range_hold_on_every_sample(norm, eps, fitted, demo_model, demo_data):
    x, y = demo_data.images[:32], demo_data.labels[:32]
    if norm is Norm.LINF:
        x_adv = fitted[1][:32]
    else:
        attack = UAP(UAPParams(max_passes=1, fit_samples=32))
        x_adv = run(attack, demo_model.module, x, y, eps, norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > eps / 20).all()  # every image is perturbed (one L2 step is 0.2 eps)


def test_eps_zero_is_the_identity(demo_model, demo_data):
    attack = UAP()
    x, y = demo_data.images[:8], demo_data.labels[:8]
    assert torch.equal(run(attack, demo_model.module, x, y, eps=0.0), x)
    assert attack.fit_count == 0


def test_deterministic_under_a_fixed_seed(demo_model, demo_data):
    x, y = demo_data.images[:32], demo_data.labels[:32]
    make = lambda: UAP(UAPParams(max_passes=1, fit_samples=24, batch_size=8))  # noqa: E731
    a = run(make(), demo_model.module, x, y, seed=3)
    b = run(make(), demo_model.module, x, y, seed=3)
    assert torch.equal(a, b)


def test_fools_more_than_random_noise_of_the_same_size(fitted, demo_model, demo_data):
    attack, x_adv = fitted
    model, x = demo_model.module, demo_data.images
    clean = predict(model, x)
    uap_rate = (predict(model, x_adv) != clean).float().mean().item()
    g = torch.Generator().manual_seed(0)
    noise = (torch.randint(0, 2, (1, *x.shape[1:]), generator=g) * 2 - 1).float() * EPS
    noise_rate = (predict(model, (x + noise).clamp(0, 1)) != clean).float().mean().item()
    print(f"fooling rate at eps 2/255 L-inf: uap {uap_rate:.3f}, random-sign noise {noise_rate:.3f}")
    assert uap_rate >= noise_rate + 0.08
    assert attack.last_fit_fooling_rate == pytest.approx(uap_rate)


def test_fitted_on_another_dataset_still_lowers_accuracy(demo_model, demo_data):
    attack = UAP(UAPParams(fit_data=FitData(dataset="phantom", params={"n": 64, "size": 64, "seed": 11}), max_passes=3))
    attack.prepare(context(demo_data))
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    clean_acc = (predict(model, x) == y).float().mean().item()
    adv_acc = (predict(model, run(attack, model, x, y, eps=4 / 255)) == y).float().mean().item()
    print(f"transfer (fit phantom seed 11, eval seed 0) at eps 4/255: accuracy {clean_acc:.3f} -> {adv_acc:.3f}")
    assert adv_acc <= clean_acc - 0.05


def test_unknown_fit_dataset_fails_in_prepare(demo_data):
    bad = UAP(UAPParams(fit_data=FitData(dataset="no-such-set", params={})))
    with pytest.raises(DataError, match="no-such-set"):
        bad.prepare(context(demo_data))
    wrong_params = UAP(UAPParams(fit_data=FitData(dataset="phantom", params={"n": 8, "colour": 1})))
    with pytest.raises(DataError, match="phantom"):
        wrong_params.prepare(context(demo_data))
    wrong_shape = UAP(UAPParams(fit_data=FitData(dataset="phantom", params={"n": 4, "size": 32})))
    with pytest.raises(DataError, match="shape"):
        wrong_shape.prepare(context(demo_data))


def test_targeted_pushes_images_to_the_target_class(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    attack = UAP(UAPParams(targeted_class=1, max_passes=3))
    before = (predict(model, x) == 1).float().mean().item()
    after = (predict(model, run(attack, model, x, y)) == 1).float().mean().item()
    print(f"targeted to class 1 at eps 2/255: predicted as target {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1


def test_registered():
    host = get_host(load_entry_points=False)  # a built-in
    cls = host.get("attack", "uap")
    assert cls is UAP and cls.norms == {Norm.LINF, Norm.L2} and cls.dims == {2, 3}
    assert cls.summary().startswith("Universal adversarial perturbation")


def test_fitted_perturbations_are_restored_in_another_process_without_fitting(fitted, demo_model, demo_data, monkeypatch):
    import copy
    import io

    attack, x_adv = fitted
    buffer = io.BytesIO()
    torch.save(attack.export_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["perturbations"]) >= 1

    monkeypatch.setattr(UAP, "_fit", lambda *args, **kwargs: pytest.fail("restored UAP fitted again"))
    restored = UAP(UAPParams(max_passes=3))
    restored.restore_state(state)
    # Another process loads the same model into another object: same content, same perturbation.
    model = copy.deepcopy(demo_model.module)
    x, y = demo_data.images, demo_data.labels
    assert torch.equal(run(restored, model, x, y, seed=7), x_adv)


def test_perturbations_are_kept_per_model_content(demo_model, demo_data):
    import copy

    from medaudit.plugins.attacks.universal import model_key

    model = demo_model.module
    same, other = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert model_key(same) == model_key(model) != model_key(other)
    attack = UAP(UAPParams(max_passes=1, fit_samples=16, batch_size=8))
    x, y = demo_data.images[:16], demo_data.labels[:16]
    run(attack, model, x, y)
    run(attack, same, x, y)
    assert attack.fit_count == 1
    run(attack, other, x, y)
    assert attack.fit_count == 2
