"""Running audits end to end: outputs, exit codes, validity gate, interrupt and resume."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import medaudit
import medaudit.core.components
from medaudit.audits.records import record_path
from medaudit.audits.runner import Runner
from medaudit.core.spec import load_spec
from medaudit.cli import cli
from medaudit.core.components import Attack, Norm, Params
from medaudit.core.errors import ExitCode, ResumeError
from medaudit.core.host import get_host
from tests.helpers import StopAfter, run_audit

EXAMPLE = Path(__file__).parents[2] / "examples" / "demo.yaml"


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["run", *args, "-q"])


def results_of(out: Path) -> dict:
    [path] = list(out.rglob("results.json"))
    return json.loads(path.read_text())


@pytest.mark.slow
def test_example_audit_end_to_end(tmp_path):
    result = run_cli(str(EXAMPLE), "--output-dir", str(tmp_path))
    assert result.exit_code == ExitCode.PASS, result.output
    [run_dir] = list((tmp_path / "demo-phantom").iterdir())
    assert f"report: {run_dir / 'report.html'}" in result.output
    for name in ("report.html", "results.json", "spec.resolved.yaml", "fingerprints.json", "environment.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["verdict"] == "PASS" and results["exit_code"] == 0
    verdicts = {c["id"]: c["verdict"] for c in results["acceptance"]["criteria"]}
    assert verdicts == {"AC-01": "PASS", "AC-02": "PASS", "AC-03": "FAIL"}  # AC-03 is advisory
    assert len(list((run_dir / "records").glob("*.jsonl"))) == 1 + 2 * 5
    html = (run_dir / "report.html").read_text()
    for text in ("Nodule classifier on phantom CT slices", "AC-03", "worst case", "Content-Security-Policy", "sha256"):
        assert text.lower() in html.lower(), text
    assert "<script" not in html and "http://" not in html and "https://" not in html


def _rows(results: dict) -> dict:
    return {(r["defense"], r["attack"], r["epsilon"]): r["metrics"] for r in results["rows"]}


def test_results_follow_the_definitions(write_spec, tmp_path):
    result = run_cli(str(write_spec()), "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    results = results_of(tmp_path)
    clean = results["clean"]["none"]["clean_accuracy"]
    rows = _rows(results)
    for attack in ("fgsm", "pgd", "worst_case"):
        # eps = 0: robust accuracy is clean accuracy, nothing succeeds
        assert rows[("none", attack, 0.0)]["robust_accuracy"]["value"] == clean["value"]
        assert rows[("none", attack, 0.0)]["attack_success_rate"]["value"] == 0
    for eps in (1 / 255, 4 / 255):
        worst = rows[("none", "worst_case", eps)]["robust_accuracy"]["value"]
        assert worst <= min(rows[("none", a, eps)]["robust_accuracy"]["value"] for a in ("fgsm", "pgd"))
        assert rows[("none", "pgd", eps)]["perturbation_linf_max"]["value"] <= eps + 1e-6
    ci = clean["ci_low"], clean["ci_high"]
    assert ci[0] <= clean["value"] <= ci[1] and clean["n"] == 48


def junit_outcomes(out: Path) -> dict[str, str]:
    """Test case name -> 'failure', 'error', 'skipped' or 'passed', from the run's junit.xml."""
    [path] = list(out.rglob("junit.xml"))
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [k for k in ("failure", "error", "skipped") if case.find(k) is not None]
        outcomes[case.get("name").split(":")[0]] = kinds[0] if kinds else "passed"
    return outcomes


