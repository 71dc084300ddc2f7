"""Faults that could make a verdict wrong (issue 13, items 1, 2, 3 and 13): a model whose
outputs are NaN or Inf, a model that returns probabilities, a non-deterministic model, a
model that changes its own weights, and a model that raises in the middle of a run.

The models are tiny modules defined here and loaded with the ``factory`` loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import medaudit
from medaudit.audits.records import read_records
from medaudit.audits.results import gradient_check
from medaudit.core.spec import load_spec
from medaudit.cli import cli
from medaudit.core.components import Attack, Norm, Params
from medaudit.core.errors import ExitCode
from medaudit.core.host import get_host
from tests.helpers import run_audit

#: Phantom cases (n=16, size=32, seed=0) with a mean below this: only case 11, past the probe's first 8.
DARK = 0.11


class TinyNet(nn.Module):
    """An untrained classifier on two image statistics (mean and max)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.fc = nn.Linear(2, classes)

    def forward(self, x):
        flat = x.flatten(1)
        return self.fc(torch.stack([flat.mean(1), flat.amax(1)], 1))


class NanNet(TinyNet):
    def forward(self, x):
        return super().forward(x) * float("nan")


class InfNet(TinyNet):
    def forward(self, x):
        out = super().forward(x)
        return torch.cat([torch.full_like(out[:, :1], float("inf")), out[:, 1:]], 1)


class DarkNanNet(TinyNet):
    """NaN logits for dark images only."""

    def forward(self, x):
        out = super().forward(x)
        return torch.where((x.flatten(1).mean(1) < DARK)[:, None], torch.full_like(out, float("nan")), out)


class DarkInfNet(TinyNet):
    """A +inf logit for dark images only."""

    def forward(self, x):
        out = super().forward(x)
        return torch.where((x.flatten(1).mean(1) < DARK)[:, None], torch.full_like(out, float("inf")), out)


class SoftmaxNet(TinyNet):
    def forward(self, x):
        return super().forward(x).softmax(1)


class NoisyNet(TinyNet):
    """A randomised model: new noise on every forward pass."""

    def forward(self, x):
        out = super().forward(x)
        return out + torch.randn_like(out)


class DriftNet(TinyNet):
    """Changes its own weights on every forward pass."""

    def forward(self, x):
        with torch.no_grad():
            self.fc.bias.add_(0.1)
        return super().forward(x)


class GradDriftNet(TinyNet):
    """Changes its own weights only when an attack differentiates it (deterministic at load)."""

    def forward(self, x):
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.fc.bias.add_(0.1)
        return super().forward(x)


class BatchLimitNet(TinyNet):
    """Runs on up to 8 cases (the load-time probe), fails on a larger batch."""

    def forward(self, x):
        if len(x) > 8:
            raise RuntimeError(f"batch of {len(x)} is larger than the exported batch size 8")
        return super().forward(x)


