"""The Ray executor gives the local executor's results: jobs sharded over two worker
processes of a local Ray cluster, a worker killed mid-job, a driver interrupted and resumed.

One small Ray cluster (2 CPUs) serves the module; it writes its session files under a
temporary folder that the fixture removes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import medaudit
from medaudit.audits.records import examples_path, features_path, record_path
from medaudit.core.errors import ExitCode
from medaudit.core.host import get_host
from medaudit.core.spec import load_spec
from medaudit.plugins.attacks.gradient import FGSM, FGSMParams
from tests.conftest import spec_text
from tests.helpers import StopAfter, run_audit

ROOT = Path(__file__).resolve().parents[2]
N, BATCH = 24, 8


class FragileParams(FGSMParams):
    marker: str = ""


class FragileFGSM(FGSM):
    """FGSM whose worker process dies (``os._exit``) the first time it attacks while the
    marker file does not exist; it creates the marker first, so the retry succeeds. Creating
    it is atomic (O_EXCL): when both workers attack at once, exactly one dies."""

    name = "fgsm-fragile"
    Params = FragileParams

    def perturb(self, model, x, y, **kwargs):
        try:
            Path(self.params.marker).touch(exist_ok=False)
        except FileExistsError:
            return super().perturb(model, x, y, **kwargs)
        os._exit(1)


class FragilePlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(FragileFGSM)


@pytest.fixture(scope="module")
def cluster(model_cache):
    """A local Ray cluster of 2 CPUs whose workers import this repository's tests (for the plugins above)."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="warning")
    yield ray
    ray.shutdown()
    mp.undo()
    shutil.rmtree(temp, ignore_errors=True)


def classification(base: Path, name: str, executor: str, marker: Path) -> str:
    path = base / f"{name}.yaml"
    path.write_text(spec_text(
        data=f"data:\n  dataset: phantom\n  params: {{n: {N}, size: 64, seed: 0}}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
        attacks=f"attacks:\n  - name: fgsm-fragile\n    params: {{marker: {marker}}}\n  - name: pgd\n    params: {{steps: 3}}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: {BATCH}\n  seed: 0\n  num_threads: 1\n  output_dir: {base / name}\n"
                f"  executor: {executor}\n  ray: {{num_workers: 2, shard_cases: {BATCH}}}",
    ), encoding="utf-8")
    return path


def outputs(outcome) -> dict[str, bytes]:
    """Every job's records, and its examples and features as tensors."""
    out = {}
    for job in outcome.results["jobs"]:
        out[f"{job['id']} records"] = record_path(outcome.run_dir, job["id"]).read_bytes()
        for kind, path in (("examples", examples_path), ("features", features_path)):
            if (p := path(outcome.run_dir, job["id"])).is_file():
                out[f"{job['id']} {kind}"] = {k: v.tolist() for k, v in torch.load(p, weights_only=True).items()}
    return out


