"""Detector defenses (rejection, joint adaptive attack), Medical Aegis, ensembles and
detect-then-route."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from medaudit.audits.records import meta_path, read_records, record_path
from medaudit.cli import cli
from medaudit.core.adaptive import DetectorScore, JointView, RoutedModel, SoftRoutedView, bind_labels
from medaudit.plugins.defenses.detectors import Cushion, MedicalAegisParams
from medaudit.plugins.defenses.ensemble import EnsembleModule
from medaudit.plugins.defenses._detectors import ShieldDetector, ShieldParams
from tests.e2e.test_run import results_of


class _Brightness:
    """A toy detector: the mean pixel value is the score."""

    name = "brightness"

    def score(self, model, x):
        return x.flatten(1).mean(1)


def _toy_classifier() -> nn.Module:
    """Class 1 when the left half is brighter than the right half."""

    class Toy(nn.Module):
        def forward(self, x):
            d = x[..., :4].mean((1, 2, 3)) - x[..., 4:].mean((1, 2, 3))
            return torch.stack([-d, d], 1) * 10

    return Toy()


def test_joint_view_fools_only_when_the_classifier_is_fooled_undetected():
    torch.manual_seed(0)
    model = _toy_classifier()
    scorer = DetectorScore(model, _Brightness(), threshold=0.5, scale=0.1)
    view = JointView(model, scorer)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 2, (64,))
    assert torch.equal(view(x), model(x))  # nothing bound: the classifier's logits
    bind_labels(view, x, y)
    fooled_view = view(x).argmax(1) != y
    fooled_system = (model(x).argmax(1) != y) & ~scorer.flagged(x)
    assert torch.equal(fooled_view, fooled_system)
    assert fooled_system.any() and (~fooled_system).any() and scorer.flagged(x).any()
    # Any subset of rows, in any order, finds its own labels; inputs near none get plain logits.
    rows = torch.tensor([5, 2, 40])
    assert torch.equal(view(x[rows]), view(x)[rows])
    far = torch.rand(3, 1, 8, 8).round()
    assert torch.equal(view(far), model(far))
    # Once flagged, lowering the true class's logit means lowering the detector's score.
    flagged = scorer.flagged(x) & (model(x).argmax(1) == y)
    x_in = x[flagged][:1].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(view(x_in), y[flagged][:1])
    (grad,) = torch.autograd.grad(loss, x_in)
    assert grad.sum() < 0  # ascending the loss darkens the image: the score (mean pixel) falls
    bind_labels(view, None, None)
    assert torch.equal(view(x), model(x))


def test_routing_is_exact_and_its_adaptive_view_sees_both_models():
    torch.manual_seed(0)
    standard, robust = nn.Linear(16, 3), nn.Linear(16, 3)
    flat = lambda m: nn.Sequential(nn.Flatten(), m)  # noqa: E731
    scorer = DetectorScore(flat(standard), _Brightness(), threshold=0.5, scale=0.05)
    routed = RoutedModel(flat(standard), flat(robust), scorer)
    x = torch.rand(32, 1, 4, 4)
    flagged = scorer.flagged(x)
    assert flagged.any() and (~flagged).any()
    expected = torch.where(flagged[:, None], robust(x.flatten(1)), standard(x.flatten(1)))
    assert torch.allclose(routed(x), expected)
    view = SoftRoutedView(routed)
    x_in = x.clone().requires_grad_(True)
    out = view(x_in)
    assert torch.allclose(out, expected)
    nn.functional.cross_entropy(out, torch.zeros(32, dtype=torch.long)).backward()
    assert x_in.grad.abs().sum() > 0
    assert standard.weight.grad.abs().sum() > 0 and robust.weight.grad.abs().sum() > 0  # both routes


def test_cushions_are_low_pass_and_keep_flat_images():
    flat = torch.full((2, 1, 16, 16), 0.4)
    checker = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).float().expand(2, 1, 16, 16)
    for cushion in ("gaussian", "resample", "fft"):
        c = Cushion(MedicalAegisParams(train_data={"dataset": "phantom"}, cushion=cushion))
        assert torch.allclose(c(flat), flat, atol=1e-5), cushion
        out = c(checker)
        assert out.shape == checker.shape and (out - 0.5).abs().max() < 0.2, cushion  # the finest pattern is gone


def test_ensemble_averages_probabilities():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.rand(5, 4)
    out = EnsembleModule([a, b])(x)
    expected = ((a(x).softmax(1) + b(x).softmax(1)) / 2).log()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(EnsembleModule([a, a])(x), a(x).log_softmax(1), atol=1e-6)


def test_shield_scores_are_differentiable_and_separate_noise(demo_model, demo_data):
    x, y = demo_data.images[:64], demo_data.labels[:64]
    shield = ShieldDetector(ShieldParams(widths=(8, 16, 16), epochs=10)).fit(
        demo_model.module, x, y, torch.Generator().manual_seed(0)
    )
    assert len(shield.nets) == 2
    clean = shield.score(demo_model.module, demo_data.images[64:])
    noisy = shield.score(demo_model.module, (demo_data.images[64:] + 0.3 * torch.randn_like(demo_data.images[64:])).clamp(0, 1))
    assert clean.shape == (32,) and noisy.median() > clean.median()
    x_in = demo_data.images[64:68].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(shield.score(demo_model.module, x_in).sum(), x_in)
    assert grad.abs().sum() > 0


def test_rejections_count_against_clean_and_for_the_defense(tmp_path):
    def write(job, facets, rows):
        path = record_path(tmp_path, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta_path(tmp_path, job).write_text(json.dumps({"job": job, "facets": facets}))

    write("detector", ["classification", "rejection"], [
        {"label": 1, "clean_pred": 1, "adv_pred": 0, "clean_rejected": False, "adv_rejected": True},  # caught
        {"label": 1, "clean_pred": 1, "adv_pred": 0, "clean_rejected": False, "adv_rejected": False},  # fooled
        {"label": 1, "clean_pred": 1, "adv_pred": 1, "clean_rejected": True, "adv_rejected": True},  # false alarm
    ])
    write("plain", ["classification"], [{"label": 1, "clean_pred": 1, "adv_pred": 1, "clean_rejected": True}])
    read = read_records(tmp_path, "detector")
    assert [r["clean_correct"] for r in read] == [True, True, False]
    assert [r["adv_correct"] for r in read] == [True, False, False]
    # Without the rejection facet a stray field rejects nothing.
    assert [(r["clean_correct"], r["adv_correct"]) for r in read_records(tmp_path, "plain")] == [(True, True)]


DETECTOR_SPEC = """\
defenses:
  - name: mahalanobis
    params: {train_data: {dataset: phantom, params: {n: 128, size: 64, seed: 1000}}}
  - name: detect-then-route
    params:
      detector: {name: mahalanobis, params: {train_data: {dataset: phantom, params: {n: 128, size: 64, seed: 1000}}}}
      robust: {name: pgd-at, params: {train_data: {dataset: phantom, params: {n: 64, size: 64, seed: 1000}}, epochs: 2, eps: 4/255, steps: 3}}
