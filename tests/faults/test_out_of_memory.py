"""Fault list row 16, GPU out of memory: the batch is halved and the job run again, down to
1; at 1 the run stops, resumable, with advice. Injected on the CPU by a model that raises
``torch.cuda.OutOfMemoryError`` on batches larger than a limit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import medaudit
from medaudit.audits.records import record_path
from medaudit.core.components import ModelLoader, Params
from medaudit.core.errors import ExitCode, OutOfMemory
from medaudit.core.host import get_host
from medaudit.core.spec import load_spec
from tests.helpers import run_audit

#: Largest batch the injected model accepts, and when gradients are on (an attack), changed by the tests.
LIMIT = {"batch": 8, "gradients": 8}


class Cramped(torch.nn.Module):
    """The demo model on a device with room for ``LIMIT["batch"]`` inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if len(x) > LIMIT["gradients" if torch.is_grad_enabled() else "batch"]:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {len(x)} inputs)")
        return self.inner(x)


class CrampedLoader(ModelLoader):
    name = "cramped-demo"
    Params = Params

    def load(self, task):
        demo = get_host(load_entry_points=False).get("model", "demo")()
        model = demo.load(task)
        return dataclasses.replace(model, module=Cramped(model.module).eval())


class Plugin:
    @medaudit.hookimpl
    def register_models(self, register):
        register(CrampedLoader)


HOST = get_host(load_entry_points=False, extra_plugins=[("cramped", Plugin())])


def spec(write_spec, tmp_path, loader: str, batch_size: int, name: str):
    return load_spec(write_spec(
        model=f"model:\n  loader: {loader}",
        data="data:\n  dataset: phantom\n  params: {n: 24, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
        attacks="attacks:\n  - name: pgd\n    params: {steps: 2}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: {batch_size}\n  output_dir: {tmp_path / name}",
        name=f"{name}.yaml"), HOST)


def records(outcome) -> dict[str, list]:
    return {j["title"]: record_path(outcome.run_dir, j["id"]).read_text().splitlines() for j in outcome.results["jobs"]}


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_and_gives_the_records_of_that_batch_size(write_spec, tmp_path, monkeypatch):
    monkeypatch.setitem(LIMIT, "batch", 8)
    monkeypatch.setitem(LIMIT, "gradients", 8)
    halved = run_audit(spec(write_spec, tmp_path, "cramped-demo", 32, "halved"), HOST)
    changes = [e for e in halved.results["timeline"] if e["event"] == "batch_size"]
    assert [e["to"] for e in changes] == [16, 8]  # once, in the first job; later jobs start at 8
    assert "batch size 32 -> 16: out of memory in job none: clean" == changes[0]["detail"]
    assert {j["batch_size"] for j in halved.results["jobs"]} == {8}
    direct = run_audit(spec(write_spec, tmp_path, "demo", 8, "direct"), HOST)
    assert records(halved) == records(direct)  # per-batch seeds: the same as a run at 8 from the start
    report = (halved.run_dir / "report.html").read_text(encoding="utf-8")
    assert "batch size 16 -&gt; 8: out of memory" in report


@pytest.mark.slow
def test_out_of_memory_at_batch_one_stops_resumable_with_advice(write_spec, tmp_path, monkeypatch):
    audit = spec(write_spec, tmp_path, "cramped-demo", 4, "stuck")
    monkeypatch.setitem(LIMIT, "gradients", 0)  # the model loads and the clean job runs; PGD never fits
    with pytest.raises(OutOfMemory) as err:
        run_audit(audit, HOST)
    assert err.value.exit_code == ExitCode.INTERNAL_ERROR
    message = str(err.value)
    assert "at batch size 1 in job 'none: pgd eps=2/255'" in message and "--resume" in message
    [run_dir] = [p for p in (tmp_path / "stuck").rglob("fingerprints.json")]
    timeline = [json.loads(line) for line in (run_dir.parent / "timeline.jsonl").read_text().splitlines()]
    assert [e["to"] for e in timeline if e["event"] == "batch_size"] == [2, 1]
    monkeypatch.setitem(LIMIT, "gradients", 1)  # the GPU was freed: resume at the batch size the run reached
    resumed = run_audit(audit, HOST, run_dir.parent)
    assert resumed.exit_code in (ExitCode.PASS, ExitCode.FAIL)
    assert all(len(lines) == 24 for lines in records(resumed).values())
