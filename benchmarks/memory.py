"""Peak memory of an audit does not grow with the evaluation set: the data streams.

    python benchmarks/memory.py                 # full audits: medaudit run, 256 vs 4,096 cases
    python benchmarks/memory.py --stage data    # only load + summary pass + one pass of batches

Each size runs in a fresh subprocess (a small wrapper that starts it and reads
``getrusage(RUSAGE_CHILDREN).ru_maxrss``, so no measurement sees another's peak). The
audit is the same for both sizes apart from ``n``: phantom slices at 128 x 128, the demo
model trained at 128 x 128 for one short epoch (trained once before measuring, so training
is in neither peak), FGSM and PGD-5 at one epsilon, batch size 64, on the CPU. Prints both
peaks and their ratio; the target is a ratio of at most 1.3 (the 4,096 images alone are
256 MiB as float32, their masks 512 MiB as int64).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (256, 4096)
TARGET = 1.3
MODEL = {"loader": "demo", "params": {"image_size": 128, "train_size": 64, "epochs": 1}}


def spec(n: int) -> str:
    return json.dumps({  # JSON is YAML
        "audit": {"name": f"memory-{n}", "title": f"Memory benchmark, {n} cases"},
        "intended_use": {"device": "benchmark", "clinical_task": "none", "modality": "synthetic phantom slices",
                         "out_of_scope": ["any clinical use"]},
        "task": "classification",
        "model": MODEL,
        "data": {"dataset": "phantom", "params": {"n": n, "size": 128, "seed": 0}},
        "threat_model": {"norm": "linf", "epsilons": ["1/255"]},
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 5}}],
        "report": {"formats": ["json"]},
        "runtime": {"device": "cpu", "batch_size": 64, "seed": 0},
    }, indent=1)


DATA_ONLY = """
import sys
from medaudit.core.components import Task
from medaudit.core.data import summarise
from medaudit.plugins.datasets.phantom import Phantom, PhantomParams
data = Phantom(PhantomParams(n=int(sys.argv[1]), size=128, seed=0)).load()
summary = summarise(data, Task.CLASSIFICATION, 2, batch_size=64)
total = sum(float(x.sum()) for _, x, _ in data.batches(0, len(data), 64, task=Task.CLASSIFICATION))
print(summary.n, summary.intensity, round(total, 3))
"""

TRAIN = """
from medaudit.core.components import Task
from medaudit.plugins.models.demo import DemoModel, DemoParams
DemoModel(DemoParams(**{params!r})).load(Task.CLASSIFICATION)
"""

WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode not in (0, 1, 2, 5):  # 1/2/5: the audit's verdict (5: no criteria), not a failure
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    sys.exit(done.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_kib(command: list[str]) -> int:
    """Peak RSS (KiB on Linux) of ``command``, run in a fresh wrapper process."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}... failed (exit {done.returncode}):\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("audit", "data"), default="audit")
    parser.add_argument("--sizes", type=int, nargs=2, default=SIZES, metavar=("SMALL", "LARGE"))
    args = parser.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.stage == "audit":
            subprocess.run([sys.executable, "-c", TRAIN.format(params=MODEL["params"])], cwd=ROOT, check=True)
        for n in args.sizes:
            if args.stage == "data":
                command = [sys.executable, "-c", DATA_ONLY, str(n)]
            else:
                path = Path(tmp) / f"memory-{n}.yaml"
                path.write_text(spec(n), encoding="utf-8")
                command = [sys.executable, "-c", "from medaudit.cli import main; main()", "run", str(path),
                           "--run-dir", str(Path(tmp) / f"run-{n}"), "-q"]
            peaks[n] = peak_kib(command)
            print(f"{args.stage}: {n:>5} cases at 128 x 128: peak RSS {peaks[n] / 1024:8.1f} MiB", flush=True)
    small, large = args.sizes
    ratio = peaks[large] / peaks[small]
    print(f"ratio {large}/{small}: {ratio:.2f} (target <= {TARGET}) {'OK' if ratio <= TARGET else 'OVER'}")
    sys.exit(0 if ratio <= TARGET else 1)


if __name__ == "__main__":
    main()
