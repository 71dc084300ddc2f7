"""Input-transform defenses, their adaptive (BPDA) views, and how an audit reports them."""

from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner

from medaudit.audits.plan import plan_jobs
from medaudit.core.spec import load_spec
from medaudit.cli import cli
from medaudit.core.adaptive import AdaptiveView, TransformDefended, bpda
from medaudit.core.host import get_host
from medaudit.plugins.defenses.input_transforms import (
    BitDepth, BitDepthParams, Gaussian, GaussianParams, Jpeg, JpegParams, LgsParams, LocalGradientsSmoothing, Median,
    MedianParams,
)
from tests.e2e.test_run import results_of


def test_bpda_is_exact_forward_and_surrogate_backward():
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    quantise = lambda t: torch.round(t * 3) / 3  # noqa: E731
    out = bpda(x, quantise)
    assert torch.equal(out, quantise(x.detach()))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity backward
    x.grad = None
    bpda(x, quantise, lambda t: 2 * t).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_transforms_do_what_they_say():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32) * 0.5 + 0.25
    four_bits = BitDepth(BitDepthParams(bits=2)).transform(x)
    assert len(four_bits.unique()) <= 4 and (four_bits - x).abs().max() <= 1 / 6 + 1e-6
    jpeg = Jpeg(JpegParams(quality=90)).transform(x)
    assert jpeg.shape == x.shape and 0 < (jpeg - x).abs().mean() < 0.1
    flat = torch.full((1, 1, 16, 16), 0.5)
    salted = flat.clone()
    salted[0, 0, 8, 8] = 1.0
    assert torch.equal(Median(MedianParams(kernel=3)).transform(salted), flat)  # an isolated pixel is removed
    blurred = Gaussian(GaussianParams(sigma=1.0)).transform(salted)
    assert torch.allclose(blurred.sum(), salted.sum(), atol=1e-4) and blurred.max() < 0.6
    assert torch.allclose(Gaussian(GaussianParams(sigma=1.0)).transform(flat), flat)
    volume = torch.rand(1, 1, 6, 8, 8)
    assert Gaussian(GaussianParams(sigma=0.8)).transform(volume).shape == volume.shape
    lgs = LocalGradientsSmoothing(LgsParams())
    patch = flat.repeat(1, 1, 4, 4).clone()  # 64 x 64, a high-contrast checkerboard patch in one corner
    patch[..., :12, :12] = (torch.arange(12)[:, None] + torch.arange(12)).remainder(2).float()
    cleaned = lgs.transform(patch)
    assert cleaned[..., :12, :12].mean() < 0.5 * patch[..., :12, :12].mean()  # the patch is suppressed
    assert torch.equal(cleaned[..., 32:, 32:], patch[..., 32:, 32:])  # smooth regions untouched


@pytest.mark.parametrize("defense", [Jpeg(JpegParams()), BitDepth(BitDepthParams())])
def test_naive_gradients_are_useless_and_bpda_restores_them(defense, demo_model, demo_data):
    x, y = demo_data.images[:8], demo_data.labels[:8]
    defended = defense.apply(demo_model, demo_data)
    assert isinstance(defended.module, TransformDefended) and isinstance(defended.adaptive_module, AdaptiveView)
    grads = {}
    for view, module in (("naive", defended.module), ("adaptive", defended.adaptive_module)):
        xg = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(module(xg), y).backward()
        grads[view] = xg.grad
    assert grads["naive"].abs().max() == 0 and grads["adaptive"].abs().amax((1, 2, 3)).min() > 0
    with torch.no_grad():
        assert torch.equal(defended.module(x), defended.adaptive_module(x))  # same system, other gradient
    assert all(not p.requires_grad for p in defended.module.parameters())


def test_adaptive_twins_only_where_gradients_are_useless(write_spec):
    host = get_host(load_entry_points=False)
    spec = load_spec(write_spec(
        attacks="attacks:\n  - name: pgd\n  - name: square\ndefenses:\n  - name: jpeg\n  - name: gaussian",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [1/255]",
    ), host)
    labels = {(j.defense, j.attack) for j in plan_jobs(spec, host)}
    assert ("jpeg", "pgd@adaptive") in labels and ("jpeg", "square@adaptive") not in labels  # square needs no gradient
    assert not any(a.endswith("@adaptive") for d, a in labels if d in ("gaussian", "none"))
    assert len(labels) == 3 * 3 + 1  # clean + pgd + square for each of 3 models, and jpeg's adaptive pgd


