"""The Ray executor: an audit's jobs sharded over worker processes (GPUs, a cluster).

Each worker is a Ray actor that opens its own :class:`Session` once, from the resolved spec
and the defense and attack state the driver fitted and exported (restored, never fitted
again), and then runs shards: one job on a range of cases starting at a multiple of the
batch size, so the per-batch seeds, and so the records, are those of the local executor.
Workers read their cases themselves and return records and the first batch's example
tensors; only the driver writes the run directory, committing each job's records atomically
as the local executor does, so resume and the report work the same. A shard whose worker
died runs again on a new worker, and the timeline records the retry.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medaudit.audits import rundir
from medaudit.audits.execute import Session, Sink, execute, model_frame
from medaudit.audits.records import (
    EXAMPLE_CASES, FEATURE_CASES, RecordWriter, is_done, read_records, save_examples, save_features,
)
from medaudit.core.environment import describe_environment
from medaudit.core.errors import EnvironmentProblem, MedauditError
from medaudit.core.jobs import Job, Records
from medaudit.core.probes import FeatureTap

if TYPE_CHECKING:
    from medaudit.audits.runner import Runner

#: Times one shard runs again after its worker died before the audit stops.
MAX_RETRIES = 3
#: What every worker must share with the driver: other versions would mix other numbers into one report.
PINNED_PACKAGES = ("medaudit", "torch")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Cases ``[start, stop)`` of one job, run at ``batch_size`` (a job's shards share one
    size: after an out-of-memory error every shard of the job runs again at the new size)."""

    job: Job
    start: int
    stop: int
    batch_size: int


