"""Minimum-norm attacks: DeepFool against ART's, C&W, and the runner's reuse across epsilons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medaudit
from medaudit.core.spec import load_spec
from medaudit.core.components import Norm
from medaudit.core.host import get_host
from medaudit.plugins.attacks.minimum_norm import CarliniWagnerL2, CWParams, DeepFool, DeepFoolParams
from tests.helpers import run_audit


def sizes(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)


def fooled(model, x_adv, y):
    with torch.inference_mode():
        return model(x_adv).argmax(1) != y


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_deepfool_fools_nearly_all_with_small_perturbations(demo_model, demo_data, norm):
    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    x_min = DeepFool().minimal(model, x, y, norm=norm, generator=torch.Generator())
    ok = fooled(model, x_min, y)
    assert ok.float().mean() >= 0.9 and x_min.min() >= 0 and x_min.max() <= 1
    assert sizes(x_min, x, norm)[ok].median() < (0.5 if norm is Norm.L2 else 4 / 255)
    # bounded use: projected onto the budget
    x_eps = DeepFool().perturb(model, x, y, eps=0.5 / 255, norm=norm, generator=torch.Generator()).adversarial
    assert (sizes(x_eps, x, norm) <= 0.5 / 255 + 1e-6).all()


def test_deepfool_matches_art(demo_model, demo_data):
    from art.attacks.evasion import DeepFool as ARTDeepFool
    from art.estimators.classification import PyTorchClassifier

    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 64, 64), nb_classes=2, clip_values=(0.0, 1.0))
    theirs = torch.as_tensor(ARTDeepFool(clf, max_iter=50, epsilon=0.02, verbose=False).generate(x.numpy()))
    ours = DeepFool(DeepFoolParams(overshoot=0.02)).minimal(model, x, y, norm=Norm.L2, generator=torch.Generator())
    both = fooled(model, ours, y) & fooled(model, theirs, y)
    assert both.float().mean() >= 0.9
    ratio = sizes(ours, x, Norm.L2)[both].median() / sizes(theirs, x, Norm.L2)[both].median()
    assert 0.85 < float(ratio) < 1.15


def test_cw_finds_smaller_perturbations_than_its_start(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images[:16], demo_data.labels[:16]
    x_min = CarliniWagnerL2(CWParams(steps=40, search_steps=3, learning_rate=0.01)).minimal(
        model, x, y, norm=Norm.L2, generator=torch.Generator()
    )
    ok = fooled(model, x_min, y)
    assert ok.float().mean() >= 0.8 and x_min.min() >= 0 and x_min.max() <= 1
    unfooled = ~ok
    assert torch.equal(x_min[unfooled], x[unfooled])  # nothing found: the clean input is returned
    df = DeepFool().minimal(model, x, y, norm=Norm.L2, generator=torch.Generator())
    assert sizes(x_min, x, Norm.L2)[ok].median() <= 1.5 * sizes(df, x, Norm.L2)[ok].median()


class CountingDeepFool(DeepFool):
    """DeepFool that counts how often its minimal search runs."""

    name = "counting-deepfool"
    calls = 0

    def minimal(self, model, x, y, *, norm, generator):
        type(self).calls += 1
        return super().minimal(model, x, y, norm=norm, generator=generator)


class CountingPlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(CountingDeepFool)


def test_runner_reuses_the_minimal_search_for_every_epsilon(write_spec, tmp_path):
    host = get_host(load_entry_points=False, extra_plugins=[("count", CountingPlugin())])
    spec = load_spec(
        write_spec(
            attacks="attacks:\n  - name: counting-deepfool",
            threat_model="threat_model:\n  norm: l2\n  epsilons: [0, 0.05, 0.1, 0.3]",
            runtime=f"runtime:\n  batch_size: 16\n  output_dir: {tmp_path}",
        ),
        host,
    )
    spec.metrics.append("min_norm_median")
    CountingDeepFool.calls = 0
    outcome = run_audit(spec, host)
    assert CountingDeepFool.calls == 3  # 48 cases in batches of 16: once per batch, not per epsilon
    [curve] = outcome.results["curves"]
    assert curve["attack"] == "counting-deepfool" and curve["points"][0][1] > curve["points"][-1][1]
    rows = {r["epsilon"]: r["metrics"] for r in outcome.results["rows"] if r["attack"] == "counting-deepfool"}
    median = rows[0.3]["min_norm_median"]["value"]
    assert median == rows[0.05]["min_norm_median"]["value"] and 0 < median < 1
    for eps, metrics in rows.items():
        # projecting the minimal adversarial onto the budget can only fool the samples whose
        # minimal perturbation fits in it, or more: never fewer
        curve_acc = np.interp(eps, [p[0] for p in curve["points"]], [p[1] for p in curve["points"]])
        if eps <= curve["points"][-1][0]:
            assert metrics["robust_accuracy"]["value"] <= curve_acc + 1 / 48 + 1e-9