"""


@pytest.mark.slow
def test_detector_catches_naive_attacks_and_the_joint_attack_evades_it(write_spec, tmp_path):
    spec = write_spec(
        attacks="attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 10}\n" + DETECTOR_SPEC,
        data="data:\n  dataset: phantom\n  params: {n: 64, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 4/255]",
        acceptance="",
        runtime="runtime:\n  device: cpu\n  batch_size: 64\n  seed: 0",
    )
    result = CliRunner().invoke(cli, ["run", str(spec), "-q", "--output-dir", str(tmp_path)])
    assert result.exit_code == 5, result.output
    results = results_of(tmp_path)
    rows = {(r["defense"], r["attack"]): r for r in results["rows"] if r["epsilon"] > 0}
    robust = {k: r["metrics"]["robust_accuracy"]["value"] for k, r in rows.items()}
    detection = {k: r.get("detection") for k, r in rows.items()}
    # FGSM examples of the demo model are easy to tell apart from clean slices.
    assert detection[("mahalanobis", "fgsm")]["auroc"] > 0.8 and detection[("mahalanobis", "fgsm")]["n_adversarial"] > 20
    # The joint attack lowers the detector's AUROC and the system's robust accuracy.
    assert detection[("mahalanobis", "pgd@adaptive")]["auroc"] < detection[("mahalanobis", "pgd")]["auroc"]
    assert robust[("mahalanobis", "pgd@adaptive")] < robust[("mahalanobis", "pgd")]
    assert robust[("mahalanobis", "worst_case")] <= robust[("mahalanobis", "pgd@adaptive")]
    # The detector costs at most a few clean cases (5 % FPR on held-out training images).
    assert results["clean"]["mahalanobis"]["clean_accuracy"]["value"] >= results["clean"]["none"]["clean_accuracy"]["value"] - 0.15
    [mahalanobis, routed] = results["defenses"]
    assert mahalanobis["training"]["calibration_cases"] == 32 and mahalanobis["adaptive"]
    assert routed["training"]["robust"]["epochs"] == 2 and ("detect-then-route", "pgd@adaptive") in robust
    assert "detection" not in rows[("detect-then-route", "pgd")]  # routing rejects nothing
    html = next(tmp_path.rglob("report.html")).read_text()
    assert "detector AUROC naive / adaptive" in html.split('<section id="defenses">')[1]
