"""Report figures of classification audits: example triptychs (original / adversarial /
amplified perturbation), Grad-CAM clean vs adversarial, and the 2D embedding of penultimate
features; and a model without the layers the last two need."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import medaudit
from medaudit.audits.records import FEATURE_CASES, load_examples, load_features, read_records
from medaudit.audits.runner import Runner
from medaudit.core.spec import load_spec
from medaudit.core.components import Access, LoadedModel, ModelLoader, Params
from medaudit.core.host import get_host
from medaudit.core.models import prepare_for_audit
from medaudit.core.probes import grad_cam
from medaudit.audits.figures import amplified, embed_2d, paired_features, strongest_job
from tests.conftest import spec_text
from tests.helpers import run_audit

EPS = 4 / 255
ATTACKS = "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 3}"
NEW_FIGURES = {"examples", "grad-cam", "feature-embedding", "convergence"}


class SnapshotRunner(Runner):
    """Keeps the undefended model's state as it was before the results were built."""

    def build_results(self):
        module = self.models["none"].module
        self.before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return super().build_results()


def run(tmp_dir, host=None, **sections):
    runtime = f"runtime:\n  device: cpu\n  batch_size: 32\n  seed: 0\n  output_dir: {tmp_dir}"
    path = tmp_dir / "spec.yaml"
    path.write_text(spec_text(**{"attacks": ATTACKS, **sections}, runtime=runtime), encoding="utf-8")
    host = host or get_host(load_entry_points=False)
    runner = SnapshotRunner(load_spec(path, host), host, show_progress=False)
    return runner, run_audit(runner.spec, host, runner=runner)


@pytest.fixture(scope="module")
def audit(model_cache, tmp_path_factory):
    """48 phantom cases in batches of 32 (features span two batches), fgsm and pgd."""
    torch.set_num_threads(2)
    return run(tmp_path_factory.mktemp("figures"))


def _job(runner, attack: str, eps: float = EPS):
    return next(j for j in runner.jobs if j.defense == "none" and j.attack == attack and abs(j.epsilon - eps) < 1e-12)


