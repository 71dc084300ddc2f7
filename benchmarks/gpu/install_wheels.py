"""Install the wheels of .whl/ that this Python lacks (or has older) into a private folder.

    python3 benchmarks/gpu/install_wheels.py .whl /tmp/site --json steps/install.json

Only what is missing or older is installed, so the machine's own builds of shared
packages (numpy, torch, ...) are never shadowed by the ones fetched for it; the folder is
meant to go first on PYTHONPATH. Uses pip (``--no-index --no-deps``); without pip the
wheels are unpacked directly, which is all a wheel without scripts needs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path


def version_key(text: str):
    """Comparable form of a version: packaging's when importable, else its leading numbers."""
    try:
        from packaging.version import Version

        return Version(text)
    except Exception:
        return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:4])


def needed(wheel: Path) -> tuple[bool, str]:
    """Whether to install ``wheel``, and why."""
    name, version = wheel.name.split("-")[:2]
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return True, "missing"
    try:
        older = version_key(have) < version_key(version)
    except Exception:  # unparsable: keep what is there
        older = False
    return (True, f"older ({have})") if older else (False, f"present ({have})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--json", type=Path, help="Write what was installed and skipped here.")
    args = parser.parse_args()
    chosen, report = [], {"installed": {}, "kept": {}}
    for wheel in sorted(args.wheels.glob("*.whl")):
        install, why = needed(wheel)
        (report["installed"] if install else report["kept"])[wheel.name] = why
        if install:
            chosen.append(wheel)
    args.target.mkdir(parents=True, exist_ok=True)
    rc = 0
    if chosen:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(args.target), *map(str, chosen)]
        rc = subprocess.call(cmd)
        report["method"] = "pip"
        if rc != 0:  # no pip here, or it failed: a plain wheel is a zip of the installed files
            for wheel in chosen:
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(args.target)
            report["method"], rc = f"unzip (pip exited {rc})", 0
    for name, why in report["installed"].items():
        print(f"install {name}: {why}")
    print(f"kept {len(report['kept'])} present: {', '.join(report['kept']) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