@pytest.mark.parametrize(
    "criterion,code,junit",
    [
        ("{id: A, metric: clean_accuracy, op: '>=', threshold: 0.5}", ExitCode.PASS, "passed"),
        ("{id: A, metric: clean_accuracy, op: '>=', threshold: 0.999, statistic: point}", ExitCode.FAIL, "failure"),
        ("{id: A, metric: robust_accuracy, epsilon: 4/255, op: '>=', threshold: 0.9}", ExitCode.FAIL, "failure"),
        ("{id: A, metric: robust_accuracy, epsilon: 4/255, op: '>=', threshold: 0.9, severity: advisory}", ExitCode.PASS, "skipped"),
        ("{id: A, metric: clean_accuracy, op: '>=', threshold: 0.5, min_n: 1000}", ExitCode.INCONCLUSIVE, "error"),
    ],
)
def test_exit_code_and_junit_follow_acceptance(criterion, code, junit, write_spec, tmp_path):
    spec = write_spec(acceptance=f"acceptance:\n  criteria:\n    - {criterion}", attacks="attacks:\n  - name: fgsm")
    result = run_cli(str(spec), "--output-dir", str(tmp_path))
    assert result.exit_code == code, result.output
    assert results_of(tmp_path)["exit_code"] == code
    outcomes = junit_outcomes(tmp_path)
    assert outcomes.pop("A") == junit
    assert {"budget_respected", "epsilon_monotonic", "gradients_usable"} <= set(outcomes)
    assert set(outcomes.values()) <= {"passed", "skipped"}  # every validity check passed or was not applicable


def test_no_criteria_means_nothing_assessed(write_spec, tmp_path):
    result = run_cli(str(write_spec(acceptance="", attacks="attacks:\n  - name: fgsm")), "--output-dir", str(tmp_path))
    assert result.exit_code == ExitCode.NO_DATA
    assert results_of(tmp_path)["verdict"] == "NOT ASSESSED"


class OverBudget(Attack):
    """Deliberately exceeds its budget, to exercise the validity gate."""

    name = "over-budget"
    norms = frozenset({Norm.LINF})
    Params = Params

    def perturb(self, model, x, y, *, eps, norm, generator):
        return (x + 2 * eps).clamp(0, 1)


class OverBudgetPlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(OverBudget)


def test_budget_violation_makes_the_audit_invalid(write_spec, tmp_path):
    host = get_host(load_entry_points=False, extra_plugins=[("over", OverBudgetPlugin())])
    spec = load_spec(write_spec(attacks="attacks:\n  - name: over-budget", runtime=f"runtime:\n  output_dir: {tmp_path}"), host)
    outcome = run_audit(spec, host)
    assert outcome.results["verdict"] == "INVALID" and outcome.exit_code == ExitCode.INVALID
    [check] = [c for c in outcome.results["validity"] if c["id"] == "budget_respected"]
    assert check["status"] == "FAIL"
    assert junit_outcomes(tmp_path)["budget_respected"] == "failure"


def test_interrupted_run_resumes_without_redoing_jobs(write_spec, tmp_path):
    spec_path = write_spec(runtime=f"runtime:\n  device: cpu\n  batch_size: 16\n  output_dir: {tmp_path / 'a'}")

    reference_host = get_host(load_entry_points=False)
    reference = run_audit(load_spec(spec_path, reference_host), reference_host)

    stopper = StopAfter(3)
    host = get_host(load_entry_points=False, extra_plugins=[("stopper", stopper)])
    spec = load_spec(spec_path, host).model_copy(deep=True)
    spec.runtime.output_dir = tmp_path / "b"
    with pytest.raises(Exception) as info:
        run_audit(spec, host)
    assert info.value.exit_code == ExitCode.INTERRUPTED and "--resume" in str(info.value)
    [run_dir] = list((tmp_path / "b" / "tiny").iterdir())
    assert not (run_dir / "results.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl")}
    assert len(finished) == 3

    counter = StopAfter(-1)
    host = get_host(load_entry_points=False, extra_plugins=[("counter", counter)])
    resumed = run_audit(spec, host, run_dir)
    assert len(counter.seen) == 7 - 3 and not set(counter.seen) & {n.removesuffix(".jsonl") for n in finished}
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl") if p.name in finished} == finished
    assert _rows(resumed.results) == _rows(reference.results)
    assert resumed.results["acceptance"] == reference.results["acceptance"]
    events = [e["event"] for e in resumed.results["timeline"] if e["event"] != "job"]
    assert events == ["start", "interrupted", "resume"]  # "finished" is logged after results.json


