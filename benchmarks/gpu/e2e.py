"""One whole ``medaudit run`` on the device, timed, with what its run directory says.

    python benchmarks/gpu/e2e.py [--device cuda|cpu] [--small] [--json out.json] [--timeout-s 190]

Full size: 1,000 phantom slices at 224 x 224, a random-init timm resnet50 (in_chans 1,
2 classes), five L-inf budgets, PGD-50 and AutoAttack with far fewer steps and queries
than its standard settings: a random-init model breaks on almost no case, so every
component runs on all ~500 correct cases at each budget, and the standard 100 steps and
5,000 Square queries would not fit the time cap. Estimate: ~170,000 forward + input
gradient passes (a Square query counted as a third of one), ~115 s at 1,500 images/s,
plus loading and figures. --small: 32 slices at 64 x 64, timm resnet18, PGD-2 and a
tiny AutoAttack. The spec goes to a temporary folder; the run is a subprocess, killed at
--timeout-s, after which the timeline written so far still gives the seconds of every
finished job.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

EPSILONS = [0, "0.5/255", "1/255", "2/255", "4/255"]
FULL = {"arch": "resnet50", "n": 1000, "size": 224, "batch_size": 128,
        "attacks": [{"name": "pgd", "params": {"steps": 50}},
                    {"name": "autoattack", "params": {"apgd_steps": 10, "n_target_classes": 1, "square_queries": 50}}]}
SMALL = {"arch": "resnet18", "n": 32, "size": 64, "batch_size": 32,
         "attacks": [{"name": "pgd", "params": {"steps": 2}},
                     {"name": "autoattack", "params": {"apgd_steps": 2, "n_target_classes": 1, "square_queries": 5}}]}


def spec(cfg: dict, device: str) -> dict:
    return {
        "audit": {"name": "gpu-check", "title": "GPU check: end-to-end timing",
                  "description": "Random-init weights: timing only, says nothing about robustness."},
        "intended_use": {"device": "benchmark", "clinical_task": "none", "modality": "synthetic phantom slices",
                         "out_of_scope": ["any clinical use"]},
        "task": "classification",
        "model": {"loader": "timm", "params": {"arch": cfg["arch"], "in_chans": 1, "num_classes": 2}},
        "data": {"dataset": "phantom", "params": {"n": cfg["n"], "size": cfg["size"], "seed": 0}},
        "threat_model": {"norm": "linf", "epsilons": EPSILONS},
        "attacks": cfg["attacks"],
        "report": {"formats": ["json"]},
        "runtime": {"device": device, "batch_size": cfg["batch_size"], "seed": 0},
    }


def job_seconds(timeline: list[dict]) -> dict:
    """Seconds per attack (summed over its jobs) and the number of jobs finished."""
    per_attack: dict[str, float] = defaultdict(float)
    jobs = [e for e in timeline if e.get("event") == "job"]
    for e in jobs:
        # job ids look like "none.pgd.eps2-<hash>" or "none.clean-<hash>"
        parts = e["job"].rsplit("-", 1)[0].split(".")
        per_attack[parts[1] if len(parts) > 1 else e["job"]] += e["seconds"]
    return {"jobs_finished": len(jobs), "seconds_by_attack": {k: round(v, 2) for k, v in per_attack.items()},
            "job_seconds": {e["job"]: e["seconds"] for e in jobs}}


def read_run(run_dir: Path) -> dict:
    out: dict = {}
    timeline_path = run_dir / "timeline.jsonl"
    if timeline_path.is_file():
        timeline = [json.loads(line) for line in timeline_path.read_text().splitlines() if line.strip()]
        out["timeline"] = {"events": len(timeline), **job_seconds(timeline)}
    results_path = run_dir / "results.json"
    if results_path.is_file():
        r = json.loads(results_path.read_text())
        out["verdict"], out["results_exit_code"] = r.get("verdict"), r.get("exit_code")
        out["clean_accuracy"] = r["clean"]["none"]["clean_accuracy"]["value"]
        out["robust_accuracy"] = {
            f"{row['attack']} {row['epsilon_label']}": row["metrics"]["robust_accuracy"]["value"]
            for row in r.get("rows", []) if "robust_accuracy" in row.get("metrics", {})
        }
        out["environment"] = {k: r.get("environment", {}).get(k) for k in ("device", "python", "torch_threads")}
        out["validity"] = {v["id"]: v["status"] for v in r.get("validity", [])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timeout-s", type=float, default=190.0)
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder with the run directory.")
    args = parser.parse_args()
    cfg = SMALL if args.small else FULL
    work = Path(tempfile.mkdtemp(prefix="medaudit-gpu-e2e-"))
    spec_path, run_dir = work / "spec.yaml", work / "run"
    spec_path.write_text(json.dumps(spec(cfg, args.device), indent=1))  # JSON is YAML
    cmd = [sys.executable, "-c", "from medaudit.cli import main; main()", "run", str(spec_path), "--run-dir", str(run_dir), "-q"]
    report = {"config": {k: v for k, v in cfg.items()} | {"epsilons": EPSILONS, "device": args.device},
              "weights": "random-init, timing only"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout_s)
        report["exit_code"], output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        report["exit_code"], report["timed_out"] = None, True
        output = "".join(o.decode() if isinstance(o, bytes) else o for o in (exc.stdout, exc.stderr) if o)
    report["wall_s"] = round(time.perf_counter() - start, 2)
    print(output[-4000:])
    report.update(read_run(run_dir))
    # Finished: the CLI exited with the verdict's code (NOT ASSESSED, 5: the spec has no
    # criteria); an error exits otherwise, without results.
    report["finished"] = report.get("results_exit_code") is not None and report["exit_code"] == report["results_exit_code"]
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        if (run_dir / "results.json").is_file():  # the whole results next to the summary
            shutil.copyfile(run_dir / "results.json", args.json.with_name("e2e-results.json"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: report.get(k) for k in ("wall_s", "exit_code", "verdict", "clean_accuracy", "finished")}))
    return 0 if report["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
