"""Fitted defense state: a defense fitted once (detectors, Medical Aegis, detect-then-route,
adversarial training) exports what it fitted, and another process restores the same
defended model from that state without fitting again."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from medaudit.core.adaptive import bind_labels
from medaudit.core.components import AttackContext
from medaudit.core.host import get_host
from medaudit.plugins.defenses import _detectors as lib
from medaudit.plugins.defenses import detectors, trained

TRAIN = {"dataset": "phantom", "params": {"n": 40, "size": 64, "seed": 5}}
PGD_AT = {"train_data": TRAIN, "epochs": 1, "batch_size": 20, "steps": 1}

#: Fitting defenses, on tiny data with short fits, by name and params.
CASES = {
    "mahalanobis": ("mahalanobis", {"train_data": TRAIN}),
    "mahalanobis-layers": ("mahalanobis", {"train_data": TRAIN, "layers": ["auto"], "fit_attack_eps": 0.03}),
    "kd-bu": ("kd-bu", {"train_data": TRAIN, "mc_samples": 4}),
    "lid": ("lid", {"train_data": TRAIN, "k": 5, "batch_size": 12, "reference_batches": 2, "fit_attack_eps": 0.03}),
    "uad": ("uad", {"train_data": TRAIN}),
    "medical-aegis": ("medical-aegis", {"train_data": TRAIN, "epochs": 2, "widths": (4, 4, 4), "fine_tune_epochs": 1}),
    "pgd-at": ("pgd-at", PGD_AT),
    "detect-then-route": ("detect-then-route", {"detector": {"name": "lid", "params": {"train_data": TRAIN, "k": 5}},
                                                "robust": {"name": "pgd-at", "params": PGD_AT}}),
}


def make_context(model, data, host) -> AttackContext:
    """What the runner gives a defense: datasets by name, and other defenses applied to the model."""

    def load_dataset(name, params):
        cls = host.components["dataset"][name]
        return cls(cls.Params.model_validate(params)).load()

    context = AttackContext(data=data, load_dataset=load_dataset, device=torch.device("cpu"), num_classes=2)

    def apply_defense(name, params):
        return make_defense(host, name, params, context).apply(model, data)

    context.apply_defense = apply_defense
    return context


def make_defense(host, name, params, context=None):
    cls = host.components["defense"][name]
    defense = cls(cls.Params.model_validate(params))
    if context is not None:
        defense.prepare(context)
    return defense


def outputs(defended, x, y) -> dict[str, torch.Tensor]:
    """Everything an audit reads of a defended model on one batch: the module's logits, the
    detector's scores and every view's logits and input gradients (labels bound)."""
    views = {"adaptive": defended.adaptive_module, **defended.views}
    out = {"module": defended.module(x)}
    if defended.screen is not None:
        out["scores"] = defended.screen(x)
    for name, view in views.items():
        if view is None:
            continue
        bind_labels(view, x, y)
        x_in = x.clone().requires_grad_(True)
        logits = view(x_in)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), x_in)
        out[name], out[f"{name}-grad"] = logits.detach(), grad
        bind_labels(view, None, None)
    return out


def forbid_fitting(monkeypatch):
    """Make every fitting path raise: restore must not reach one."""

    def boom(*args, **kwargs):
        raise AssertionError("restore fitted again")

    for cls in (lib.MahalanobisDetector, lib.KernelDensityDetector, lib.LIDDetector, lib.UADDetector, lib.ShieldDetector):
        monkeypatch.setattr(cls, "fit", boom)
    monkeypatch.setattr(detectors, "standard_training", boom)
    monkeypatch.setattr(detectors._DetectorDefense, "protect", boom)
    monkeypatch.setattr(trained._AdversarialTraining, "fit", boom)
    monkeypatch.setattr(trained.TrainedDefense, "apply", boom)


#: Cases that train a network (a Shield, adversarial training) or fit a regression: slow on two cores.
SLOW = {"medical-aegis", "pgd-at", "detect-then-route", "lid", "mahalanobis-layers"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_restore_gives_the_applied_defense_without_fitting(case, demo_model, demo_data, monkeypatch):
    host = get_host(load_entry_points=False)
    name, params = CASES[case]
    context = make_context(demo_model, demo_data, host)
    defense = make_defense(host, name, params, context)
    defended = defense.apply(demo_model, demo_data)
    buffer = io.BytesIO()
    torch.save(defense.export_state(defended), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    x, y = demo_data.images[:16], demo_data.labels[:16]
    expected = outputs(defended, x, y)
    forbid_fitting(monkeypatch)
    context.apply_defense = lambda *args: pytest.fail("restore applied a part again")
    restored = make_defense(host, name, params, context).restore(demo_model, demo_data, state)
    got = outputs(restored, x, y)

    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert restored.fingerprint == defended.fingerprint
    assert restored.description == defended.description
    assert restored.source == defended.source


def test_detector_state_holds_only_plain_values(demo_model, demo_data):
    """What torch.load(weights_only=True) reads back: tensors, numbers, strings, lists, dicts."""
    host = get_host(load_entry_points=False)
    name, params = CASES["medical-aegis"]
    defense = make_defense(host, name, params, make_context(demo_model, demo_data, host))
    state = defense.export_state(defense.apply(demo_model, demo_data))

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))

    assert plain(state)
    assert state["classifier"] is not None  # the fine-tuned copy of the classifier travels with the state


def test_trained_restore_refuses_a_missing_or_changed_checkpoint(demo_model, demo_data, monkeypatch):
    host = get_host(load_entry_points=False)
    defense = make_defense(host, "pgd-at", PGD_AT, make_context(demo_model, demo_data, host))
    state = defense.export_state(defense.apply(demo_model, demo_data))
    forbid_fitting(monkeypatch)
    path = Path(state["checkpoint"])
    with pytest.raises(ValueError, match="changed"):
        defense.restore(demo_model, demo_data, dict(state, sha256="0" * 64))
    moved = path.with_name(path.name + ".away")
    path.rename(moved)
    try:
        with pytest.raises(ValueError, match="missing"):
            defense.restore(demo_model, demo_data, state)
    finally:
        moved.rename(path)


@pytest.mark.parametrize("name", ["ensemble", "median", "jpeg", "bit-depth", "gaussian", "lgs"])
def test_defenses_that_fit_nothing_export_no_state(name, host):
    cls = host.get("defense", name)
    assert cls.export_state is detectors.Defense.export_state