def test_resume_refuses_a_changed_spec(write_spec, tmp_path):
    host = get_host(load_entry_points=False)
    spec = load_spec(write_spec(attacks="attacks:\n  - name: fgsm", runtime=f"runtime:\n  output_dir: {tmp_path}"), host)
    outcome = run_audit(spec, host)
    changed = load_spec(write_spec(attacks="attacks:\n  - name: fgsm\n  - name: pgd", name="changed.yaml"), host)
    with pytest.raises(ResumeError, match="spec_sha256 changed"):
        run_audit(changed, host, outcome.run_dir)
    result = run_cli(str(write_spec(name="changed2.yaml", attacks="attacks:\n  - name: pgd")), "--resume", str(outcome.run_dir))
    assert result.exit_code == ExitCode.USAGE_ERROR and "cannot resume" in result.output


def test_report_rerenders_from_results_and_escapes_hostile_text(write_spec, tmp_path):
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    audit = f"audit:\n  name: hostile\n  title: '{hostile}'\n  description: '{hostile}'"
    result = run_cli(str(write_spec(audit=audit, attacks="attacks:\n  - name: fgsm")), "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    [run_dir] = list((tmp_path / "hostile").iterdir())
    report = run_dir / "report.html"
    report.unlink()
    again = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert again.exit_code == 0 and report.is_file()
    html = report.read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_model_is_moved_to_the_selected_device_and_stays_frozen(write_spec, host):
    runner = Runner(load_spec(write_spec(), host), host, show_progress=False)
    runner.load()
    assert runner.device == torch.device("cpu")
    assert all(p.device.type == "cpu" and not p.requires_grad for p in runner.model.module.parameters())
    assert [j.title() for j in runner.jobs][:3] == ["none: clean", "none: fgsm eps=0", "none: fgsm eps=1/255"]


class Blur(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))


class BlurDefense(medaudit.core.components.Defense):
    """A 3x3 mean filter in front of the model (differentiable, so attacked directly)."""

    name = "blur"
    Params = Params

    def apply(self, model, data):
        import dataclasses

        return dataclasses.replace(model, module=Blur(model.module).eval(), description="blurred")


class BlurPlugin:
    @medaudit.hookimpl
    def register_defenses(self, register):
        register(BlurDefense)


def test_defenses_multiply_the_plan_and_get_their_own_rows(write_spec, tmp_path):
    host = get_host(load_entry_points=False, extra_plugins=[("blur", BlurPlugin())])
    text_defenses = "defenses:\n  - name: blur"
    acceptance = "acceptance:\n  criteria:\n    - {id: A, metric: robust_accuracy, defense: blur, epsilon: 1/255, op: '>=', threshold: 0.01}"
    spec = load_spec(write_spec(attacks=f"attacks:\n  - name: fgsm\n{text_defenses}", acceptance=acceptance,
                                runtime=f"runtime:\n  output_dir: {tmp_path}"), host)
    outcome = run_audit(spec, host)
    jobs = outcome.results["jobs"]
    assert [j["defense"] for j in jobs].count("blur") == 1 + 3 and [j["defense"] for j in jobs].count("none") == 4
    assert set(outcome.results["clean"]) == {"none", "blur"}
    rows = _rows(outcome.results)
    assert ("blur", "worst_case", 1 / 255) in rows
    # the defense's clean job ran the blurred model
    runner = Runner(spec, host, show_progress=False)
    runner.load()
    with torch.inference_mode():
        expected = runner.models["blur"].module(runner.data.images).argmax(1).tolist()
    blur_clean = next(j for j in jobs if j["defense"] == "blur" and j["attack"] == "clean")
    lines = record_path(outcome.run_dir, blur_clean["id"]).read_text().splitlines()
    assert [json.loads(line)["clean_pred"] for line in lines] == expected
    assert outcome.results["acceptance"]["criteria"][0]["defense"] == "blur"


