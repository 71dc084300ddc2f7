"""``medaudit run SPEC --dry-run``: the plan of every job with its cases and estimated passes and
time, from a probe of each attack, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from medaudit.audits.dryrun import PassCounter
from medaudit.audits.plan import plan_jobs
from medaudit.cli import cli
from medaudit.core.spec import load_spec
from tests.conftest import spec_text

#: A small demo classifier and data (32 px), a gradient attack of known cost and a defense with an adaptive view.
SECTIONS = {
    "model": "model:\n  loader: demo\n  params: {image_size: 32, train_size: 128, epochs: 2}",
    "data": "data:\n  dataset: phantom\n  params: {n: 12, size: 32, seed: 0}",
    "attacks": "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 5}",
    "defenses": "defenses:\n  - name: bit-depth",
}


@pytest.fixture
def spec_path(tmp_path):
    path = tmp_path / "audit.yaml"
    runtime = f"runtime:\n  device: cpu\n  batch_size: 8\n  seed: 0\n  output_dir: {tmp_path / 'runs'}"
    path.write_text(spec_text(**SECTIONS, runtime=runtime), encoding="utf-8")
    return path


def listing(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_dry_run_lists_every_job_and_writes_nothing(spec_path, host):
    before = listing(spec_path.parent)
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert listing(spec_path.parent) == before  # no run directory, no output folder
    rows = [line.split() for line in result.output.splitlines()]
    jobs = plan_jobs(load_spec(spec_path, host), host)
    assert len(jobs) == 2 * (1 + 2 * 3) + 2 * 3  # per model: clean + 2 attacks x 3 epsilons; bit-depth's adaptive views
    for job in jobs:
        assert [job.defense, job.view, job.attack, job.epsilon_label] in [row[:4] for row in rows], job.title()
    assert any("estimate" in line for line in result.output.splitlines()[-5:])


def test_dry_run_json_estimates_passes_from_the_probe(spec_path, host):
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [j["id"] for j in plan["jobs"]] == [j.id for j in plan_jobs(load_spec(spec_path, host), host)]
    assert not (spec_path.parent / "runs").exists()
    by_attack = {}
    for j in plan["jobs"]:
        by_attack.setdefault((j["defense"], j["attack"]), []).append(j)
    [clean] = by_attack[("none", "clean")]
    assert clean["basis"] == "measured" and clean["forward"] == clean["cases"] == 12 and clean["backward"] == 0
    for j in by_attack[("none", "pgd")]:
        # Only the cases the model gets right are attacked; 5 steps: one forward and one backward pass each.
        assert 0 < j["cases"] <= 12 and j["basis"] == "estimate" and j["seconds"] > 0
        assert 5 / 2 <= j["forward"] / j["cases"] <= 6 * 2
        assert 5 / 2 <= j["backward"] / j["cases"] <= 6 * 2
    for j in by_attack[("none", "fgsm")]:
        assert j["backward"] / j["cases"] == pytest.approx(1, abs=0.5)  # a single gradient
    total = plan["total"]
    assert total["jobs"] == len(plan["jobs"]) and total["forward"] == pytest.approx(sum(j["forward"] for j in plan["jobs"]))


def test_json_needs_dry_run(spec_path):
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--json"])
    assert result.exit_code == 4 and "--json only applies with --dry-run" in result.output


def test_pass_counter_counts_forward_and_backward_samples():
    counter = PassCounter(torch.nn.Linear(3, 2))
    with torch.no_grad():
        counter(torch.zeros(4, 3))
    assert (counter.samples, counter.backward_samples) == (4, 0)
    x = torch.zeros(5, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(counter(x).sum(), x)
    assert (counter.samples, counter.backward_samples) == (9, 5)
