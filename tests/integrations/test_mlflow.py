"""The MLflow tracker plugin: a real audit tracked in a local store and read back, resume, staying out of the way."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

import medaudit  # noqa: E402
import medaudit_mlflow  # noqa: E402
from medaudit.core.errors import ExitCode  # noqa: E402
from medaudit.core.host import get_host  # noqa: E402
from medaudit.core.spec import load_spec  # noqa: E402
from medaudit_mlflow.keys import group_parts, key, key_part, spec_params  # noqa: E402
from tests.core.test_host import install_entry_point  # noqa: E402
from tests.helpers import StopAfter, run_audit  # noqa: E402

MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MEDAUDIT_MLFLOW", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")

#: Two attacks, two budgets, a blocking criterion that passes and an advisory one that fails; a
#: demo model small enough to train in seconds (how good it is does not matter here).
SPEC = dict(
    model="model:\n  loader: demo\n  params: {image_size: 32, train_size: 256, epochs: 4}",
    data="data:\n  dataset: phantom\n  params: {n: 16, size: 32, seed: 0}",
    threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 4/255]",
    attacks="attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 2}",
    acceptance=textwrap.dedent(
        """\
        acceptance:
          criteria:
            - {id: AC-01, metric: clean_accuracy, op: '>=', threshold: 0.5, statistic: point}
            - {id: AC-02, metric: robust_accuracy, epsilon: 4/255, op: '>=', threshold: 0.99, severity: advisory}"""
    ),
    # the validity checks' re-runs are another test's business: none here, to keep the audits quick
    validity="validity: {convergence_cases: 0, trace_cases: 0, noise_cases: 0}",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No tracking variable leaks in, MLflow's defaults (./mlflow.db, ./mlruns) land in tmp_path,
    and no run is left open for the exit hook."""
    for var in MLFLOW_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    medaudit_mlflow.end_open_runs()


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One local store for the module (creating its tables takes seconds); each test its own experiment."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:  # MLflow keeps this store, and its default artifact root ./mlruns
        mp.chdir(folder)
        MlflowClient(uri).search_experiments()  # creates the tables
    return uri


@pytest.fixture
def store(store_uri, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    return MlflowClient(store_uri)


def tracked_host(*extra):
    return get_host(load_entry_points=False, extra_plugins=[("mlflow", medaudit_mlflow), *extra])


def spec_of(write_spec, tmp_path, host):
    runtime = f"runtime:\n  device: cpu\n  batch_size: 16\n  seed: 0\n  output_dir: {tmp_path / 'runs'}"
    return load_spec(write_spec(runtime=runtime, **SPEC), host)


def only_run(client: MlflowClient, experiment: str = "tiny"):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    [run] = client.search_runs([exp.experiment_id])
    return run


def test_audit_is_tracked_and_reads_back(store, write_spec, tmp_path):
    host = tracked_host()
    outcome = run_audit(spec_of(write_spec, tmp_path, host), host)
    run_dir = outcome.run_dir
    results = json.loads((run_dir / "results.json").read_text())

    run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_name == f"tiny-{run_dir.name}"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["medaudit.version"] == medaudit.__version__
    assert tags["medaudit.run_dir"] == str(run_dir.resolve())
    fingerprints = json.loads((run_dir / "fingerprints.json").read_text())
    assert fingerprints and all(tags[f"medaudit.fingerprint.{k}"] == v for k, v in fingerprints.items())

    assert params["model.loader"] == "demo" and params["data.dataset"] == "phantom"
    assert params["data.params.n"] == "16" and params["runtime.seed"] == "0"
    assert params["threat_model.norm"] == "linf" and params["threat_model.epsilons"] == "0, 4/255"
    assert params["attacks"] == "fgsm, pgd" and params["attacks.pgd.params.steps"] == "2"
    assert params["defenses"] == "none" and params["acceptance.criteria.AC-02.severity"] == "advisory"

    # every metric row of results.json, the worst case included, under its key and value
    rows = results["rows"]
    assert {r["attack"] for r in rows} == {"fgsm", "pgd", "worst_case"}
    for row in rows:
        for name in ("robust_accuracy", "attack_success_rate"):
            entry = row["metrics"][name]
            k = f"none/{row['attack']}/eps_{row['epsilon_label'].replace('/', '_')}/{name}"
            assert metrics[k] == entry["value"], k
            assert metrics[k + ".ci_low"] == entry["ci_low"] and metrics[k + ".ci_high"] == entry["ci_high"]
    assert metrics["none/clean/clean_accuracy"] == results["clean"]["none"]["clean_accuracy"]["value"]
    # job_finished logged each job's values as the job ended; audit_finished logged the same again
    history = store.get_metric_history(run.info.run_id, "none/pgd/eps_4_255/robust_accuracy")
    assert len(history) == 2 and len({m.value for m in history}) == 1

    assert results["verdict"] == "PASS" and tags["medaudit.verdict"] == "PASS" and metrics["verdict_pass"] == 1
    assert tags["medaudit.criterion.AC-01"] == "PASS" and metrics["acceptance/AC-01/pass"] == 1
    assert tags["medaudit.criterion.AC-02"] == "FAIL" and metrics["acceptance/AC-02/pass"] == 0
    assert tags["medaudit.exit_code"] == str(results["exit_code"])

    artifacts = {f.path for f in store.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.html", "junit.xml", "spec.resolved.yaml"} <= artifacts
    copy = store.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "download"))
    assert Path(copy).read_bytes() == (run_dir / "results.json").read_bytes()


