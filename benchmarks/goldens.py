"""Golden numbers of the example audits, to prove a refactor of the engine keeps them.

    python benchmarks/goldens.py save  [EXAMPLE ...]   # run the examples, write benchmarks/goldens/EXAMPLE.json
    python benchmarks/goldens.py check [EXAMPLE ...]   # run them again, list every number that moved

EXAMPLE is a spec name in examples/ without ``.yaml`` (default: demo, attacks,
segmentation, defenses). A golden keeps what a refactor must not change: the verdict and
exit code, the clean metrics, every results row (metrics with their intervals, per-class
Dice, detection), the robustness curves, each criterion's verdict and estimate, and each
validity check's status. Timestamps, paths, environment and figures are left out. ``check``
exits 1 when anything differs, printing each difference; explain each one or fix it.

The examples run on the CPU with their own seeds (about 12 minutes for all four on 2
cores); the goldens in the repository name the commit they were made on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "benchmarks" / "goldens"
EXAMPLES = ("demo", "attacks", "segmentation", "defenses")


def numbers(results: dict) -> dict:
    """The parts of results.json that a refactor must keep."""
    return {
        "verdict": results["verdict"],
        "exit_code": results["exit_code"],
        "clean": results["clean"],
        "rows": {f"{r['defense']} | {r['attack']} | {r['epsilon_label']}": {k: v for k, v in r.items() if k not in (
            "defense", "attack", "epsilon", "epsilon_label", "view", "spec_attack")} for r in results["rows"]},
        "curves": results["curves"],
        "criteria": {c["id"]: {k: c.get(k) for k in ("verdict", "estimate", "ci_low", "ci_high", "n", "reason")}
                     for c in results["acceptance"]["criteria"]},
        "validity": {c["id"]: c["status"] for c in results["validity"]},
    }


def run_example(name: str) -> dict:
    """Run examples/NAME.yaml in a temporary run directory and return its numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        done = subprocess.run([sys.executable, "-c", "from medaudit.cli import main; main()", "run", str(ROOT / "examples" / f"{name}.yaml"),
                               "--run-dir", str(run_dir), "-q"], cwd=ROOT, capture_output=True, text=True)
        results = run_dir / "results.json"
        if not results.is_file():
            raise SystemExit(f"{name}: no results.json (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return numbers(json.loads(results.read_text(encoding="utf-8")))


def differences(golden, now, where: str = "") -> list[str]:
    """Every leaf that differs between two nested structures, with its path."""
    if isinstance(golden, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(golden) | set(now), key=str):
            if key not in now:
                out.append(f"{where}/{key}: gone (was {golden[key]!r})")
            elif key not in golden:
                out.append(f"{where}/{key}: new ({now[key]!r})")
            else:
                out += differences(golden[key], now[key], f"{where}/{key}")
        return out
    if isinstance(golden, list) and isinstance(now, list) and len(golden) == len(now):
        return [d for i, (g, n) in enumerate(zip(golden, now)) for d in differences(g, n, f"{where}[{i}]")]
    return [] if golden == now else [f"{where}: {golden!r} -> {now!r}"]


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("save", "check"))
    parser.add_argument("examples", nargs="*", default=list(EXAMPLES))
    args = parser.parse_args()
    moved = 0
    for name in args.examples:
        now = run_example(name)
        path = GOLDENS / f"{name}.json"
        if args.command == "save":
            GOLDENS.mkdir(exist_ok=True)
            path.write_text(json.dumps({"made_on": commit(), **now}, indent=1) + "\n", encoding="utf-8")
            print(f"{name}: saved {path.relative_to(ROOT)} ({len(now['rows'])} rows, verdict {now['verdict']})")
            continue
        golden = json.loads(path.read_text(encoding="utf-8"))
        found = differences({k: v for k, v in golden.items() if k != "made_on"}, now)
        moved += bool(found)
        print(f"{name}: {'identical' if not found else f'{len(found)} differences'} "
              f"({len(now['rows'])} rows; golden made on {golden['made_on']})")
        for line in found:
            print(f"  {line}")
    sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
