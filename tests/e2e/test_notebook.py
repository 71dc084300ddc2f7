"""The README's notebook example (examples/notebook.py) runs as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[2] / "examples" / "notebook.py"


@pytest.mark.slow
def test_notebook_example_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(NOTEBOOK)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdict=PASS" in done.stdout, done.stdout
    [results] = list((tmp_path / "runs" / "notebook-example").glob("*/results.json"))
    results = json.loads(results.read_text())
    assert results["model"]["loader"] == "in-memory" and results["clean"]["none"]["clean_accuracy"]["value"] >= 0.9
    assert (tmp_path / "runs" / "history.sqlite").is_file()
