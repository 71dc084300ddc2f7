"""Targeted segmentation attacks: ``asma``, ``dag``, ``dag-medical``, ``msa``.

Run against a small trained 2D U-Net (5 classes) on 64-px phantom slices: the session
fixtures ``seg_model``/``seg_data`` of conftest. Few cases and modest step counts keep the
file to seconds on two CPU cores (beyond training the shared U-Net once per session).
"""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import AttackContext, Norm, Task
from medaudit.core.host import get_host
from medaudit.core.segmentation import dice_per_class, foreground_mean, pixel_accuracy
from medaudit.plugins.attacks.segmentation import ASMA, DAG, MSA, DAGMedical, target_iou

#: Cases attacked in the success tests (spread over the data).
CASES = [1, 9, 17, 25]


@pytest.fixture(scope="module")
def seg(seg_model, seg_data):
    """``(module, data)``: conftest's trained 2D U-Net (5 classes) and 32 phantom cases."""
    return seg_model.module, seg_data


def context(data, task=Task.SEGMENTATION, num_classes=5):
    return AttackContext(data=data, load_dataset=lambda *a: data, device=torch.device("cpu"), task=task, num_classes=num_classes)


def make(cls, data, **params):
    attack = cls(cls.Params.model_validate(params))
    attack.prepare(context(data))
    return attack


def run(attack, model, x, y, eps, norm=Norm.LINF):
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(0))


def scores(model, x_adv, target):
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    return {
        "iou": target_iou(pred, target, 5),
        "dice": foreground_mean(dice_per_class(pred, target, 5)),
        "acc": pixel_accuracy(pred, target),
        "pred": pred,
    }


@pytest.fixture(scope="module")
def batch(seg):
    model, data = seg
    return model, data, data.images[CASES], data.masks[CASES]


@pytest.fixture(scope="module")
def asma_result(batch):
    """ASMA with its defaults, unbounded (L-inf eps = 1 cannot bind on [0, 1] images)."""
    model, data, x, y = batch
    attack = make(ASMA, data)
    x_adv = run(attack, model, x, y, 1.0)
    return attack, x_adv, scores(model, x_adv, attack.target_masks(y))


def test_registered(host):
    for name, cls in [("asma", ASMA), ("dag", DAG), ("dag-medical", DAGMedical), ("msa", MSA)]:
        assert host.get("attack", name) is cls
        assert cls.targeted and cls.tasks == frozenset({Task.SEGMENTATION}) and cls.dims == frozenset({2, 3})
        assert cls.norms == frozenset({Norm.LINF, Norm.L2})
        assert "target" in cls.Params.model_fields
    assert "reconstruction from the" in MSA.__doc__ and "abstract" in MSA.__doc__


def test_asma_reaches_the_target_within_its_default_budget(batch, asma_result):
    """Default params (300 steps at most, early stop at 99 % pixel accuracy), unbounded:
    ASMA is a minimal-perturbation attack, so its budget is its step count."""
    model, data, x, y = batch
    attack, x_adv, s = asma_result
    target = attack.target_masks(y)
    with torch.no_grad():
        clean_pred = model(data.images).argmax(1)
    missing = sorted(set(target.unique().tolist()) - set(clean_pred.unique().tolist()))
    assert not missing, f"the segmentation model never predicts classes {missing}: no attack can reach these targets"
    clean = scores(model, x, target)
    assert (clean["iou"] < 0.7).all(), "targets should differ from the clean prediction"
    reached = (s["iou"] >= 0.9) | (s["dice"] >= 0.9)
    assert reached.float().mean() >= 0.7, f"IoU {s['iou'].tolist()} Dice {s['dice'].tolist()}"
    assert (s["acc"] >= 0.99).float().mean() >= 0.7
    trace = attack.trace["pixel_accuracy"]
    assert trace.shape[1] == len(CASES) and trace.shape[0] <= ASMA.Params().steps + 1
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_asma_keeps_first_success(asma_result):
    attack, x_adv, s = asma_result
    trace = attack.trace["pixel_accuracy"]
    success = trace >= attack.params.success
    # A case that succeeded returns a successful iterate.
    assert (s["acc"][success.any(0)] >= attack.params.success).all()


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 2 / 255), (Norm.L2, 0.3)])
@pytest.mark.parametrize(
    "cls,params",
    [(ASMA, {"steps": 4}), (DAG, {"steps": 4}), (DAGMedical, {"steps": 4}), (MSA, {"steps": 4})],
    ids=["asma", "dag", "dag-medical", "msa"],
)
def test_budget_range_and_determinism(seg, cls, params, norm, eps):
    model, data = seg
    x, y = data.images[:3], data.masks[:3]
    attack = make(cls, data, **params)
    x_adv = run(attack, model, x, y, eps, norm)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and (size > 0).any()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(run(attack, model, x, y, 0.0, norm), x)
    assert torch.equal(run(make(cls, data, **params), model, x, y, eps, norm), x_adv)
    assert not any(p.requires_grad for p in model.parameters())


