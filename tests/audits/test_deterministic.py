"""``runtime.deterministic``: deterministic algorithms and cuBLAS's workspace are set before
any tensor work, recorded in environment.json, and the report says what that promises."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medaudit.core.environment import CUBLAS_WORKSPACE
from medaudit.core.spec import load_spec
from tests.helpers import run_audit


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_mode_is_set_recorded_and_explained(deterministic, write_spec, tmp_path, host, restore_determinism):
    torch.use_deterministic_algorithms(not deterministic)  # the spec decides, whatever the process had
    spec = load_spec(write_spec(
        data="data:\n  dataset: phantom\n  params: {n: 8, size: 64, seed: 0}",
        attacks="attacks:\n  - name: fgsm", threat_model="threat_model:\n  norm: linf\n  epsilons: [1/255]",
        runtime=f"runtime:\n  device: cpu\n  deterministic: {str(deterministic).lower()}\n  output_dir: {tmp_path}"), host)
    outcome = run_audit(spec, host)
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    environment = json.loads((outcome.run_dir / "environment.json").read_text())
    assert environment["deterministic_algorithms"] is deterministic
    assert environment["cublas_workspace_config"] == (CUBLAS_WORKSPACE if deterministic else os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    report = (outcome.run_dir / "report.html").read_text(encoding="utf-8")
    assert ("Deterministic algorithms were on" in report) is deterministic
    assert ("Deterministic algorithms were off" in report) is not deterministic