def case_ranges(n: int, batch_size: int, shard_cases: int) -> list[tuple[int, int]]:
    """Split ``n`` cases into ranges of ``shard_cases`` rounded up to whole batches, so every
    range starts where a batch of the local executor starts."""
    size = -(-shard_cases // batch_size) * batch_size
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class CollectingSink(Sink):
    """What :class:`~medaudit.audits.runner.RunSink` writes, kept for the driver: the first
    batch's example tensors and the penultimate features of the first cases."""

    def __init__(self, features: bool, examples: bool):
        self.features, self.keep_examples = features, examples
        self.tap: FeatureTap | None = None
        self.examples: tuple | None = None
        self.start = 0  # the first case of the batch running now


    def scoring(self, job, model, positions):
        if not self.features:
            return super().scoring(job, model, positions)
        self.tap = self.tap or FeatureTap(model, FEATURE_CASES)
        return self.tap.capture(positions)

    def batch(self, job, batch_start, x, shown, y, pred, clean_pred, target) -> None:
        if batch_start == 0 and self.keep_examples:
            self.examples = tuple(None if t is None else t[:EXAMPLE_CASES].detach().cpu().clone()
                                  for t in (x, shown, y, pred, target, clean_pred))
        self.start = batch_start + len(x)


class ShardWorker:
    """One worker process (a Ray actor): loads model and data once, then runs shards."""

    def __init__(self, spec_dict: dict, base_dir: str, states: dict[str, bytes], plugins: list, entry_points: bool):
        from medaudit.core.host import get_host

        host = get_host(load_entry_points=entry_points, extra_plugins=plugins)
        with tempfile.TemporaryDirectory(prefix="medaudit-worker-") as tmp:  # outputs never go to a shared folder
            for name, data in states.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            self.session = Session.open(spec_dict, base_dir, tmp, host)
        self.features = self.session.protocol.keeps_features
        self.examples = not self.session.data.pixels_may_identify

    def describe(self) -> dict[str, Any]:
        import ray

        return {"host": platform.node(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], **describe_environment(self.session.device)}

    def run(self, shard: Shard, clean: list[dict] | None, carried: list[dict | None] | None = None) -> dict[str, Any]:
        """The shard's records and side outputs; out of GPU memory, or an exception raised in
        the audited model's own code, the answer says so instead (the driver decides: a
        smaller batch, or a stop that names the model and the batch's cases)."""
        sink = CollectingSink(self.features, self.examples and shard.start == 0)
        sink.start = shard.start
        started = time.perf_counter()
        try:
            records = execute(self.session, shard.job, shard.start, shard.stop, clean, sink, shard.batch_size, carried)
        except torch.cuda.OutOfMemoryError as exc:
            if self.session.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"out_of_memory": _first_line(exc)}
        except Exception as exc:
            if (frame := model_frame(self.session.model.module, exc)) is None:
                raise
            cases = self.session.data.case_ids[sink.start : min(sink.start + shard.batch_size, shard.stop)]
            return {"model_error": {"error": type(exc).__name__, "message": _first_line(exc), "frame": frame,
                                    "cases": list(cases)}}
        return {"rows": list(records), "facets": sorted(f.value for f in records.facets), "examples": sink.examples,
                "features": sink.tap.result() if sink.tap is not None else None,
                "seconds": time.perf_counter() - started, "pid": os.getpid()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayPool:
    """The driver's side: the workers, the shards they run and what the driver commits."""

    def __init__(self, runner: Runner):
        import ray

        self.ray, self.runner = ray, runner
        self.options = runner.spec.runtime.ray
        self.owns_cluster = False
        self.actors: list = []
        self.dashboard_url: str | None = None

    @classmethod
    def start(cls, runner: Runner) -> RayPool:
        """Join or start the cluster, start the workers and check their versions."""
        pool = cls(runner)
        try:
            pool._start()
        except BaseException:
            pool.close()
            raise
        return pool

    def _start(self) -> None:
        ray, runner, options = self.ray, self.runner, self.options
        if not ray.is_initialized():
            context = ray.init(address=options.address, logging_level=logging.WARNING)
            self.owns_cluster = True
            self.dashboard_url = getattr(context, "dashboard_url", None) or None
        resources = ray.cluster_resources()
        self.gpus = options.gpus_per_worker
        if self.gpus is None:
            self.gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        cpus = options.cpus_per_worker
        if options.num_workers is not None:
            workers = options.num_workers
        elif self.gpus > 0:
            workers = int(resources.get("GPU", 0) // self.gpus)
        else:
            workers = int(resources.get("CPU", 1) // cpus) if cpus > 0 else int(resources.get("CPU", 1))
        bs, n = runner.spec.runtime.batch_size, len(runner.data)
        batches = -(-n // bs)
        most = len(runner.jobs) * len(case_ranges(n, bs, options.shard_cases or bs))
        self.num_workers = max(1, min(workers, most, batches * len(runner.jobs)))
        with tempfile.TemporaryDirectory(prefix="medaudit-states-") as tmp:  # fitted state, sent to every worker
            runner.session.save_states(Path(tmp))
            states = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        host = runner.host
        plugins = [(name, host.pm.get_plugin(name)) for name, info in host.plugins.items()
                   if not info.builtin and info.distribution is None]
        entry_points = any(not info.builtin and info.distribution is not None for info in host.plugins.values())
        self.actor_args = (runner.spec.model_dump(mode="json"), os.getcwd(), ray.put(states), plugins, entry_points)
        self.worker_class = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=self.gpus, max_restarts=0)
        begun = time.perf_counter()
        self.actors = [self._new_actor() for _ in range(self.num_workers)]
        try:
            self.workers = ray.get([a.describe.remote() for a in self.actors])
            self.startup_seconds = time.perf_counter() - begun  # a process each, importing torch, opening the session
        except ray.exceptions.RayError as exc:
            raise MedauditError(f"a Ray worker could not start: {_first_line(exc)}") from None
        self._check_versions()
        if self.dashboard_url:
            runner.console.print(f"Ray dashboard: http://{self.dashboard_url}")

    def _new_actor(self):
        return self.worker_class.remote(*self.actor_args)

    def _check_versions(self) -> None:
        """Refuse workers whose Python, torch or medaudit differ from the driver's."""
        mine = describe_environment(self.runner.device)
        problems = []
        for w in self.workers:
            theirs = {"python": w["python"], **{p: w["packages"].get(p) for p in PINNED_PACKAGES}}
            ours = {"python": mine["python"], **{p: mine["packages"].get(p) for p in PINNED_PACKAGES}}
            problems += [f"{w['host']} (pid {w['pid']}): {k} {theirs[k]} (driver: {ours[k]})"
                         for k in ours if theirs[k] != ours[k]]
        if problems:
            raise EnvironmentProblem("Ray workers run other versions than this process, and their numbers would be "
                                     "mixed into one report: " + "; ".join(problems) + ". Install the same versions "
                                     "on every node")

    def describe(self) -> dict[str, Any]:
        """The cluster as environment.json and the timeline record it."""
        resources = self.ray.cluster_resources()
        return {
            "address": self.options.address,
            "nodes": sum(1 for node in self.ray.nodes() if node.get("Alive")),
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
            "num_workers": self.num_workers,
            "gpus_per_worker": self.gpus,
            "cpus_per_worker": self.options.cpus_per_worker,
            "workers": [{k: w[k] for k in ("host", "node_id", "pid", "gpu_ids", "device", "python", "packages")}
                        for w in self.workers],
        }

    def shard_cases(self, n: int, batch_size: int) -> int:
        """Cases per shard: the spec's, or enough for two shards of each job per worker."""
        return self.options.shard_cases or -(-n // (2 * self.num_workers))

    def close(self) -> None:
        """Stop the workers, and the cluster if this process started it."""
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.owns_cluster and self.ray.is_initialized():
            self.ray.shutdown()
            self.owns_cluster = False

    # -- running ------------------------------------------------------------------------

    def run(self, todo: list[Job], progress, overall, carried: dict[str, list[dict | None]] | None = None) -> None:
        """Run the unfinished jobs: clean jobs first, each attack job once its clean job is
        committed; commit each job when its last shard is back and fire ``job_finished``.
        ``carried``: per job id, the cases carried over (``runtime.strategy: verdict``)."""
        ray, runner = self.ray, self.runner
        run_dir, n = runner.run_dir, len(runner.data)
        first = case_ranges(n, runner.batch_size, self.shard_cases(n, runner.batch_size))
        cluster = self.describe()
        rundir.log_event(run_dir, event="executor", executor="ray", cluster=cluster, startup_seconds=self.startup_seconds,
                         detail=f"ray: {cluster['num_workers']} workers on {cluster['nodes']} node(s) started in "
                                f"{self.startup_seconds:.1f} s, {len(first)} shards per job of up to "
                                f"{first[0][1] - first[0][0]} cases")
        waiting = [job for job in todo if not job.is_clean]
        ready: deque[Shard] = deque()
        clean: dict[str, Records] = {}
        parts: dict[str, dict[int, dict]] = {}
        sizes: dict[str, int] = {}  # the batch size each job's shards run at now
        started: dict[str, float] = {}
        retries: dict[tuple[str, int], int] = {}  # by (job id, first case)
        bar = progress.add_task(f"  cases ({self.num_workers} Ray workers)", total=n * len(todo))

        def queue(job: Job) -> None:
            """Queue every shard of ``job`` at the run's batch size (again, after out of memory)."""
            bs = sizes[job.id] = runner.batch_size
            ready.extend(Shard(job, a, b, bs) for a, b in case_ranges(n, bs, self.shard_cases(n, bs)))

        def release() -> None:
            """Queue the shards of the attack jobs whose clean job is done."""
            for job in list(waiting):
                clean_job = next(j for j in runner.jobs if j.defense == job.defense and j.is_clean)
                if is_done(run_dir, clean_job.id):
                    if job.defense not in clean:
                        clean[job.defense] = read_records(run_dir, clean_job.id)
                    queue(job)
                    waiting.remove(job)

        for job in todo:
            if job.is_clean:
                queue(job)
        release()
        inflight: dict[Any, tuple[int, Shard]] = {}
        idle = list(range(len(self.actors)))
        throughput = {w: [0, 0.0] for w in idle}  # cases and seconds per worker
        try:
            while ready or inflight:
                while ready and idle:
                    shard, w = ready.popleft(), idle.pop(0)
                    rows = None if shard.job.is_clean else clean[shard.job.defense][shard.start : shard.stop]
                    taken = (carried or {}).get(shard.job.id)
                    started.setdefault(shard.job.id, time.perf_counter())
                    inflight[self.actors[w].run.remote(
                        shard, rows, None if taken is None else taken[shard.start : shard.stop])] = (w, shard)
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                w, shard = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    self._retry(w, shard, exc, retries)
                    if shard.batch_size == sizes[shard.job.id]:  # else the job already started again
                        ready.appendleft(shard)
                    idle.append(w)
                    continue
                except ray.exceptions.RayTaskError as exc:  # the job itself failed: as in the local executor
                    raise exc.cause if isinstance(exc.cause, Exception) else exc from None
                idle.append(w)
                job = shard.job
                if shard.batch_size != sizes[job.id]:  # from before the job started again at a smaller batch
                    continue
                if "model_error" in result:
                    error = result["model_error"]
                    runner._model_raised(job, error["error"], error["message"], error["frame"], error["cases"])
                if "out_of_memory" in result:
                    if runner.batch_size == shard.batch_size:  # not halved yet for another job's shard
                        runner._halve_batch(job, torch.cuda.OutOfMemoryError(result["out_of_memory"]))
                    lost = parts.pop(job.id, {})
                    progress.advance(bar, -sum(part["stop"] - start for start, part in lost.items()))
                    for stale in [s for s in ready if s.job.id == job.id]:
                        ready.remove(stale)
                    queue(job)
                    continue
                cases = shard.stop - shard.start
                progress.advance(bar, cases)
                throughput[w][0] += cases
                throughput[w][1] += result["seconds"]
                progress.update(bar, description=f"  cases ({self.num_workers} Ray workers: " + ", ".join(
                    f"{c / t:.1f}/s" if t else "idle" for c, t in throughput.values()) + ")")
                done = parts.setdefault(job.id, {})
                done[shard.start] = {**result, "stop": shard.stop}
                if sum(part["stop"] - start for start, part in done.items()) == n:
                    summary = self._commit(job, parts.pop(job.id), started.pop(job.id), shard.batch_size)
                    progress.advance(overall)
                    runner.host.pm.hook.job_finished(job=job, summary=summary, run_dir=run_dir)
                    release()
            self._log_throughput(throughput)
        finally:
            progress.remove_task(bar)
    def _retry(self, w: int, shard: Shard, exc: Exception, retries: dict[tuple[str, int], int]) -> None:
        """A worker died: log the retry, replace the worker; stop after :data:`MAX_RETRIES`."""
        key = (shard.job.id, shard.start)
        retries[key] = attempt = retries.get(key, 0) + 1
        detail = f"worker died: {_first_line(exc)}"
        rundir.log_event(self.runner.run_dir, event="retry", job=shard.job.id, shard=[shard.start, shard.stop],
                         attempt=attempt, detail=detail)
        if attempt > MAX_RETRIES:
            raise MedauditError(f"cases {shard.start}-{shard.stop} of job {shard.job.title()!r} lost their Ray worker "
                                f"{attempt} times ({detail}); resume with: medaudit run SPEC --resume "
                                f"{self.runner.run_dir}")
        self.runner.console.print(f"[yellow]{detail}; running cases {shard.start}-{shard.stop} of "
                                  f"{shard.job.title()} on a new worker[/yellow]")
        try:
            self.ray.kill(self.actors[w])
        except Exception:  # already gone
            pass
        self.actors[w] = self._new_actor()

    def _log_throughput(self, throughput: dict[int, list]) -> None:
        """Cases per second of each worker over the run, for the timeline and the report."""
        workers = [{"worker": w + 1, "host": self.workers[w]["host"], "cases": cases, "seconds": round(seconds, 3)}
                   for w, (cases, seconds) in throughput.items()]
        shown = ", ".join(f"{w['worker']} ({w['host']}) {w['cases'] / w['seconds']:.1f} cases/s" if w["seconds"] else
                          f"{w['worker']} ({w['host']}) idle" for w in workers)
        rundir.log_event(self.runner.run_dir, event="workers", workers=workers, detail=f"ray workers: {shown}")

    def _commit(self, job: Job, parts: dict[int, dict], started: float, batch_size: int) -> dict[str, Any]:
        """Write a job's records in case order with its examples and features, as the local executor does."""
        runner, run_dir = self.runner, self.runner.run_dir
        ordered = [parts[start] for start in sorted(parts)]
        records = Records([row for part in ordered for row in part["rows"]],
                          {f for part in ordered for f in part["facets"]})
        writer = RecordWriter(run_dir, job.id)
        try:
            writer.write(records)
            if (examples := ordered[0]["examples"]) is not None:
                x, shown, y, pred, target, clean_pred = examples
                save_examples(run_dir, job.id, x, shown, y, pred, target, clean_pred=clean_pred)
            features = [part["features"] for part in ordered if part["features"] is not None]
            if features:  # each shard tapped its own first cases: keep the job's first FEATURE_CASES, as locally
                positions = torch.cat([f[0] for f in features])[:FEATURE_CASES]
                vectors = torch.cat([f[1] for f in features])[:FEATURE_CASES]
                save_features(run_dir, job.id, positions, vectors, runner.data.labels[positions])
        except BaseException:
            writer.discard()
            raise
        writer.commit(records.facets)
        seconds = time.perf_counter() - started
        rundir.log_event(run_dir, event="job", job=job.id, seconds=round(seconds, 3), batch_size=batch_size,
                         executor="ray", shards=len(ordered), worker_seconds=round(sum(p["seconds"] for p in ordered), 3))
        return {"job": job.id, "seconds": seconds, **runner._job_metrics(job, records)}
