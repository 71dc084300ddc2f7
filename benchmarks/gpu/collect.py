"""Gather the steps of run.sh into one JSON: environment, then each step's status and numbers.

    python benchmarks/gpu/collect.py OUT [--device cuda] [--small] [--seconds 312]

A step's status: ``ok``; ``skipped`` with a reason; ``timeout`` (its cap ran out: whatever
it wrote before is kept); ``failed`` with its exit code. The log has each step's output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

STEPS = ("install", "pytest", "pgd", "e2e")

#: Items of the issue this check does not cover, and why.
NOT_PREPARED = {
    "autoattack_vs_fra31": "the reference AutoAttack (fra31/auto-attack) is not on PyPI, so no wheel can travel to a "
    "machine without an index; and agreement of robust accuracy needs trained weights, which are not fetched there",
}

PACKAGES = ("torch", "torchvision", "timm", "numpy", "pydantic", "segmentation-models-pytorch",
            "adversarial-robustness-toolbox", "monai", "captum", "torchattacks", "pytest")


def environment() -> dict:
    env: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    env["packages"] = packages
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = torch.cuda.is_available()
        env["cuda_version"] = torch.version.cuda
        env["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["device_name"] = props.name
            env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["device_capability"] = f"{props.major}.{props.minor}"
            env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        else:
            env["device_name"] = "cpu"
        env["cpu_threads"] = torch.get_num_threads()
    except Exception as exc:  # the summary must still be written
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
        try:
            env["nvidia_smi"] = subprocess.run(query, check=False, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            env["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    return env


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def step_result(out: Path, name: str) -> dict:
    status = read_json(out / "steps" / f"{name}.status.json")
    if status is None:
        return {"status": "failed", "reason": "the step left no status (run.sh stopped before it?)"}
    if "skipped" in status:
        return {"status": "skipped", "reason": status["skipped"]}
    rc = status["rc"]
    result = {"status": "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed", "exit_code": rc,
              "seconds": status["seconds"], "cap_s": status["cap_s"]}
    if name == "install":
        result["wheels"] = read_json(out / "steps" / "install.json")
    elif name == "pytest":
        result["counts"] = pytest_counts(out / "steps" / "pytest.xml")
        if rc == 5:  # pytest: no tests collected
            result.update(status="skipped", reason="no test carries the cuda marker")
        elif result["status"] == "ok" and result["counts"] and result["counts"]["tests"] == result["counts"]["skipped"]:
            result["note"] = "every CUDA-marked test skipped itself (no CUDA device)"
    elif name == "pgd":
        result["results"] = read_json(out / "steps" / "pgd.json")
        if result["results"] is None and result["status"] == "ok":
            result.update(status="failed", reason="no results written")
    elif name == "e2e":
        result["results"] = read_json(out / "steps" / "e2e.json")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seconds", type=float, help="Wall time of run.sh so far.")
    args = parser.parse_args()
    steps = {name: step_result(args.out, name) for name in STEPS}
    pgd = (steps["pgd"].get("results") or {}).get("cases", [])
    summary = {
        "pgd_over_floor": {c["name"]: c.get("pgd_over_floor") for c in pgd},
        "art_over_ours": {c["name"]: c["art_over_ours"] for c in pgd if "art_over_ours" in c},
        "torchattacks_over_ours": {c["name"]: c["torchattacks_over_ours"] for c in pgd if "torchattacks_over_ours" in c},
        "e2e_wall_s": (steps["e2e"].get("results") or {}).get("wall_s"),
    }
    report = {
        "check": "benchmarks/gpu/run.sh", "device": args.device, "small": args.small, "seconds": args.seconds,
        "environment": environment(), "summary": summary, "steps": steps, "not_prepared": NOT_PREPARED,
    }
    path = args.out / "gpu-check.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({"summary": summary, "status": {k: v["status"] for k, v in steps.items()}}, indent=1))
    print(f"wrote {path}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