#: A fake finding: a nodule-class disc painted into the left lung.
FAKE_NODULE = {"mode": "shape", "centre": [0.4, 0.3], "size": 0.15}


def test_dag_shrinks_the_active_set_and_reaches_the_target(batch):
    model, data, x, y = batch
    # The official code's variant (subtract the current prediction) with 4/255 steps: the
    # paper's 0.5/255 needs hundreds of steps on this model.
    attack = make(DAG, data, steps=100, gamma=4 / 255, subtract="current_prediction", target={**FAKE_NODULE})
    x_adv = run(attack, model, x, y, 1.0)
    active = attack.trace["active"]
    assert (active[-1] <= 0.5 * active[0]).all(), active[[0, -1]].tolist()
    target = attack.target_masks(y)
    s = scores(model, x_adv, target)
    assert (s["iou"] >= 0.9).float().mean() >= 0.7, s["iou"].tolist()
    fg = (y != 0).flatten(1).sum(1)
    wrong = (s["pred"] != target).flatten(1).sum(1)
    assert (wrong <= 0.02 * fg).float().mean() >= 0.7, f"pixels off target {wrong.tolist()} (foreground {fg.tolist()})"


def test_dag_medical_runs(batch):
    model, data, x, y = batch
    attack = make(DAGMedical, data)
    x_adv = run(attack, model, x, y, 1.0, Norm.L2)
    active = attack.trace["active"]
    assert active.shape == (21, len(CASES)) or (active.shape[0] < 21 and active.shape[1] == len(CASES))
    # The active set excludes pixels whose truth is background.
    with torch.no_grad():
        pred = model(x).argmax(1)
    first = ((pred != attack.target_masks(y)) & (y != 0)).flatten(1).float().mean(1)
    assert torch.allclose(active[0], first)
    assert active[-1].mean() < active[0].mean()
    # 20 L2 steps of 0.07 at most (clipping only shortens them).
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 20 * 0.07 + 1e-4).all()


def test_msa_moves_the_prediction_to_the_target(batch):
    model, data, x, y = batch
    attack = make(MSA, data, steps=60)
    taps = [name for name, _ in attack.taps(model)]
    assert len(taps) == 4 and all("decoder.blocks." in n for n in taps)
    x_adv = run(attack, model, x, y, 1.0)
    target = attack.target_masks(y)
    clean, s = scores(model, x, target), scores(model, x_adv, target)
    # Measured with the defaults on 8 cases: mean IoU 0.96 vs ASMA's 0.94 at a
    # lower mean L2 (7.4 vs 8.3). Guaranteed here, in 60 steps: the pixels off target at
    # least halve on every case.
    assert (1 - s["acc"] <= 0.5 * (1 - clean["acc"])).all(), f"{clean['acc'].tolist()} -> {s['acc'].tolist()}"
    # Each step: two unit terms (output + the features' weighted sum) at 1/255 RMS per pixel.
    bound = 60 * 2 / 255 * x[0].numel() ** 0.5
    assert ((x_adv - x).flatten(1).norm(dim=1) <= bound + 1e-4).all()