class NeedsMissingData(Attack):
    """Checks its resources in prepare(), as a universal attack loading a fit set would."""

    name = "needs-missing-data"
    norms = frozenset({Norm.LINF})
    Params = Params
    prepared = 0

    def prepare(self, context):
        type(self).prepared += 1
        context.load_dataset("no-such-dataset", {})

    def perturb(self, model, x, y, *, eps, norm, generator):
        return x.clone()


class NeedsMissingDataPlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(NeedsMissingData)


def test_attack_prepare_fails_before_anything_is_written(write_spec, tmp_path):
    from medaudit.core.errors import DataError

    host = get_host(load_entry_points=False, extra_plugins=[("missing", NeedsMissingDataPlugin())])
    out = tmp_path / "out"
    spec = load_spec(write_spec(attacks="attacks:\n  - name: needs-missing-data", runtime=f"runtime:\n  output_dir: {out}"), host)
    NeedsMissingData.prepared = 0
    with pytest.raises(DataError, match="unknown dataset 'no-such-dataset'"):
        run_audit(spec, host)
    assert NeedsMissingData.prepared == 1 and not out.exists()


def test_speed_switches_keep_results_close_and_losses_in_fp32(write_spec, tmp_path, host, demo_model, demo_data):
    from medaudit.core.models import SpeedWrapper

    import copy

    x = demo_data.images[:32]
    fast_model = SpeedWrapper(copy.deepcopy(demo_model.module), torch.bfloat16, channels_last=True)  # converts in place
    with torch.inference_mode():
        reference = demo_model.module(x)
        fast = fast_model(x)
    assert fast.dtype == torch.float32  # attack losses are computed in full precision
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() >= 0.9

    runtime = f"runtime:\n  device: cpu\n  output_dir: {tmp_path}\n  autocast: bf16\n  channels_last: true"
    outcome = run_audit(load_spec(write_spec(runtime=runtime), host), host)
    assert outcome.results["spec"]["runtime"]["autocast"] == "bf16"
    assert outcome.results["clean"]["none"]["clean_accuracy"]["value"] > 0.85


def test_fp16_autocast_is_refused_on_the_cpu(write_spec, host):
    from medaudit.core.errors import SpecError

    with pytest.raises(SpecError, match="autocast fp16 needs a CUDA device"):
        load_spec(write_spec(runtime="runtime:\n  device: cpu\n  autocast: fp16"), host)


class ScoresOnlyDemo(medaudit.core.components.ModelLoader):
    """The demo model behind an API that returns scores but no gradients (as ONNX will)."""

    name = "scores-only-demo"
    Params = Params

    def load(self, task):
        import dataclasses

        from medaudit.core.components import Access
        from medaudit.plugins.models.demo import DemoModel

        loaded = DemoModel().load(task)
        return dataclasses.replace(loaded, access=frozenset({Access.SCORES, Access.DECISIONS}))


class ScoresOnlyPlugin:
    @medaudit.hookimpl
    def register_models(self, register):
        register(ScoresOnlyDemo)


