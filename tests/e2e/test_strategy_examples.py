"""The examples under runtime.strategy verdict give the verdict and the worst case of strategy
full: the same robust cases at every budget verdict ran, with the examples' own attacks
(random starts and score-based searches included), models and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medaudit.audits.records import read_records
from medaudit.cli import cli

EXAMPLES = Path(__file__).parents[2] / "examples"


def _run(tmp_path: Path, example: str, strategy: str) -> tuple[Path, dict]:
    spec = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text(encoding="utf-8"))
    spec.setdefault("runtime", {})["strategy"] = strategy
    spec.setdefault("report", {})["figures"] = []  # the figures do not change a number
    path = tmp_path / f"{example}-{strategy}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    run_dir = tmp_path / f"{example}-{strategy}"
    result = CliRunner().invoke(cli, ["run", str(path), "--run-dir", str(run_dir), "-q"])
    assert (run_dir / "results.json").is_file(), result.output
    return run_dir, json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


def _robust(run_dir: Path, results: dict, eps: float) -> set[str]:
    jobs = [j for j in results["jobs"] if j["attack"] != "clean" and not j.get("budget") and "skipped" not in j
            and abs(j["epsilon"] - eps) < 1e-12]
    return set.intersection(*({r["case"] for r in read_records(run_dir, j["id"]) if r["adv_correct"]} for j in jobs))


@pytest.mark.slow
@pytest.mark.parametrize("example", ["demo", "attacks"])
def test_the_verdict_strategy_gives_the_examples_full_verdict_and_worst_case(tmp_path, example):
    full_dir, full = _run(tmp_path, example, "full")
    verdict_dir, verdict = _run(tmp_path, example, "verdict")
    assert verdict["verdict"] == full["verdict"]
    judged = {c["id"]: c for c in verdict["acceptance"]["criteria"]}
    for c in full["acceptance"]["criteria"]:
        if c["severity"] == "blocking":
            assert judged[c["id"]]["verdict"] == c["verdict"] and judged[c["id"]]["estimate"] == c["estimate"], c["id"]
    ran = {r["epsilon"] for r in verdict["rows"] if r["attack"] == "worst_case"}
    assert ran
    for eps in ran:
        assert _robust(verdict_dir, verdict, eps) == _robust(full_dir, full, eps), eps
    done = [j for j in verdict["jobs"] if "skipped" not in j and j["attack"] != "clean"]
    attacked = {name: sum(r["attacked"] and not r.get("carried") for j in jobs for r in read_records(d, j["id"]))
                for name, d, jobs in (("full", full_dir, [j for j in full["jobs"] if j["attack"] != "clean"]),
                                      ("verdict", verdict_dir, done))}
    assert attacked["verdict"] < attacked["full"]
