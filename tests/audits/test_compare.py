"""Comparing two runs (medaudit.audits.compare) and the regression gate of the spec.

The runs are real audits of the demo model (without their figures, which take most of an
audit's time here): a baseline, the same spec with another seed (only the attack's random
start differs) and the demo model behind a wrapper that flips the answer on a share of
the inputs (a planted regression). A copy of the baseline that claims other data stands
for a run on other cases (compared unpaired).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from pydantic import Field

import medaudit
from medaudit.audits import acceptance as acceptance_module
from medaudit.audits import runner as runner_module
from medaudit.audits.compare import compare_runs, mcnemar, newcombe_unpaired, paired_bootstrap, sample
from medaudit.audits.history import record
from medaudit.reports.compare import write_comparison
from medaudit.core.components import Facet, LoadedModel, ModelLoader, Params
from medaudit.core.errors import SpecError
from medaudit.core.host import get_host
from medaudit.core.jobs import Records
from medaudit.core.spec import load_spec
from tests.conftest import spec_text
from tests.helpers import run_audit

EPS = "0.5/255"


class FlipParams(Params):
    share: float = Field(0.3, ge=0, le=1, description="Share of inputs whose answer is flipped.")


class Flipping(torch.nn.Module):
    """The demo classifier with its two logits swapped on a fixed share of inputs (chosen by a
    hash of the pixels: deterministic, so the run's determinism probe passes)."""

    def __init__(self, net: torch.nn.Module, share: float):
        super().__init__()
        self.net, self.share = net, share

    def forward(self, x):
        logits = self.net(x)
        chosen = (x.flatten(1).sum(1) * 1000.0).frac() < self.share
        return torch.where(chosen[:, None], logits.flip(1), logits)


class FlippingDemo(ModelLoader):
    name = "flipping-demo"
    Params = FlipParams

    def load(self, task):
        from medaudit.plugins.models.demo import DemoModel

        loaded = DemoModel().load(task)
        module = Flipping(loaded.module, self.params.share).eval()
        fingerprint = hashlib.sha256(f"{loaded.fingerprint}:{self.params.share}".encode()).hexdigest()
        return LoadedModel(module, task, num_classes=2, in_channels=1, access=loaded.access, fingerprint=fingerprint,
                           description=f"demo with {self.params.share:.0%} of answers flipped")


class FlippingPlugin:
    @medaudit.hookimpl
    def register_models(self, register):
        register(FlippingDemo)


def gates(baseline: str) -> str:
    return textwrap.dedent(f"""\
        acceptance:
          criteria:
            - id: AC-01
              metric: clean_accuracy
              op: ">="
              threshold: 0.3
          regression:
            - id: REG-ROBUST
              baseline: {baseline}
              metric: robust_accuracy
              epsilon: {EPS}
              max_drop: 0.02
            - baseline: {baseline}
              metric: clean_accuracy
              max_drop: 0.02
              severity: advisory""")


def audit(folder: Path, host, name: str, *, seed: int = 0, model: str = "model:\n  loader: demo",
          acceptance: str | None = None) -> Path:
    """Run a small audit into ``folder/name`` and return its run directory."""
    text = spec_text(
        model=model,
        data="data:\n  dataset: phantom\n  params: {n: 48, size: 64, seed: 0}",
        threat_model=f"threat_model:\n  norm: linf\n  epsilons: [{EPS}]",
        attacks="attacks:\n  - name: pgd\n    params: {steps: 5}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 48\n  seed: {seed}\n  output_dir: {folder}",
        validity="validity: {convergence_cases: 0, trace_cases: 0, noise_cases: 0}",
        **({"acceptance": acceptance} if acceptance is not None else {}),
    )
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    spec = load_spec(path, host)
    run_dir = folder / name
    with pytest.MonkeyPatch.context() as mp:
        # What the runner does once it passes its run directory to acceptance(); harmless after.
        def with_run_dir(*args, **kwargs):
            kwargs.setdefault("run_dir", run_dir)
            return acceptance_module.acceptance(*args, **kwargs)

        mp.setattr(runner_module, "acceptance", with_run_dir)
        mp.setattr(runner_module, "task_figures", lambda *args, **kwargs: [])
        run_audit(spec, host, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_cache):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("compare")
    host = get_host(load_entry_points=False, extra_plugins=[("flipping", FlippingPlugin())])
    base = audit(folder, host, "base")
    baseline = json.loads((base / "results.json").read_text())
    record(baseline, base, folder / "history.sqlite")  # the index of runtime.output_dir: found by report id
    by_id = baseline["audit"]["report_id"]
    return {
        "host": host, "folder": folder, "base": base, "report_id": by_id,
        "rerun": audit(folder, host, "rerun", seed=1, acceptance=gates(str(base))),
        "degraded": audit(folder, host, "degraded", model="model:\n  loader: flipping-demo\n  params: {share: 0.3}",
                          acceptance=gates(by_id)),
        "other_data": claiming_other_data(base, folder / "other-data"),
    }


def claiming_other_data(run_dir: Path, copy: Path) -> Path:
    """A copy of a run whose results name another data fingerprint."""
    shutil.copytree(run_dir, copy)
    results = json.loads((copy / "results.json").read_text())
    results["fingerprints"]["data_sha256"] = "0" * 64
    (copy / "results.json").write_text(json.dumps(results))
    return copy


def entry(comparison: dict, metric: str, attack: str = "worst_case") -> dict:
    return next(e for e in comparison["entries"] if e["metric"] == metric and e["attack"] == attack)


def test_a_planted_regression_is_significantly_worse(runs):
    comparison = compare_runs(runs["base"], runs["degraded"], host=runs["host"])
    assert comparison["paired"] and comparison["differs"] == ["spec", "model"]
    clean, robust = entry(comparison, "clean_accuracy", "clean"), entry(comparison, "robust_accuracy")
    for e in (clean, robust):
        assert e["paired"] and e["test"] == "exact McNemar" and e["n_pairs"] == 48
        assert e["significant"] and e["direction"] == "worse", e
        assert e["ci_low"] <= e["difference"] <= e["ci_high"] < 0
    assert clean["difference"] < -0.15 and comparison["summary"]["significant_worse"] >= 2
    assert comparison["a"]["report_id"] == runs["report_id"] and comparison["b"]["verdict"]
    # the perturbation sizes are means over cases: a paired bootstrap
    assert entry(comparison, "perturbation_linf_mean")["test"] == "paired bootstrap"


def test_another_seed_changes_nothing_significantly(runs):
    comparison = compare_runs(runs["base"], runs["rerun"], host=runs["host"])
    assert comparison["paired"] and comparison["differs"] == ["spec"]
    assert comparison["summary"]["significant_worse"] == 0 and comparison["summary"]["significant_better"] == 0
    clean = entry(comparison, "clean_accuracy", "clean")
    assert clean["difference"] == 0 and clean["p_value"] == 1 and clean["direction"] == "same"
    assert all(e["p_value"] is not None for e in comparison["entries"] if not e["metric"].endswith("_max"))


def test_other_data_is_compared_unpaired(runs):
    comparison = compare_runs(runs["base"], runs["other_data"], host=runs["host"])
    assert not comparison["paired"] and "data_sha256 differs" in comparison["paired_reason"]
    assert comparison["differs"] == ["data"]
    robust = entry(comparison, "robust_accuracy")
    assert robust["test"] == "Fisher exact" and not robust["paired"] and robust["p_value"] == 1
    assert entry(comparison, "perturbation_l2_mean")["test"] == "bootstrap"
    assert comparison["summary"]["significant_worse"] == 0


def test_regression_gate_fails_on_the_degraded_model_and_passes_on_a_rerun(runs):
    results = {name: json.loads((runs[name] / "results.json").read_text()) for name in ("rerun", "degraded")}
    gates_of = {name: {c["id"]: c for c in r["acceptance"]["criteria"] if c.get("kind") == "regression"}
                for name, r in results.items()}
    assert set(gates_of["rerun"]) == {"REG-ROBUST", "REG-02"}
    degraded = gates_of["degraded"]["REG-ROBUST"]
    assert degraded["verdict"] == "FAIL" and degraded["paired"] and degraded["estimate"] > 0.02
    assert degraded["baseline_report_id"] == runs["report_id"] and "significant" in degraded["reason"]
    assert gates_of["degraded"]["REG-02"]["verdict"] == "FAIL"  # advisory: shown, not gating
    assert results["degraded"]["verdict"] in ("FAIL", "INVALID")
    for gate in gates_of["rerun"].values():
        assert gate["verdict"] == "PASS" and gate["paired"], gate
    assert results["rerun"]["verdict"] == "PASS"
    suite = ET.parse(runs["degraded"] / "junit.xml").getroot()
    [case] = [c for c in suite.iter("testcase") if c.get("name").startswith("REG-ROBUST")]
    failure = case.find("failure")
    assert failure is not None and "regression of robust_accuracy" in failure.get("message")
    assert runs["report_id"] in failure.get("message")
    [rerun_case] = [c for c in ET.parse(runs["rerun"] / "junit.xml").getroot().iter("testcase")
                    if c.get("name").startswith("REG-ROBUST")]
    assert rerun_case.find("failure") is None and rerun_case.find("error") is None


def test_the_comparison_page_is_self_contained(runs, tmp_path):
    json_path, html_path = write_comparison(runs["base"], runs["degraded"], tmp_path / "out", runs["host"])
    html = html_path.read_text()
    assert json.loads(json_path.read_text())["summary"]["significant_worse"] >= 2
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html and "Content-Security-Policy" in html
    assert html.count('class="worse"') >= 2 and runs["report_id"] in html


def test_a_missing_baseline_folder_is_a_spec_error(runs, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(acceptance=gates(str(tmp_path / "nowhere"))), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path, runs["host"])
    assert "no results.json in" in str(info.value) and "nowhere" in str(info.value)
    wrong_metric = gates(str(runs["base"])).replace("metric: robust_accuracy", "metric: robust_dice")
    path.write_text(spec_text(acceptance=wrong_metric), encoding="utf-8")
    with pytest.raises(SpecError, match="has no metric 'robust_dice'"):
        load_spec(path, runs["host"])


def test_an_unknown_report_id_is_inconclusive(runs):
    from medaudit.audits.acceptance import judge_regressions

    path = runs["folder"] / "rerun.yaml"
    text = path.read_text().replace(str(runs["base"]), "MA-0123456789ab")
    spec_path = runs["folder"] / "unknown.yaml"
    spec_path.write_text(text, encoding="utf-8")
    spec = load_spec(spec_path, runs["host"])
    judged = judge_regressions(spec, runs["host"], {"records": {}}, runs["rerun"])
    assert {j["verdict"] for j in judged} == {"INCONCLUSIVE"}
    assert all("MA-0123456789ab" in j["reason"] for j in judged)


# -- the tests of a difference, on numbers worked out by hand ---------------------------------


def test_mcnemar_counts_only_discordant_pairs():
    a = [1] * 30 + [1] * 10 + [0] * 2 + [0] * 8
    b = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 8
    out = mcnemar(a, b, 0.95)
    assert out["difference"] == pytest.approx(-8 / 50) and out["discordant"] == [10, 2]
    assert out["p_value"] == pytest.approx(0.03857, abs=1e-4)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert out["ci_low"] < -0.16 < out["ci_high"] < 0
    assert mcnemar([1, 0, 1], [1, 0, 1], 0.95)["p_value"] == 1


def test_newcombe_unpaired_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a): 56/70 vs 48/80, method 10.
    out = newcombe_unpaired(48, 80, 56, 70, 0.95)
    assert out["difference"] == pytest.approx(0.2)
    assert out["ci_low"] == pytest.approx(0.0524, abs=1e-4) and out["ci_high"] == pytest.approx(0.3339, abs=1e-4)