def test_planner_refuses_attacks_the_model_cannot_serve(write_spec, tmp_path):
    from medaudit.core.errors import SpecError

    host = get_host(load_entry_points=False, extra_plugins=[("scores", ScoresOnlyPlugin())])
    out = tmp_path / "out"
    model = "model:\n  loader: scores-only-demo"
    spec = load_spec(write_spec(model=model, runtime=f"runtime:\n  output_dir: {out}"), host)
    with pytest.raises(SpecError) as info:
        run_audit(spec, host)
    assert "attack 'fgsm' needs gradients but the model gives decisions, scores" in str(info.value)
    assert "use a score- or decision-based attack" in str(info.value) and not out.exists()
    attacks = "attacks:\n  - name: square\n    params: {queries: 20}"
    # Random noise beats a 20-query Square on this model (the noise baseline would make the audit INVALID): off here.
    spec = load_spec(write_spec(model=model, attacks=attacks, runtime=f"runtime:\n  output_dir: {out}",
                                validity="validity: {noise_cases: 0}"), host)
    assert run_audit(spec, host).exit_code == ExitCode.PASS


def test_run_dir_holding_files_is_refused_without_force(write_spec, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    spec = str(write_spec(attacks="attacks:\n  - name: fgsm"))
    result = run_cli(spec, "--run-dir", str(run_dir), "--output-dir", str(out))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {run_dir}: the run directory exists and is not empty; use --force to replace its contents "
        "(removed only once the model and data have loaded), or name another directory"
    ]
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"] and not out.exists()
    # --force replaces only an earlier medaudit run, never an arbitrary folder
    result = run_cli(spec, "--run-dir", str(run_dir), "--force")
    assert result.exit_code == ExitCode.USAGE_ERROR and "not a medaudit run directory" in result.output
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_force_replaces_an_earlier_run_only_once_model_and_data_load(write_spec, tmp_path):
    spec = str(write_spec(attacks="attacks:\n  - name: fgsm"))
    run_dir = tmp_path / "run"  # an earlier run's leftovers
    (run_dir / "records").mkdir(parents=True)
    for name in ("fingerprints.json", "records/old-job.jsonl", "results.json", "stale.txt"):
        (run_dir / name).write_text("{}")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad = write_spec(name="bad.yaml", attacks="attacks:\n  - name: fgsm",
                     model=f"model:\n  loader: timm\n  params: {{arch: test_resnet, checkpoint: '{garbage}'}}")
    result = run_cli(str(bad), "--run-dir", str(run_dir), "--force")
    assert result.exit_code == ExitCode.USAGE_ERROR and "garbage.pt" in result.output
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before  # bad input loses nothing

    result = run_cli(spec, "--run-dir", str(run_dir), "--force")
    assert result.exit_code == ExitCode.PASS, result.output
    assert not (run_dir / "stale.txt").exists() and not (run_dir / "records" / "old-job.jsonl").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["verdict"] == "PASS" and [e["event"] for e in results["timeline"]][:1] == ["start"]
    assert run_cli(spec, "--run-dir", str(tmp_path / "new"), "--resume", str(run_dir)).exit_code == ExitCode.USAGE_ERROR


class FixedSizeModel(medaudit.core.components.ModelLoader):
    """A classifier that only takes 64 x 64 inputs (like an ONNX graph with a fixed size)."""

    name = "fixed-size"
    Params = Params

    def load(self, task):
        from medaudit.core.components import Access, LoadedModel

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 2))
        return LoadedModel(net.eval(), task, 2, 1, frozenset(Access), "fixed")


class FixedSizePlugin:
    @medaudit.hookimpl
    def register_models(self, register):
        register(FixedSizeModel)


def test_a_model_that_cannot_take_the_data_fails_before_the_run_dir_exists(write_spec, tmp_path):
    from medaudit.core.errors import DataError

    host = get_host(load_entry_points=False, extra_plugins=[("fixed", FixedSizePlugin())])
    out = tmp_path / "out"
    data = "data:\n  dataset: phantom\n  params: {n: 8, size: 32, seed: 0}"
    spec = load_spec(write_spec(model="model:\n  loader: fixed-size", data=data, runtime=f"runtime:\n  output_dir: {out}"), host)
    with pytest.raises(DataError, match=r"the model cannot run on the data \(case \S+, input of shape \(1, 1, 32, 32\)\)"):
        run_audit(spec, host)
    assert not out.exists()
