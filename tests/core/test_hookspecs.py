"""Every hook of :mod:`medaudit.core.hookspecs` has a documented contract and a test that
exercises it; the lifecycle hooks get theirs here, asserted on what the docstrings promise."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

import medaudit
from medaudit.core import hookspecs
from medaudit.core.components import KINDS
from medaudit.core.host import get_host

TESTS = Path(__file__).resolve().parents[1]
SPECS = {name: f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "medaudit_spec")}
REGISTRATION = {hook for _, hook in KINDS.values()}


def test_hooks_are_the_known_ones():
    assert set(SPECS) >= REGISTRATION | {"audit_started", "job_finished", "audit_finished"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hook_documents_its_contract(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    assert doc.splitlines() and doc.splitlines()[0].strip(), f"{name} has no docstring"
    for arg in inspect.signature(SPECS[name]).parameters:
        assert re.search(rf":param {arg}: \S", doc), f"{name} does not document its argument {arg!r}"


def _implemented_in(name: str, root: Path) -> list[Path]:
    """Files under ``root`` that implement hook ``name`` (a function or method of that name)."""
    pattern = re.compile(rf"^\s*def {name}\(", re.MULTILINE)
    return [p for p in root.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hook_is_exercised_by_a_test(name):
    """A registration hook is exercised by every test that builds the host when a built-in
    plugin implements it; any other hook needs a test plugin implementing it."""
    in_tests = _implemented_in(name, TESTS)
    builtin = name in REGISTRATION and _implemented_in(name, Path(medaudit.__file__).parent / "plugins")
    assert in_tests or builtin, f"no test implements hook {name!r}: add one that asserts its contract"


class Recorder:
    """A plugin that keeps what each lifecycle hook receives."""

    def __init__(self):
        self.started: list[dict] = []
        self.finished_jobs: list[dict] = []
        self.finished: list[dict] = []

    @medaudit.hookimpl
    def audit_started(self, spec, run_dir, jobs):
        self.started.append(dict(spec=spec, run_dir=Path(run_dir), jobs=list(jobs),
                                 results_existed=(Path(run_dir) / "results.json").exists()))

    @medaudit.hookimpl
    def job_finished(self, job, summary, run_dir):
        self.finished_jobs.append(dict(job=job, summary=json.loads(json.dumps(summary, default=str)), run_dir=Path(run_dir)))

    @medaudit.hookimpl
    def audit_finished(self, results, run_dir):
        self.finished.append(dict(results=json.loads(json.dumps(results, default=str)), run_dir=Path(run_dir)))


@pytest.mark.slow
def test_lifecycle_hooks_receive_what_they_document(write_spec, tmp_path):
    from tests.helpers import run_audit
    from medaudit.core.spec import load_spec

    spec_path = write_spec(
        data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 4/255]",
        attacks="attacks:\n  - name: fgsm",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 16\n  seed: 0\n  output_dir: {tmp_path / 'runs'}",
    )
    recorder = Recorder()
    host = get_host(load_entry_points=False, extra_plugins=[("recorder", recorder)])
    run_audit(load_spec(spec_path, host), host)

    # audit_started: the validated spec, the run directory and every planned job, before any runs.
    [started] = recorder.started
    assert started["spec"].audit.name == "tiny" and started["run_dir"].is_dir() and not started["results_existed"]
    planned = {job.id for job in started["jobs"]}
    assert planned and all(hasattr(job, "defense") and hasattr(job, "attack") for job in started["jobs"])

    # job_finished: once per job, after its records are written, with its metric values as
    # results.json shows them.
    finished = {entry["job"].id: entry for entry in recorder.finished_jobs}
    assert set(finished) == planned and len(recorder.finished_jobs) == len(planned)
    [done] = recorder.finished
    results, run_dir = done["results"], done["run_dir"]
    assert run_dir == started["run_dir"]
    for job_id, entry in finished.items():
        assert entry["run_dir"] == run_dir and (run_dir / "records" / f"{job_id}.jsonl").is_file()
        job, values = entry["job"], entry["summary"]["metrics"]
        if job.is_clean:
            expected = results["clean"][job.defense]
        else:
            [row] = [r for r in results["rows"]
                     if (r["defense"], r["attack"], r["epsilon"]) == (job.defense, job.attack, job.epsilon)]
            expected = row["metrics"]
        shown = {name: value for name, value in expected.items() if name in values}
        assert values and values == shown, f"{job_id}: job_finished got {values}, results.json shows {expected}"

    # audit_finished: the content of results.json, written (with the report) before the call.
    assert results == json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert (run_dir / "report.html").is_file()
