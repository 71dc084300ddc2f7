"""Throughput of the Ray executor against the local one on the same attack job.

    python benchmarks/ray_executor.py [--reps 2] [--n 256] [--steps 10]

One PGD job on the demo model and the phantom data (plus its clean job), run by the local
executor, by Ray with 1 worker and by Ray with 2 workers, in interleaved repetitions on a
local Ray cluster of this machine's CPUs. Every run uses one torch thread per process, so
Ray-1 and local do the same work in one process and the ratio Ray-1 / local is the
executor's overhead (goal: under 10 %); Ray-2 / Ray-1 is what a second worker buys.
The run's wall time also pays the workers' start once (a new process each, importing torch
and opening the session; ``startup_seconds`` of the timeline's ``executor`` event), which a
long audit amortises: the benchmark prints the ratio with and without it.
Timings: the PGD job's wall time from the timeline (``job`` event: from the first shard
sent to the records committed) and the driver's wall and CPU time for the whole run
(workers' CPU time is not included; the local run's model loading is).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = """\
audit: {{name: ray-bench}}
model: {{loader: demo}}
data: {{dataset: phantom, params: {{n: {n}, size: 64, seed: 0}}}}
threat_model: {{norm: linf, epsilons: [2/255]}}
attacks: [{{name: pgd, params: {{steps: {steps}}}}}]
runtime:
  device: cpu
  batch_size: 32
  seed: 0
  num_threads: 1
  output_dir: {out}
  executor: {executor}
  ray: {{num_workers: {workers}}}
"""


def run_once(base: Path, name: str, executor: str, workers: int, n: int, steps: int) -> dict:
    from medaudit.audits.runner import Runner
    from medaudit.core.host import get_host
    from medaudit.core.spec import load_spec

    path = base / f"{name}.yaml"
    path.write_text(SPEC.format(n=n, steps=steps, out=base / name, executor=executor, workers=workers), encoding="utf-8")
    host = get_host(load_entry_points=False)
    spec = load_spec(path, host)
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = Runner(spec, host, show_progress=False).run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pgd = next(j for j in outcome.results["jobs"] if j["attack"] == "pgd")
    row = next(r for r in outcome.results["rows"] if r["attack"] == "pgd")
    startup = next((e["startup_seconds"] for e in outcome.results["timeline"] if e["event"] == "executor"), 0.0)
    shutil.rmtree(base / name)
    return {"job": pgd["seconds"], "wall": wall, "cpu": cpu, "startup": startup, "row": row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    base = Path(tempfile.mkdtemp(prefix="medaudit-ray-bench-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=temp, logging_level="warning")
    modes = {"local": ("local", 1), "ray-1": ("ray", 1), "ray-2": ("ray", 2)}
    times: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        run_once(base, "warm", "local", 1, args.n, 1)  # trains or loads the demo model once
        for rep in range(args.reps):
            for mode, (executor, workers) in modes.items():
                times[mode].append(run_once(base, f"{mode}-{rep}", executor, workers, args.n, args.steps))
                t = times[mode][-1]
                print(f"rep {rep} {mode:6s} pgd job {t['job']:7.2f} s  run wall {t['wall']:7.2f} s  "
                      f"driver cpu {t['cpu']:7.2f} s  worker start {t['startup']:5.2f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    rows = {mode: [t["row"] for t in ts] for mode, ts in times.items()}
    same = all(r == rows["local"][0] for rs in rows.values() for r in rs)
    med = {mode: {k: statistics.median(t[k] for t in ts) for k in ("job", "wall", "cpu", "startup")}
           for mode, ts in times.items()}
    print(f"\nmedians over {args.reps} reps (n={args.n}, pgd steps={args.steps}, batch 32, 1 torch thread per process, "
          f"{os.cpu_count()} CPUs):")
    for mode, m in med.items():
        print(f"  {mode:6s} pgd job {m['job']:7.2f} s  run wall {m['wall']:7.2f} s  driver cpu {m['cpu']:7.2f} s  "
              f"worker start {m['startup']:5.2f} s")
    print(f"  ray-1 / local: pgd job {med['ray-1']['job'] / med['local']['job']:.3f}, "
          f"run wall {med['ray-1']['wall'] / med['local']['wall']:.3f}, run wall less worker start "
          f"{(med['ray-1']['wall'] - med['ray-1']['startup']) / med['local']['wall']:.3f}")
    print(f"  ray-2 / ray-1: pgd job {med['ray-2']['job'] / med['ray-1']['job']:.3f}, "
          f"run wall {med['ray-2']['wall'] / med['ray-1']['wall']:.3f}")
    print(f"  results rows identical across executors: {same}")


if __name__ == "__main__":
    main()