@pytest.mark.slow
def test_bpda_against_jpeg_beats_the_naive_attack(write_spec, tmp_path):
    spec = write_spec(
        attacks="attacks:\n  - name: pgd\n    params: {steps: 5}\ndefenses:\n  - name: jpeg",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 4/255]",
        acceptance="acceptance:\n  criteria:\n    - {id: A, metric: robust_accuracy, defense: jpeg, epsilon: 4/255, "
                   "op: '>=', threshold: 0.5}",
    )
    result = CliRunner().invoke(cli, ["run", str(spec), "-q", "--output-dir", str(tmp_path)])
    results = results_of(tmp_path)
    robust = {(r["defense"], r["attack"]): r["metrics"]["robust_accuracy"]["value"] for r in results["rows"] if r["epsilon"] > 0}
    naive, adaptive = robust[("jpeg", "pgd")], robust[("jpeg", "pgd@adaptive")]
    assert naive - adaptive >= 0.5, (naive, adaptive)  # the naive attack sees a zero gradient
    assert robust[("jpeg", "worst_case")] <= adaptive
    # the criterion is judged on the worst case, which includes the adaptive attack: it fails
    assert result.exit_code == 1 and results["acceptance"]["criteria"][0]["verdict"] == "FAIL"
    checks = {c["id"]: c for c in results["validity"]}
    assert checks["naive_vs_adaptive"]["status"] == "WARN" and "jpeg" in checks["naive_vs_adaptive"]["evidence"]
    assert checks["gradients_usable"]["status"] == "WARN" and "jpeg:" in checks["gradients_usable"]["evidence"]
    [run_dir] = list((tmp_path / "tiny").iterdir())
    html = (run_dir / "report.html").read_text()
    section = html.split('<section id="defenses">')[1].split("</section>")[0]
    assert "naive" in section and "adaptive" in section and "Trade-off" in section and "BPDA" in section


NLCE_SPEC = """\
audit: {{name: nlce, title: NLCE}}
task: segmentation
model: {{loader: demo-unet, params: {model}}}
data: {{dataset: phantom, params: {{n: 6, size: 64, seed: 0}}}}
threat_model: {{norm: linf, epsilons: [0, 4/255]}}
attacks:
  - name: fgsm
defenses:
  - name: nlce
    params:
      train_data: {{dataset: phantom, params: {{n: {n_train}, size: 64, seed: {train_seed}}}}}
      nlce: {{steps: 4, lr: 0.01, batch_size: 4}}
acceptance:
  criteria:
    - {{id: AC-01, metric: clean_dice, defense: nlce, op: ">=", threshold: 0.5}}
runtime: {{device: cpu, batch_size: 6, seed: 0, output_dir: {out}}}
"""


@pytest.mark.slow
def test_nlce_is_trained_on_its_split_recorded_and_reused(host, tmp_path, seg_model):
    import json

    from tests.helpers import run_audit
    from medaudit.core.errors import SpecError
    from tests.conftest import DEMO_UNET_2D

    def run(train_seed, n_train=16):
        path = tmp_path / f"nlce-{train_seed}.yaml"
        path.write_text(NLCE_SPEC.format(model=json.dumps(DEMO_UNET_2D), train_seed=train_seed, n_train=n_train,
                                         out=tmp_path / "runs"))
        return run_audit(load_spec(path, host), host)

    first = run(1000)
    results = first.results
    [nlce] = results["defenses"]
    assert nlce["training"]["steps"] == 4 and nlce["training"]["parameters_added"] > 0
    assert nlce["sha256"] != results["model"]["sha256"] == results["fingerprints"]["model_sha256"]
    assert results["fingerprints"]["defense_nlce_sha256"] == nlce["sha256"]
    saved = first.run_dir / "defenses" / "nlce.pt"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == nlce["sha256"]
    assert {r["defense"] for r in results["rows"]} == {"none", "nlce"}
    assert results["clean"]["nlce"]["clean_dice"]["value"] > 0.5  # fine-tuning from the identity keeps the model
    again = run(1000).results["defenses"][0]
    assert again["sha256"] == nlce["sha256"] and again["training"] == nlce["training"]  # cached, not retrained
    with pytest.raises(SpecError, match="train_data shares 6 image"):  # the evaluation cases themselves
        run(0, n_train=6)


@pytest.mark.slow
def test_adversarial_training_defense_runs_end_to_end(write_spec, tmp_path):
    defense = ("defenses:\n  - name: pgd-at\n    params: {train_data: {dataset: phantom, params: {n: 64, size: 64, seed: 1000}}, "
               "epochs: 2, batch_size: 32, eps: 4/255, steps: 3}")
    spec = write_spec(
        attacks=f"attacks:\n  - name: pgd\n    params: {{steps: 5}}\n{defense}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 2/255]",
        acceptance="",
    )
    result = CliRunner().invoke(cli, ["run", str(spec), "-q", "--output-dir", str(tmp_path)])
    assert result.exit_code == 5, result.output  # no criteria: nothing assessed, but everything ran
    results = results_of(tmp_path)
    [trained] = results["defenses"]
    assert trained["training"]["epochs"] == 2 and trained["sha256"] != results["model"]["sha256"]
    assert not any(j["attack"].endswith("@adaptive") for j in results["jobs"])  # differentiable: no twin
    robust = {(r["defense"], r["attack"]): r["metrics"]["robust_accuracy"]["value"] for r in results["rows"] if r["epsilon"] > 0}
    assert robust[("pgd-at", "pgd")] > robust[("none", "pgd")]  # 0.21 vs 0.0 with these seeds
    [run_dir] = list((tmp_path / "tiny").iterdir())
    assert (run_dir / "defenses" / "pgd-at.pt").is_file()
    assert "pgd-at" in (run_dir / "report.html").read_text().split('<section id="defenses">')[1]