def test_the_paired_bootstrap_is_seeded_and_centred():
    a = [0.5 + 0.01 * i for i in range(40)]
    b = [x + 0.05 + (0.02 if i % 2 else -0.02) for i, x in enumerate(a)]
    first, again = paired_bootstrap(a, b, 0.95), paired_bootstrap(a, b, 0.95)
    assert first == again and first["difference"] == pytest.approx(0.05)
    assert first["ci_low"] < 0.05 < first["ci_high"] and first["p_value"] < 0.01
    assert paired_bootstrap(a, a, 0.95)["p_value"] == 1


def test_per_case_values_that_do_not_add_up_are_not_paired(host):
    rows = [{"case": f"c{i}", "label": i % 2, "clean_pred": 0, "adv_pred": 0, "clean_correct": i % 2 == 0,
             "adv_correct": i % 2 == 0, "attacked": True} for i in range(10)]
    records = Records(rows, {Facet.CLASSIFICATION})
    accuracy = sample(host.get("metric", "robust_accuracy")(), records)
    assert accuracy.kind == "proportion" and accuracy.per_case == {f"c{i}": float(i % 2 == 0) for i in range(10)}
    worst_class = sample(host.get("metric", "specificity")(), records)  # a case alone has no specificity
    assert worst_class.kind == "proportion" and worst_class.per_case is None
