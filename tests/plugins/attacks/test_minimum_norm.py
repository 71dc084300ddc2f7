"""Minimum-norm attacks: DeepFool against ART's and against its every-sample loop, C&W, and the runner's
reuse across epsilons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medaudit
from medaudit.core.spec import load_spec
from medaudit.core.components import Norm
from medaudit.core.host import get_host
from medaudit.core.models import CallCounter
from medaudit.plugins.attacks.minimum_norm import CarliniWagnerL2, CWParams, DeepFool, DeepFoolParams
from tests.helpers import run_audit
from tests.reference_deepfool import deepfool_every_sample


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


class DeepFoolEverySample(DeepFool):
    """DeepFool with the every-sample loop, for comparing whole outcomes (min_norm records)."""

    def minimal(self, model, x, y, *, norm, generator):
        return deepfool_every_sample(model, x, y, norm=norm, **self.params.model_dump())


class OneAtATime(torch.nn.Module):
    """Runs the model on one sample at a time. A batched model's rounding can differ in the
    last bits with the batch's size; one at a time, a sample's logits and gradients are the
    same whichever samples it came with, so the two loops must agree bit for bit."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([self.inner(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_deepfool_steps_only_the_samples_not_fooled_yet_with_the_same_result(demo_model, demo_data, norm):
    model, x, y = OneAtATime(demo_model.module), demo_data.images[:48], demo_data.labels[:48].clone()
    y[:3] = 1 - y[:3]  # misclassified from the start: returned as they are, never stepped
    every, fewer = CallCounter(model), CallCounter(model)
    x_every = deepfool_every_sample(every, x, y, norm=norm)
    x_fewer = DeepFool().minimal(fewer, x, y, norm=norm, generator=torch.Generator())
    assert torch.equal(x_fewer, x_every)  # bit for bit, every sample
    assert torch.equal(x_fewer[:3], x[:3]) and fooled(model, x_fewer, y).all()
    # Measured on this model: 0.59 of the every-sample loop's model calls (L2), 0.58 (L-inf).
    assert fewer.samples <= 0.7 * every.samples, (fewer.samples, every.samples)


@pytest.mark.parametrize("steps, overshoot, norm", [(1, 0.02, Norm.L2), (2, 0.5, Norm.LINF), (3, 0.0, Norm.L2)])
def test_deepfool_outcomes_and_min_norm_records_match_the_every_sample_loop(demo_model, demo_data, steps, overshoot,
                                                                             norm):
    model, x, y = OneAtATime(demo_model.module), demo_data.images[:32], demo_data.labels[:32]
    params = DeepFoolParams(steps=steps, overshoot=overshoot)
    theirs = DeepFoolEverySample(params).perturb(model, x, y, eps=1.0, norm=norm, generator=torch.Generator())
    ours = DeepFool(params).perturb(model, x, y, eps=1.0, norm=norm, generator=torch.Generator())
    assert torch.equal(ours.adversarial, theirs.adversarial)
    assert ours.extras["min_norm"] == theirs.extras["min_norm"]
    # Not a trivial agreement: cases are found (measured: 17, 32 and 19 of 32; the others
    # are left with the search cut short by the few steps).
    assert any(size is not None for size in ours.extras["min_norm"])


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_deepfool_on_a_batched_model_differs_from_the_every_sample_loop_in_rounding_only(demo_model, demo_data, norm):
    # Batched, the samples left run in smaller batches than the whole, whose rounding can differ
    # in the last bits (measured at 32 cases on 2 threads, L2: 10 of 32 adversarials, by < 3e-8).
    model, x, y = demo_model.module, demo_data.images[:32], demo_data.labels[:32]
    theirs = DeepFoolEverySample().perturb(model, x, y, eps=1.0, norm=norm, generator=torch.Generator())
    ours = DeepFool().perturb(model, x, y, eps=1.0, norm=norm, generator=torch.Generator())
    assert (ours.adversarial - theirs.adversarial).abs().max() <= 1e-6
    for a, b in zip(ours.extras["min_norm"], theirs.extras["min_norm"]):
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * max(b, 1e-3))


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