class SegNet(nn.Module):
    """A 1x1 convolution to 5 classes (untrained)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, classes, 1)

    def forward(self, x):
        return self.conv(x)


class DarkNanSegNet(SegNet):
    def forward(self, x):
        out = super().forward(x)
        return torch.where((x.flatten(1).mean(1) < DARK)[:, None, None, None], torch.full_like(out, float("nan")), out)


def spec(tmp_path: Path, net: str, *, task: str = "classification", model_extra: str = "", batch_size: int = 16) -> Path:
    classes = 5 if task == "segmentation" else 2
    if task == "segmentation":
        criteria = "    - {id: AC-01, metric: clean_dice, op: '>=', threshold: 0.01}\n" \
                   "    - {id: AC-02, metric: robust_dice, attack: worst_case, epsilon: 2/255, op: '>=', threshold: 0.01}"
        metrics = "metrics: [clean_dice, robust_dice]\n"
    else:
        criteria = "    - {id: AC-01, metric: clean_accuracy, op: '>=', threshold: 0.1}\n" \
                   "    - {id: AC-02, metric: robust_accuracy, attack: worst_case, epsilon: 2/255, op: '>=', threshold: 0.1}"

        metrics = ""
    text = (
        f"audit: {{name: faults, title: faults}}\ntask: {task}\n"
        f"model:\n  loader: factory\n{model_extra}  params: {{factory: 'tests.faults.test_faults_verdict:{net}', classes: {classes}}}\n"
        "data:\n  dataset: phantom\n  params: {n: 16, size: 32, seed: 0}\n"
        "threat_model: {norm: linf, epsilons: [0, 2/255]}\n"
        "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 2}\n"
        f"{metrics}acceptance:\n  criteria:\n{criteria}\n"
        f"report: {{formats: [json]}}\nruntime: {{device: cpu, batch_size: {batch_size}, seed: 0}}\n"
    )
    path = tmp_path / f"{net}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path: Path, path: Path):
    out = tmp_path / "run"
    return CliRunner().invoke(cli, ["run", str(path), "--run-dir", str(out), "-q"]), out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def check(res: dict, check_id: str) -> dict:
    return next(c for c in res["validity"] if c["id"] == check_id)


# -- item 1: NaN and Inf outputs --------------------------------------------------------


@pytest.mark.parametrize("net", ["NanNet", "InfNet"])
def test_a_model_with_non_finite_outputs_everywhere_is_refused_before_the_run_dir(net, tmp_path):
    result, out = run(tmp_path, spec(tmp_path, net))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "non-finite" in result.output and "factory" in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("net", ["DarkNanNet", "DarkInfNet"])
def test_non_finite_outputs_on_some_cases_are_errors_and_make_the_run_invalid(net, tmp_path):
    result, out = run(tmp_path, spec(tmp_path, net))
    assert result.exit_code == ExitCode.INVALID, result.output
    res = results(out)
    assert res["verdict"] == "INVALID"
    finite = check(res, "outputs_finite")
    assert finite["status"] == "FAIL" and finite["gating"], finite
    assert "none: clean: 1 of 16 cases" in finite["evidence"], finite
    clean_job = next(j["id"] for j in res["jobs"] if j["attack"] == "clean")
    [dark] = [r for r in read_records(out, clean_job) if not r["clean_finite"]]
    assert not dark["clean_correct"] and not dark["adv_correct"]
    for criterion in res["acceptance"]["criteria"]:
        assert criterion["verdict"] == "INCONCLUSIVE" and "NaN or Inf" in criterion["reason"], criterion


def test_non_finite_segmentation_outputs_make_the_run_invalid(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "DarkNanSegNet", task="segmentation"))
    assert result.exit_code == ExitCode.INVALID, result.output
    res = results(out)
    assert check(res, "outputs_finite")["status"] == "FAIL"
    clean_job = next(j["id"] for j in res["jobs"] if j["attack"] == "clean")
    assert [r["clean_finite"] for r in read_records(out, clean_job)].count(False) == 1
    assert all(c["verdict"] == "INCONCLUSIVE" for c in res["acceptance"]["criteria"])


def test_non_finite_input_gradients_are_a_gating_failure_and_zero_gradients_a_warning():
    nonfinite = gradient_check({"none": {"n": 8, "zero": 0, "nonfinite": 3}})
    assert nonfinite["status"] == "FAIL" and nonfinite["gating"], nonfinite
    zero = gradient_check({"none": {"n": 8, "zero": 2, "nonfinite": 0}})
    assert zero["status"] == "WARN", zero


# -- item 2: probabilities instead of logits ---------------------------------------------


def test_a_model_that_returns_probabilities_is_refused_with_the_fix(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "SoftmaxNet"))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "probabilities" in result.output and "remove the final softmax" in result.output, result.output
    assert not out.exists()


def test_the_probe_findings_are_in_results_json(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "TinyNet"))
    res = results(out)
    # The untrained TinyNet does worse than always answering the majority class: the chance check's gate.
    failed = [c["id"] for c in res["validity"] if c["status"] == "FAIL" and c["gating"]]
    assert result.exit_code == ExitCode.INVALID and failed == ["clean_above_chance"], (result.output, failed)
    assert res["model"]["probe"] == {
        "cases": 8, "outputs": "logits", "finite": True, "deterministic": True, "weights_unchanged": True,
    }
    for check_id in ("outputs_finite", "randomness_handled", "weights_unchanged"):
        assert check(res, check_id)["status"] == "PASS", check(res, check_id)
    assert CliRunner().invoke(cli, ["report", str(out)]).exit_code == 0
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "ran twice on the first 8 cases: finite logits, identical in both passes; weights unchanged" in report


# -- item 3: randomness and weights that change ------------------------------------------


@pytest.mark.parametrize("net, says", [("NoisyNet", "non-deterministic"), ("DriftNet", "changed its own weights")])
def test_a_model_that_is_not_stable_stops_the_run_before_the_run_dir(net, says, tmp_path):
    result, out = run(tmp_path, spec(tmp_path, net))
    assert result.exit_code == ExitCode.INVALID, result.output
    assert says in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_a_model_that_changes_its_weights_during_the_audit_makes_it_invalid(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "GradDriftNet"))
    assert result.exit_code == ExitCode.INVALID, result.output
    res = results(out)
    changed = check(res, "weights_unchanged")
    assert changed["status"] == "FAIL" and changed["gating"], changed
    assert res["model"]["probe"]["weights_unchanged"] is False


def test_a_declared_randomised_model_runs_and_is_invalid_without_eot(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "NoisyNet", model_extra="  randomized: true\n"))
    assert result.exit_code == ExitCode.INVALID, result.output
    res = results(out)
    random = check(res, "randomness_handled")
    assert random["status"] == "FAIL" and random["gating"] and "EOT" in random["evidence"], random
    assert "none at eps 2/255" in random["evidence"], random
    assert res["model"]["probe"]["deterministic"] is False


# -- item 13: the model raises mid-run ---------------------------------------------------


def test_a_model_that_raises_on_a_batch_is_named_as_the_source(tmp_path):
    result, out = run(tmp_path, spec(tmp_path, "BatchLimitNet"))
    assert result.exit_code == ExitCode.INTERNAL_ERROR, result.output
    assert "bug in medaudit" not in result.output and "Traceback" not in result.output, result.output
    line = BatchLimitNet.forward.__code__.co_firstlineno + 2
    assert f"test_faults_verdict.py:{line} in forward" in result.output, result.output
    assert "larger than the exported batch size 8" in result.output and "none: clean" in result.output
    events = [json.loads(e) for e in (out / "timeline.jsonl").read_text().splitlines()]
    [error] = [e for e in events if e["event"] == "model_error"]
    assert error["job"].startswith("none.clean") and len(error["cases"]) == 16
    assert error["cases"][0] in result.output
    assert not list((out / "records").glob("*.jsonl*"))  # nothing half-written: the run resumes from here


class BrokenAttack(Attack):
    """Calls the model, then fails in its own code."""

    name = "broken-after-model"
    norms = frozenset({Norm.LINF})
    Params = Params

    def perturb(self, model, x, y, *, eps, norm, generator):
        model(x)
        raise RuntimeError("a bug in this attack")


class BrokenAttackPlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(BrokenAttack)


def test_an_attack_that_raises_is_not_blamed_on_the_model(tmp_path):
    host = get_host(load_entry_points=False, extra_plugins=[("broken", BrokenAttackPlugin())])
    text = spec(tmp_path, "TinyNet").read_text().replace("name: fgsm", "name: broken-after-model")
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    spec_ = load_spec(path, host)
    with pytest.raises(RuntimeError, match="a bug in this attack"):
        run_audit(spec_, host, run_dir=tmp_path / "run")