def test_msa_layers_param_and_output_only_modes(seg):
    model, data = seg
    attack = make(MSA, data, layers=["decoder.blocks.3"])
    assert [n.split(".")[-3:] for n, _ in attack.taps(model)] == [["decoder", "blocks", "3"]]
    with pytest.raises(ValueError, match="no module"):
        make(MSA, data, layers=["no-such-layer"]).taps(model)
    # other_case: X_T is the image of the case whose mask is the target.
    y = data.masks[:4]
    maker = attack._maker()
    target, index = maker.choose(y)
    assert torch.equal(target, maker(y)) and torch.equal(data.masks[maker.pool_index[index]], target)
    assert torch.equal(attack._candidate_images[index], data.images[maker.pool_index[index]])
    # Other modes have no such image: output loss alone (and no hooks left behind).
    shape = make(MSA, data, steps=2, target={"mode": "shape"})
    assert shape._candidate_images is None
    x_adv = run(shape, model, data.images[:2], data.masks[:2], 4 / 255)
    assert (x_adv - data.images[:2]).abs().max() <= 4 / 255 + 1e-6
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("cls", [ASMA, DAG], ids=["asma", "dag"])
def test_remove_class_targets_are_followed(seg, cls):
    """Erase the nodule (class 4). The default 99 % pixel-accuracy stop is coarser than a
    64-px nodule (about 12 pixels), so the attacks are asked for exact targets here."""
    model, data = seg
    with torch.no_grad():
        pred = model(data.images).argmax(1)
    has = ((pred == 4).flatten(1).sum(1) > 0).nonzero().flatten()[:3]
    assert len(has) > 0, "the model predicts no nodule on the phantom cases"
    x, y = data.images[has], data.masks[has]
    params = {"success": 1.0} if cls is ASMA else {"subtract": "current_prediction", "gamma": 4 / 255, "stop_fraction": 0.0}
    attack = make(cls, data, steps=60, target={"mode": "remove_class", "cls": 4}, **params)
    target = attack.target_masks(y)
    assert not (target == 4).any() and torch.equal(target[y != 4], y[y != 4])
    x_adv = run(attack, model, x, y, 1.0)
    s = scores(model, x_adv, target)
    assert not (s["pred"] == 4).any(), "the nodule is still predicted"
    assert (s["acc"] >= 0.995).all()


def test_target_masks_deterministic_and_batch_independent(seg):
    model, data = seg
    y = data.masks[:8]
    for cls in (ASMA, DAG, MSA):
        attack = make(cls, data)
        whole = attack.target_masks(y)
        assert torch.equal(whole, attack.target_masks(y))
        assert torch.equal(whole, torch.cat([attack.target_masks(y[i : i + 1]) for i in range(8)]))
        assert torch.equal(whole, make(cls, data).target_masks(y))
        assert ((whole != y).flatten(1).any(1)).all()


def test_prepare_rejects_classification(seg):
    _, data = seg
    for cls in (ASMA, DAG, DAGMedical, MSA):
        with pytest.raises(ValueError, match="segmentation"):
            cls().prepare(context(data, task=Task.CLASSIFICATION, num_classes=2))


def test_get_host_lists_them():
    names = set(get_host(load_entry_points=False).components["attack"])
    assert {"asma", "dag", "dag-medical", "msa"} <= names


@pytest.mark.parametrize("cls", [ASMA, DAG, DAGMedical, MSA], ids=["asma", "dag", "dag-medical", "msa"])
def test_volumes(cls):
    """3D: a tiny untrained 3D conv net on phantom volumes; shapes, budget and range."""
    from medaudit.plugins.datasets.phantom import Phantom, PhantomParams

    data = Phantom(PhantomParams(n=4, size=16, depth=8, seed=0)).load()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 5, 1)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    attack = make(cls, data, steps=3, layers=["0"]) if cls is MSA else make(cls, data, steps=3)
    x, y = data.images[:2], data.masks[:2]
    assert attack.target_masks(y).shape == y.shape
    x_adv = run(attack, model, x, y, 4 / 255)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
