"""The audit history: every finished run is indexed; the index is a cache of the run
directories (deleting it loses nothing) and finds a run again by its report id."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from medaudit.audits import history
from medaudit.cli import cli
from medaudit.core.errors import MedauditError
from tests.conftest import spec_text

TINY = dict(
    data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
    attacks="attacks:\n  - name: fgsm",
    threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 2/255]",
    validity="validity: {convergence_cases: 0, trace_cases: 0, noise_cases: 0}",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of one audit and one of another, in one output folder."""
    out = tmp_path_factory.mktemp("history") / "runs"
    folder = out.parent
    for name, seed in (("alpha", 0), ("alpha", 1), ("beta", 0)):
        spec = folder / f"{name}{seed}.yaml"
        spec.write_text(spec_text(**TINY, audit=f"audit: {{name: {name}}}",
                                  runtime=f"runtime: {{device: cpu, seed: {seed}, output_dir: {out}}}"))
        result = CliRunner().invoke(cli, ["run", str(spec), "-q"])
        assert result.exit_code == 0, result.output
    return out


def listing(*args: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["history", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_finished_run_is_indexed(runs):
    rows = listing("--index", str(runs / "history.sqlite"))
    assert [r["audit"] for r in rows] == ["alpha", "alpha", "beta"]
    for row in rows:
        results = json.loads((runs.parent / row["run_dir"] / "results.json").read_text())
        assert row["report_id"] == results["audit"]["report_id"]
        assert row["verdict"] == results["verdict"] and row["model_sha256"] == results["fingerprints"]["model_sha256"]
        assert row["headline"]["clean_accuracy[none]"] == results["clean"]["none"]["clean_accuracy"]["value"]
        assert "robust_accuracy[none@2/255]" in row["headline"]
    assert [r["audit"] for r in listing("--index", str(runs / "history.sqlite"), "--audit", "beta")] == ["beta"]


def test_history_survives_deletion_and_rebuild(runs, tmp_path):
    before = listing("--index", str(runs / "history.sqlite"))
    index = tmp_path / "rebuilt.sqlite"
    assert listing("--index", str(index)) == []
    rebuilt = listing("--index", str(index), "--rebuild", str(runs))
    assert rebuilt == before
    # A run directory moved keeps its report id (the row follows it); one deleted leaves the index.
    shutil.copytree(runs, tmp_path / "moved")
    moved = listing("--index", str(index), "--rebuild", str(tmp_path / "moved"))
    assert [r["report_id"] for r in moved] == [r["report_id"] for r in before]
    assert all(r["run_dir"].startswith(str(tmp_path / "moved")) for r in moved)
    shutil.rmtree(moved[0]["run_dir"])
    kept = listing("--index", str(index), "--rebuild", str(tmp_path / "moved"))
    assert [r["report_id"] for r in kept] == [r["report_id"] for r in before[1:]]


def test_a_run_is_found_by_report_id_or_as_an_audits_latest(runs):
    index = runs / "history.sqlite"
    rows = history.runs(index)
    assert history.resolve_run(rows[0]["report_id"], index) == history.Path(rows[0]["run_dir"])
    assert history.resolve_run("latest:alpha", index) == history.Path(rows[1]["run_dir"])
    assert history.resolve_run(rows[2]["run_dir"], index) == history.Path(rows[2]["run_dir"])
    with pytest.raises(MedauditError, match="neither a finished run directory"):
        history.resolve_run("MA-000000000000", index)


def test_off_keeps_a_run_out_and_a_broken_index_is_a_warning(tmp_path):
    assert history.index_path(tmp_path, "off") is None
    assert history.index_path(tmp_path, "h.sqlite") == tmp_path / "h.sqlite"
    spec = tmp_path / "spec.yaml"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "history.sqlite").write_text("not a database")
    spec.write_text(spec_text(**TINY, runtime=f"runtime: {{device: cpu, output_dir: {tmp_path / 'runs'}}}"))
    result = CliRunner().invoke(cli, ["run", str(spec), "-q"])
    assert result.exit_code == 0, result.output  # the verdict stands; the run directory is the record
    assert "not in the audit history" in result.stderr and "--rebuild" in result.stderr
