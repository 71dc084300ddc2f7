#!/usr/bin/env bash
# Download the wheels of wheels.txt into .whl/ at the repository root, for a Python 3.12
# x86_64 Linux machine without a package index (run.sh installs them there). Run it on a
# machine with index access; .whl/ is git-ignored, so name it among the paths that travel.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
python3 -m pip download --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d .whl -r benchmarks/gpu/wheels.txt
# Keep only the pinned versions (an earlier download of another pin would travel too).
python3 - <<'PY'
import pathlib, re
pins = {}
for line in pathlib.Path("benchmarks/gpu/wheels.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "_", name).lower()] = version
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if pins.get(re.sub(r"[-_.]+", "_", name).lower()) != version:
        print(f"removing {wheel.name} (not pinned in wheels.txt)")
        wheel.unlink()
PY
du -sh .whl
ls .whl | wc -l