def test_new_figures_are_listed_with_images_that_show_something(audit):
    from matplotlib.image import imread

    runner, outcome = audit
    listed = json.loads((outcome.run_dir / "results.json").read_text(encoding="utf-8"))["figures"]
    figures = {f["id"]: f for f in listed}
    assert NEW_FIGURES | {"robust-accuracy"} == set(figures)
    for name in NEW_FIGURES:
        figure = figures[name]
        assert figure["title"] and "Data:" in figure["caption"]
        pixels = imread(outcome.run_dir / figure["path"])[..., :3]
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.05, name
    html = (outcome.run_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 4


def test_examples_hold_the_real_perturbation(audit):
    runner, outcome = audit
    clean = load_examples(outcome.run_dir, next(j for j in runner.jobs if j.is_clean).id)
    assert torch.equal(clean["image"], clean["adversarial"])
    assert torch.equal(clean["prediction"], clean["clean_prediction"])
    for attack in ("fgsm", "pgd"):
        job = _job(runner, attack)
        ex = load_examples(outcome.run_dir, job.id)
        records = read_records(outcome.run_dir, job.id)[: len(ex["truth"])]
        assert ex["image"].shape == (4, 1, 64, 64) and torch.equal(ex["image"], clean["image"])
        assert ex["prediction"].tolist() == [r["adv_pred"] for r in records]
        assert ex["clean_prediction"].tolist() == [r["clean_pred"] for r in records]
        delta = ex["adversarial"] - ex["image"]
        assert float(delta.abs().max()) <= EPS + 1e-6
        attacked = torch.tensor([r["attacked"] for r in records])
        assert attacked.any() and (delta[attacked].flatten(1).abs().amax(1) > 0).all()
        assert (delta[~attacked] == 0).all()
        # The triptych's third panel is this delta, scaled so its largest change fills the range.
        shown, factor = amplified(delta[0])
        assert factor == pytest.approx(0.5 / float(delta[0].abs().max()))
        assert torch.allclose((shown - 0.5) / factor, delta[0], atol=1e-6)
        assert float((shown - 0.5).abs().max()) == pytest.approx(0.5)
    assert amplified(torch.zeros(1, 4, 4)) == (pytest.approx(torch.full((1, 4, 4), 0.5)), None)


def test_grad_cam_differs_between_clean_and_adversarial(audit):
    runner, outcome = audit
    job = strongest_job(outcome.run_dir, runner.jobs, EPS)
    assert job.epsilon == EPS
    ex = load_examples(outcome.run_dir, job.id)
    n = len(ex["truth"])
    cams = grad_cam(runner.models["none"].module, torch.cat([ex["image"], ex["adversarial"]]),
                    torch.cat([ex["clean_prediction"], ex["prediction"]]))
    assert cams.shape == (2 * n, 64, 64)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1 and float(cams.max()) == pytest.approx(1)
    attacked = ex["clean_prediction"] == ex["truth"]
    assert float((cams[:n] - cams[n:])[attacked].abs().max()) > 0.1


def test_embedding_has_a_clean_and_an_adversarial_point_per_attacked_case(audit):
    runner, outcome = audit
    job = strongest_job(outcome.run_dir, runner.jobs, EPS)
    attacked = [i for i, r in enumerate(read_records(outcome.run_dir, job.id)) if r["attacked"] and i < FEATURE_CASES]
    stored = load_features(outcome.run_dir, job.id)
    assert stored["features"].dtype == torch.float16 and stored["position"].tolist() == attacked
    clean = load_features(outcome.run_dir, next(j for j in runner.jobs if j.is_clean).id)
    assert clean["position"].tolist() == list(range(48))  # both batches of the clean job
    pairs = paired_features(outcome.run_dir, runner.jobs, job)
    assert len(pairs["clean"]) == len(pairs["adversarial"]) == len(attacked) >= 15
    assert not torch.equal(pairs["clean"], pairs["adversarial"])
    coords, method = embed_2d(torch.cat([pairs["clean"], pairs["adversarial"]]))
    assert coords.shape == (2 * len(attacked), 2) and method.startswith("t-SNE") and torch.isfinite(coords).all()
    few, method = embed_2d(torch.randn(10, 6))
    assert few.shape == (10, 2) and method == "PCA"


def test_building_figures_leaves_the_model_frozen_and_unchanged(audit):
    runner, _ = audit
    module = runner.models["none"].module
    assert not module.training and not any(m.training for m in module.modules())
    assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    after = module.state_dict()
    assert after.keys() == runner.before.keys()
    assert all(torch.equal(after[k], v) for k, v in runner.before.items())


class NoLayers(nn.Module):
    """Logits from the mean brightness: no nn.Conv2d, no nn.Linear."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([-60.0, 60.0]))
        self.shift = nn.Parameter(torch.tensor([0.0, 0.0]))

    def forward(self, x):
        brightness = x.mean((1, 2, 3)) - 0.25
        return brightness[:, None] * self.scale + self.shift


class NoLayersLoader(ModelLoader):
    name = "no-layers"
    Params = Params

    def load(self, task):
        return LoadedModel(prepare_for_audit(NoLayers()), task, num_classes=2, in_channels=1,
                           access=frozenset(Access), fingerprint="0" * 64, description="no layers")


class NoLayersPlugin:
    @medaudit.hookimpl
    def register_models(self, register):
        register(NoLayersLoader)


def test_a_model_without_conv_or_linear_layers_just_lacks_those_figures(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="medaudit.audits.figures")
    host = get_host(load_entry_points=False, extra_plugins=[("no-layers", NoLayersPlugin())])
    runner, outcome = run(tmp_path, host, model="model:\n  loader: no-layers")
    assert {f["id"] for f in outcome.results["figures"]} == {"robust-accuracy", "examples", "convergence"}
    assert "the model has no nn.Conv2d layer" in caplog.text and "the model has no nn.Linear layer" in caplog.text
    assert not list((outcome.run_dir / "examples").glob("*.features.pt"))
    assert (outcome.run_dir / "figures" / "examples.png").is_file()


@pytest.mark.slow
def test_a_minimum_norm_attack_shows_the_smallest_flip_of_a_few_cases(model_cache, tmp_path):
    from matplotlib.image import imread

    runner, outcome = run(tmp_path, attacks="attacks:\n  - name: deepfool\n    params: {steps: 20}",
                          threat_model="threat_model:\n  norm: linf\n  epsilons: [8/255]",
                          data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}")
    figures = {f["id"]: f for f in outcome.results["figures"]}
    figure = figures["smallest-perturbations"]
    assert "minimum-norm" in figure["caption"] and "Data:" in figure["caption"]
    pixels = imread(outcome.run_dir / figure["path"])[..., :3]
    assert pixels.shape[1] > 300 and pixels.std() > 0.05  # without a minimum-norm attack: no such figure (above)


def test_figures_left_out_by_the_spec_are_drawn_later_by_medaudit_report(audit, tmp_path):
    from click.testing import CliRunner

    from medaudit.cli import cli

    runner, outcome = audit
    later = run(tmp_path, report="report:\n  figures: []")[1]
    drawn = {f["id"]: f for f in json.loads((outcome.run_dir / "results.json").read_text(encoding="utf-8"))["figures"]}
    results = json.loads((later.run_dir / "results.json").read_text(encoding="utf-8"))
    assert {f["id"] for f in results["figures"]} == set(drawn) - {"grad-cam", "feature-embedding"}
    assert results["fingerprints"]["spec_sha256"] == json.loads(
        (outcome.run_dir / "results.json").read_text(encoding="utf-8"))["fingerprints"]["spec_sha256"]

    refused = CliRunner().invoke(cli, ["report", str(later.run_dir), "--figures", "tsne"])
    assert refused.exit_code != 0 and "grad_cam, embedding" in refused.output
    done = CliRunner().invoke(cli, ["report", str(later.run_dir), "--figures", "grad_cam,embedding"])
    assert done.exit_code == 0, done.output
    results = json.loads((later.run_dir / "results.json").read_text(encoding="utf-8"))
    figures = {f["id"]: f for f in results["figures"]}
    assert {"grad-cam", "feature-embedding"} <= set(figures)
    for name in ("grad-cam", "feature-embedding"):  # as the run would have drawn them
        assert figures[name]["caption"] == drawn[name]["caption"]
        assert (later.run_dir / figures[name]["path"]).read_bytes() == (outcome.run_dir / drawn[name]["path"]).read_bytes()
    html = (later.run_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(figures)

    results["fingerprints"]["model_sha256"] = "0" * 64  # another model now: its figures would explain the wrong one
    (later.run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")
    stale = CliRunner().invoke(cli, ["report", str(later.run_dir), "--figures", "grad_cam"])
    assert stale.exit_code != 0 and "not the one audited" in stale.output
