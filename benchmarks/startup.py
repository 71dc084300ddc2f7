"""Start-up time of the command line: ``medaudit validate`` on a spec whose files are missing, and
``medaudit --help``.

    python benchmarks/startup.py [--runs 5] [--all-plugins]

Each command runs ``--runs`` times in a fresh interpreter; prints the median wall time, then the
ten imports of the validate run that take longest, cumulative (``python -X importtime``), and
``import torch`` alone for scale. Only the built-in plugins load unless ``--all-plugins``: an
installed vendor plugin's own imports are its business (one that imports torch at its top level
puts torch's seconds back on every command).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A spec that passes the structure checks and fails on its two missing input paths.
SPEC = """\
audit: {name: startup, title: Start-up benchmark}
task: classification
model: {loader: onnx, params: {path: missing.onnx}}
data: {dataset: image-folder, params: {path: no-such-folder, classes: [normal, nodule]}}
threat_model: {norm: linf, epsilons: [0, 1/255]}
attacks: [{name: square}, {name: onepixel}]
acceptance: {criteria: [{id: AC-01, metric: clean_accuracy, op: ">=", threshold: 0.5}]}
"""

#: Runs the installed command line in-process (what the ``medaudit`` script does).
CLI = "import sys; from medaudit.cli import main; sys.argv[0] = 'medaudit'; main()"


def median_wall(args: list[str], runs: int, env: dict[str, str], cwd: str, code_text: str = CLI) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", code_text, *args], env=env, cwd=cwd, capture_output=True).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def top_imports(args: list[str], env: dict[str, str], cwd: str, count: int = 10) -> list[tuple[float, str]]:
    """The ``count`` largest cumulative import times of one run, in seconds, outermost first
    among equals (importtime lists a module after the imports it triggered)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", CLI, *args], env=env, cwd=cwd,
                          capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows.append((int(match.group(1)) / 1e6, len(match.group(2)), match.group(3)))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return [(seconds, name) for seconds, _, name in rows[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--all-plugins", action="store_true", help="Also load the installed vendor plugins (entry points).")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not args.all_plugins:
        env["MEDAUDIT_LOAD_PLUGINS"] = ""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "audit.yaml").write_text(SPEC, encoding="utf-8")
        validate = ["validate", "audit.yaml"]
        for label, command in (("medaudit validate (missing files)", validate), ("medaudit --help", ["--help"])):
            seconds, code = median_wall(command, args.runs, env, folder)
            print(f"{label:<36} median of {args.runs}: {seconds:6.3f} s  (exit code {code})", flush=True)
        seconds, _ = median_wall([], args.runs, env, folder, code_text="import torch")
        label = "import torch alone (for scale)"
        print(f"{label:<36} median of {args.runs}: {seconds:6.3f} s")
        print("largest imports of medaudit validate (cumulative):")
        for seconds, name in top_imports(validate, env, folder):
            print(f"  {seconds:6.3f} s  {name}")


if __name__ == "__main__":
    main()
