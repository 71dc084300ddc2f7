"""Time to verdict: runtime.strategy verdict against full on the examples.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/strategy.py [--examples attacks demo] [--repeats 1] [--threads 2] [--no-figures]

Each example runs with each strategy in a fresh process, the strategies interleaved
(full, verdict, full, verdict...), at a fixed thread count. Printed per example: wall and
CPU time of each strategy and their ratio (goal on attacks.yaml: verdict <= 0.6x full),
whether the verdicts and the worst case at every budget that ran are the same, and per
attack the samples sent through the model by the attack (forward passes, counted by
wrapping the model each attack job differentiates) with the share verdict saved. For each
full run also the non-compute share: the wall time outside the jobs and the validity
re-runs (imports, loading, figures, reports; goal on the demo: <= 20 %). ``--no-figures``
runs the examples with ``report.figures: []`` (no Grad-CAM, no t-SNE embedding).

Trained models only (the examples' demo model): a random-init model is flat and hides a
broken attack. attacks.yaml with strategy full takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Runs in the child process: the audit, with every attack job's model wrapped to count samples.
CHILD = r"""
import atexit, json, sys
import medaudit.audits.execute as ex
from medaudit.core.model_wrappers import CallCounter

calls = {}
original = ex._batch

class Counted:
    def __init__(self, loaded, counter):
        self._loaded, self._counter = loaded, counter
    def __getattr__(self, name):
        return getattr(self._loaded, name)
    def view(self, name):
        return self._counter

def counting(session, job, attack, defended, *args, **kwargs):
    if attack is None:
        return original(session, job, attack, defended, *args, **kwargs)
    counter = CallCounter(defended.view(job.view))
    try:
        return original(session, job, attack, Counted(defended, counter), *args, **kwargs)
    finally:
        calls[job.spec_attack] = calls.get(job.spec_attack, 0) + counter.samples

ex._batch = counting
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(calls)))
from medaudit.cli import cli
cli(["run", sys.argv[1], "--run-dir", sys.argv[3], "--force", "-q"], standalone_mode=False)
"""


def spec_with(example: str, strategy: str, folder: Path, figures: bool = True) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text(encoding="utf-8"))
    spec.setdefault("runtime", {})["strategy"] = strategy
    if not figures:
        spec.setdefault("report", {})["figures"] = []
    path = folder / f"{example}-{strategy}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_once(example: str, strategy: str, folder: Path, threads: int, figures: bool = True) -> dict:
    spec = spec_with(example, strategy, folder, figures)
    run_dir, calls = folder / f"run-{example}-{strategy}", folder / f"calls-{example}-{strategy}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(calls), str(run_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"{example} ({strategy}): no results.json (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    compute = sum(j["seconds"] or 0 for j in results["jobs"]) + results["soundness"].get("seconds", 0)
    return {
        "wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "compute": compute, "verdict": results["verdict"],
        "worst": {r["epsilon_label"]: r["metrics"]["robust_accuracy"]["successes"] for r in results["rows"]
                  if r["attack"] == "worst_case" and r["defense"] == "none"},
        "calls": json.loads(calls.read_text(encoding="utf-8")),
        "skipped": len((results.get("strategy") or {}).get("skipped", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=["attacks", "demo"])
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each strategy per example (interleaved).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-figures", action="store_true", help="report.figures: [] (no Grad-CAM, no embedding)")
    args = parser.parse_args()
    for example in args.examples:
        runs: dict[str, list[dict]] = {"full": [], "verdict": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for strategy in runs:
                    runs[strategy].append(run_once(example, strategy, Path(tmp), args.threads, not args.no_figures))
        full, verdict = runs["full"], runs["verdict"]

        def best(rs: list[dict], key: str) -> float:
            return min(r[key] for r in rs)

        print(f"== examples/{example}.yaml ({args.repeats} run(s) of each strategy, interleaved, {args.threads} threads"
              f"{', report.figures: []' if args.no_figures else ''})")
        for name, rs in runs.items():
            r = rs[0]
            share = 1 - best(rs, "compute") / best(rs, "wall")
            print(f"  {name:8s} wall {best(rs, 'wall'):8.1f} s   cpu {best(rs, 'cpu'):8.1f} s   verdict {r['verdict']}   "
                  f"skipped jobs {r['skipped']}   non-compute share {share:.1%}")
        print(f"  ratio verdict/full: wall {best(verdict, 'wall') / best(full, 'wall'):.2f}x   "
              f"cpu {best(verdict, 'cpu') / best(full, 'cpu'):.2f}x")
        same_verdict = all(r["verdict"] == full[0]["verdict"] for r in full + verdict)
        shared = {e: v for e, v in verdict[0]["worst"].items()}
        same_worst = all(full[0]["worst"].get(e) == v for e, v in shared.items())
        print(f"  same verdict: {same_verdict}   same worst case (robust cases) at the budgets verdict ran "
              f"({', '.join(shared) or 'none'}): {same_worst}")
        for e in full[0]["worst"]:
            print(f"    {e:>8s}: full {full[0]['worst'][e]} robust cases, verdict {verdict[0]['worst'].get(e, 'skipped')}")
        print("  samples through the model per attack (forward passes):")
        for attack, n in full[0]["calls"].items():
            m = verdict[0]["calls"].get(attack, 0)
            print(f"    {attack:10s} full {n:>12,d}   verdict {m:>12,d}   saved {1 - m / n if n else 0:6.1%}")
        total_f, total_v = sum(full[0]["calls"].values()), sum(verdict[0]["calls"].values())
        print(f"    {'all':10s} full {total_f:>12,d}   verdict {total_v:>12,d}   saved {1 - total_v / max(total_f, 1):6.1%}")


if __name__ == "__main__":
    main()