def numbers(results: dict) -> dict:
    return {"clean": results["clean"], "rows": results["rows"], "acceptance": results["acceptance"]["criteria"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The classification audit run by the local executor (the marker exists: nothing dies)."""
    base = tmp_path_factory.mktemp("ray-cls")
    marker = base / "marker"
    marker.touch()
    host = get_host(load_entry_points=False, extra_plugins=[("fragile", FragilePlugin())])
    outcome = run_audit(load_spec(classification(base, "local", "local", marker), host), host)
    return {"base": base, "marker": marker, "outcome": outcome}


@pytest.mark.slow
def test_ray_gives_the_records_and_results_of_the_local_executor(cluster, local_run):
    host = get_host(load_entry_points=False, extra_plugins=[("fragile", FragilePlugin())])
    spec = load_spec(classification(local_run["base"], "ray", "ray", local_run["marker"]), host)
    local, sharded = local_run["outcome"], run_audit(spec, host)
    assert numbers(sharded.results) == numbers(local.results)
    assert outputs(sharded) == outputs(local)
    assert any(k.endswith("features") for k in outputs(local))  # features and examples are compared too
    env = sharded.results["environment"]
    assert env["executor"] == "ray" and env["cluster"]["num_workers"] == 2
    assert len({w["pid"] for w in env["cluster"]["workers"]}) == 2
    assert local.results["environment"]["executor"] == "local"
    assert [e["shards"] for e in sharded.results["timeline"] if e["event"] == "job"] == [N // BATCH] * 3


@pytest.mark.slow
def test_ray_runs_the_verdict_strategy_as_the_local_executor_does(cluster, tmp_path):
    """Each job is sharded over the workers with the cases carried over to it; the records match the local run's."""
    host = get_host(load_entry_points=False)
    runs = {}
    for executor in ("local", "ray"):
        path = tmp_path / f"{executor}.yaml"
        path.write_text(spec_text(
            data=f"data:\n  dataset: phantom\n  params: {{n: {N}, size: 64, seed: 0}}",
            threat_model="threat_model:\n  norm: linf\n  epsilons: [0.5/255, 2/255]",
            attacks="attacks:\n  - name: pgd\n    params: {steps: 3}\n  - name: fgsm",
            acceptance="acceptance:\n  criteria:\n    - {id: A, metric: perturbation_linf_max, attack: worst_case, "
                       "epsilon: 2/255, op: '<=', threshold: 0.5}",
            runtime=f"runtime:\n  device: cpu\n  batch_size: {BATCH}\n  seed: 0\n  num_threads: 1\n  strategy: verdict\n"
                    f"  output_dir: {tmp_path / executor}\n  executor: {executor}\n  ray: {{num_workers: 2, shard_cases: {BATCH}}}",
        ), encoding="utf-8")
        runs[executor] = run_audit(load_spec(path, host), host)
    local, sharded = runs["local"], runs["ray"]
    assert numbers(sharded.results) == numbers(local.results)
    assert sharded.results["strategy"]["carried"] == local.results["strategy"]["carried"]
    assert sharded.results["strategy"]["carried"]  # pgd ran after fgsm, on what fgsm left
    for job in local.results["jobs"]:
        assert record_path(sharded.run_dir, job["id"]).read_bytes() == record_path(local.run_dir, job["id"]).read_bytes()


@pytest.mark.slow
def test_a_worker_that_dies_mid_job_has_its_shard_retried(cluster, local_run):
    base = local_run["base"]
    marker = local_run["marker"]
    marker.unlink()  # the first worker to attack dies (and creates the marker again)
    host = get_host(load_entry_points=False, extra_plugins=[("fragile", FragilePlugin())])
    crashed = run_audit(load_spec(classification(base, "crash", "ray", marker), host), host)
    assert marker.exists()
    retries = [e for e in crashed.results["timeline"] if e["event"] == "retry"]
    assert len(retries) == 1 and retries[0]["detail"].startswith("worker died")
    assert retries[0]["shard"][1] - retries[0]["shard"][0] == BATCH
    assert numbers(crashed.results) == numbers(local_run["outcome"].results)
    assert outputs(crashed) == outputs(local_run["outcome"])


@pytest.mark.slow
def test_an_interrupted_ray_run_resumes_without_redoing_jobs(cluster, local_run):
    base = local_run["base"]
    stopper = StopAfter(1)
    host = get_host(load_entry_points=False, extra_plugins=[("fragile", FragilePlugin()), ("stopper", stopper)])
    spec = load_spec(classification(base, "stopped", "ray", local_run["marker"]), host)
    with pytest.raises(Exception) as info:
        run_audit(spec, host)
    assert info.value.exit_code == ExitCode.INTERRUPTED and "--resume" in str(info.value)
    [run_dir] = list((base / "stopped" / "tiny").iterdir())
    finished = {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl")}
    assert len(finished) == 1

    counter = StopAfter(-1)
    host = get_host(load_entry_points=False, extra_plugins=[("fragile", FragilePlugin()), ("counter", counter)])
    resumed = run_audit(load_spec(classification(base, "stopped", "ray", local_run["marker"]), host), host, run_dir)
    assert len(counter.seen) == 2 and not set(counter.seen) & {n.removesuffix(".jsonl") for n in finished}
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl") if p.name in finished} == finished
    assert numbers(resumed.results) == numbers(local_run["outcome"].results)
    assert outputs(resumed) == outputs(local_run["outcome"])


def segmentation(base: Path, executor: str) -> Path:
    path = base / f"{executor}.yaml"
    path.write_text(spec_text(
        task="task: segmentation",
        model="model:\n  loader: demo-unet\n  params: {dims: 2}",
        data="data:\n  dataset: phantom\n  params: {n: 8, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
        attacks="attacks:\n  - name: pgd\n    params: {steps: 2}",
        acceptance="acceptance:\n  criteria:\n    - {id: AC-01, metric: clean_dice, op: '>=', threshold: 0.5}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 2\n  seed: 0\n  num_threads: 1\n  output_dir: {base / executor}\n"
                f"  executor: {executor}\n  ray: {{num_workers: 2, shard_cases: 2}}",
    ), encoding="utf-8")
    return path


@pytest.mark.slow
def test_ray_gives_the_local_segmentation_results(cluster, tmp_path, host):
    local = run_audit(load_spec(segmentation(tmp_path, "local"), host), host)
    sharded = run_audit(load_spec(segmentation(tmp_path, "ray"), host), host)
    assert numbers(sharded.results) == numbers(local.results)
    assert outputs(sharded) == outputs(local)


@pytest.mark.slow
def test_out_of_memory_on_a_worker_halves_the_batch_and_gives_the_local_records(cluster, write_spec, tmp_path):
    """The worker's model has room for 8 inputs; the spec asks for 32. Each job's shards run
    again at the halved size until they fit, with the records of a local run at 8."""
    from tests.faults import test_out_of_memory as oom

    def audit(loader: str, batch_size: int, executor: str):
        return load_spec(write_spec(
            model=f"model:\n  loader: {loader}",
            data="data:\n  dataset: phantom\n  params: {n: 24, size: 64, seed: 0}",
            threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
            attacks="attacks:\n  - name: pgd\n    params: {steps: 2}",
            runtime=f"runtime:\n  device: cpu\n  batch_size: {batch_size}\n  num_threads: 1\n"
                    f"  output_dir: {tmp_path / executor}\n  executor: {executor}\n  ray: {{num_workers: 2, shard_cases: 8}}",
            name=f"{executor}.yaml"), oom.HOST)

    halved = run_audit(audit("cramped-demo", 32, "ray"), oom.HOST)
    assert [e["to"] for e in halved.results["timeline"] if e["event"] == "batch_size"] == [16, 8]
    assert {j["batch_size"] for j in halved.results["jobs"]} == {8}
    direct = run_audit(audit("demo", 8, "local"), oom.HOST)
    assert oom.records(halved) == oom.records(direct)
    [workers] = [e for e in halved.results["timeline"] if e["event"] == "workers"]
    assert sum(w["cases"] for w in workers["workers"]) == 2 * 24  # accepted shards only: clean and PGD, once each


@pytest.mark.slow
def test_a_model_that_raises_on_a_worker_is_named_as_the_source(cluster, tmp_path, host):
    from medaudit.core.errors import ModelRaised
    from tests.faults.test_faults_verdict import BatchLimitNet, spec

    path = spec(tmp_path, "BatchLimitNet")
    path.write_text(path.read_text().replace(
        "runtime: {device: cpu, batch_size: 16, seed: 0}",
        f"runtime: {{device: cpu, batch_size: 16, seed: 0, num_threads: 1, output_dir: {tmp_path / 'out'}, "
        "executor: ray, ray: {num_workers: 2}}"), encoding="utf-8")
    with pytest.raises(ModelRaised) as info:
        run_audit(load_spec(path, host), host)
    line = BatchLimitNet.forward.__code__.co_firstlineno + 2
    message = str(info.value)
    assert f"test_faults_verdict.py:{line} in forward" in message and "none: clean" in message, message
    assert "larger than the exported batch size 8" in message and "--resume" in message
    [run_dir] = [p.parent for p in (tmp_path / "out").rglob("timeline.jsonl")]
    events = [json.loads(e) for e in (run_dir / "timeline.jsonl").read_text().splitlines()]
    [error] = [e for e in events if e["event"] == "model_error"]
    assert error["job"].startswith("none.clean") and len(error["cases"]) == 16 and error["cases"][0] in message
    assert not list((run_dir / "records").glob("*.jsonl*"))


def test_executor_ray_without_ray_is_a_spec_error_with_the_install_hint(tmp_path):
    (tmp_path / "spec.yaml").write_text(spec_text(runtime="runtime:\n  device: cpu\n  executor: ray"), encoding="utf-8")
    code = ("import sys; sys.modules['ray'] = None\n"
            "from medaudit.core.host import get_host\nfrom medaudit.core.spec import load_spec\n"
            "from medaudit.core.errors import SpecError\n"
            "try:\n    load_spec(sys.argv[1], get_host(load_entry_points=False))\n"
            "except SpecError as exc:\n    print(exc)\nelse:\n    print('valid')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.yaml")], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert "runtime: executor ray needs Ray, which is not installed: pip install -e '.[ray]'" in done.stdout, done.stdout
