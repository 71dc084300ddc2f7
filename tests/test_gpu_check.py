"""The GPU device check (benchmarks/gpu/run.sh) runs end to end as its CPU smoke run.

A GPU machine may be available for minutes only, without a package index: the check has
to work the first time there, so every step is exercised here at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--device", "cpu", "--small"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert (tmp_path / "gpu-check.log").read_text().count("== ") >= 4

    steps = report["steps"]
    assert set(steps) == {"install", "pytest", "pgd", "e2e"}
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        if step["status"] == "skipped":
            assert step["reason"], name
    assert steps["install"]["status"] == "skipped"  # the CPU smoke run uses this environment

    pgd = steps["pgd"]["results"]
    assert pgd["weights"] == "random-init, timing only"
    names = [case["name"] for case in pgd["cases"]]
    assert any("fp32 pgd-2" in n for n in names) and any("bf16 pgd-4" in n for n in names)
    assert any("3D U-Net" in n for n in names)
    for case in pgd["cases"]:
        assert case["pgd_over_floor"] > 0, case
        assert case["ours"]["wall_s"] > 0 and case["floor"]["wall_s"] > 0
        assert case.get("art_over_ours", 1) > 0
    assert report["summary"]["pgd_over_floor"] == {case["name"]: case["pgd_over_floor"] for case in pgd["cases"]}

    e2e = steps["e2e"]["results"]
    assert e2e["finished"] and e2e["verdict"] == "NOT ASSESSED"
    assert e2e["timeline"]["jobs_finished"] == 1 + 2 * 5  # clean, then two attacks at five budgets
    assert set(e2e["timeline"]["seconds_by_attack"]) == {"clean", "pgd", "autoattack"}
    assert report["environment"]["torch"] and report["environment"]["device_name"] == "cpu"
    assert "autoattack_vs_fra31" in report["not_prepared"]