def test_an_interrupted_audit_is_killed_and_its_resume_reopens_the_run(store, write_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    host = tracked_host(("stopper", StopAfter(2)))
    spec = spec_of(write_spec, tmp_path, host)
    with pytest.raises(Exception) as info:
        run_audit(spec, host)
    assert info.value.exit_code == ExitCode.INTERRUPTED
    assert only_run(store, "nightly").info.status == "RUNNING"  # until the process ends
    medaudit_mlflow.end_open_runs()  # what the exit hook does
    run = only_run(store, "nightly")
    assert run.info.status == "KILLED" and run.data.tags["medaudit.ended"] == "interrupted"

    [run_dir] = list((tmp_path / "runs" / "tiny").iterdir())
    host = tracked_host()
    run_audit(spec, host, run_dir)
    resumed = only_run(store, "nightly")  # the same run, not a second one
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    results = json.loads((run_dir / "results.json").read_text())
    worst = next(r for r in results["rows"] if r["attack"] == "worst_case" and r["epsilon"] > 0)
    worst_value = worst["metrics"]["robust_accuracy"]["value"]
    assert resumed.data.metrics["none/worst_case/eps_4_255/robust_accuracy"] == worst_value
    assert resumed.data.tags["medaudit.verdict"] == "PASS"


def test_mlflow_missing_is_a_warning_not_a_crash(write_spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MEDAUDIT_MLFLOW", "1")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    spec = load_spec(write_spec(), get_host(load_entry_points=False))
    with caplog.at_level(logging.WARNING, logger="medaudit_mlflow"):
        medaudit_mlflow.audit_started(spec=spec, run_dir=tmp_path, jobs=[])
        medaudit_mlflow.audit_finished(results={"verdict": "PASS"}, run_dir=tmp_path)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "medaudit_mlflow"]
    assert "mlflow is not installed" in warning and "pip install 'medaudit[mlflow]'" in warning
    assert not medaudit_mlflow._open and not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists()


def test_a_failing_store_is_a_warning_not_a_crash(write_spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracking")
    spec = load_spec(write_spec(), get_host(load_entry_points=False))
    with caplog.at_level(logging.WARNING, logger="medaudit_mlflow"):
        medaudit_mlflow.audit_started(spec=spec, run_dir=tmp_path, jobs=[])
    assert "starting the run failed" in caplog.text and not medaudit_mlflow._open
    medaudit_mlflow.audit_finished(results={}, run_dir=tmp_path)  # nothing open: nothing happens


def test_a_store_that_fails_mid_audit_ends_tracking_not_the_audit(store, write_spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "flaky")
    spec = load_spec(write_spec(), get_host(load_entry_points=False))
    medaudit_mlflow.audit_started(spec=spec, run_dir=tmp_path, jobs=[])
    [tracked] = medaudit_mlflow._open.values()

    def refuse(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(tracked.client, "log_batch", refuse)
    job = SimpleNamespace(id="none.pgd.eps1", defense="none", attack="pgd", epsilon_label="1/255", budget="")
    with caplog.at_level(logging.WARNING, logger="medaudit_mlflow"):
        summary = {"metrics": {"robust_accuracy": {"value": 0.5}}}
        medaudit_mlflow.job_finished(job=job, summary=summary, run_dir=tmp_path)
    assert "logging job none.pgd.eps1 failed: ConnectionError" in caplog.text and not medaudit_mlflow._open
    assert only_run(store, "flaky").info.status == "FAILED"


@pytest.mark.parametrize(
    "env,requested",
    [
        ({}, False),
        ({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}, True),
        ({"MEDAUDIT_MLFLOW": "1"}, True),
        ({"MLFLOW_TRACKING_URI": "sqlite:///x.db", "MEDAUDIT_MLFLOW": "0"}, False),
        ({"MLFLOW_TRACKING_URI": "  "}, False),
    ],
)
def test_tracking_is_asked_for_by_the_environment(env, requested, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert medaudit_mlflow.tracking_requested() is requested


def test_inactive_without_the_variables(write_spec, tmp_path, monkeypatch):
    spec = load_spec(write_spec(), get_host(load_entry_points=False))
    monkeypatch.setattr(mlflow, "MlflowClient", lambda *a, **k: pytest.fail("MLflow was used while tracking is off"))
    medaudit_mlflow.audit_started(spec=spec, run_dir=tmp_path, jobs=[])
    assert not medaudit_mlflow._open
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    # and the plugin does not even import mlflow then
    code = ("import sys, types, medaudit_mlflow as m; m.audit_started(spec=None, run_dir='.', jobs=[]); "
            "m.job_finished(job=None, summary={}, run_dir='.'); m.audit_finished(results={}, run_dir='.'); "
            "print('mlflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_VARS}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(medaudit_mlflow.__file__).parents[1], check=True)
    assert done.stdout.strip() == "False"


def test_keys_are_legal_in_mlflow():
    legal = re.compile(r"^[/\w.\- ]*$")  # what MLflow accepts on every platform
    adaptive = key(*group_parts("none", "pgd@adaptive", "4/255"), "robust_accuracy")
    assert adaptive == "none/pgd_adaptive/eps_4_255/robust_accuracy"
    level = key(*group_parts("jpeg", "corrupt", "severity 3", budget="severity"), "dice")
    assert level == "jpeg/corrupt/severity 3/dice"
    assert key(*group_parts("none", "clean", "0"), "clean_accuracy") == "none/clean/clean_accuracy"
    assert key_part("..") == "_.." and key_part("a/b:c=d") == "a_b_c_d"
    params = spec_params({"attacks": [{"name": "pgd", "id": "pgd:strong", "params": {"steps": 10}}],
                          "threat_model": {"norm": "linf", "epsilons": [0.0, 1 / 255]}, "note": None, "title": ""})
    assert params == {"attacks": "pgd:strong", "defenses": "none", "attacks.pgd_strong.name": "pgd",
                      "attacks.pgd_strong.id": "pgd:strong", "attacks.pgd_strong.params.steps": "10",
                      "threat_model.norm": "linf", "threat_model.epsilons": "0, 1/255"}
    assert all(legal.match(k) for k in [*params, adaptive, level])


def test_the_entry_point_registers_the_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_entry_point(site, "medaudit-mlflow-test", "mlflow", "medaudit_mlflow")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("MEDAUDIT_LOAD_PLUGINS", "mlflow")
    host = get_host()
    assert host.pm.get_plugin("mlflow") is medaudit_mlflow
    impls = {impl.plugin_name for impl in host.pm.hook.audit_finished.get_hookimpls()}
    assert "mlflow" in impls
