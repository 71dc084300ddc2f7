"""Calibrate the corruptions' severities against SSIM bands (as MedFM-Robust does).

    python benchmarks/calibrate_corruptions.py           # print the table
    python benchmarks/calibrate_corruptions.py --write   # and write the package's table

For each operation of ``medaudit.plugins.attacks._corruption_ops`` and each severity s = 1..5,
finds by bisection the strength whose mean SSIM against the clean images is
``TARGET_SSIM[s - 1]`` on the calibration images: 64 phantom CT-like slices (64 x 64, seed 0;
RGB operations: the same slices tinted to an H&E-like pink). A band the operation cannot
reach at its most plausible strength (``p_max``) is marked unreached, and the unreached
levels are spread evenly up to ``p_max``, so severities always grow. Random operations are
measured on one fixed draw (seed 0) per evaluation, so the bisection sees a smooth curve.
The achieved SSIM and PSNR of each level are written beside its parameter; the report
quotes them, and every run records the SSIM and PSNR its own cases got.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medaudit.core.phantoms import PhantomParams, make_phantoms  # noqa: E402
from medaudit.core.quality import psnr, ssim  # noqa: E402
from medaudit.plugins.attacks import _corruption_ops  # noqa: E402
from medaudit.plugins.attacks._severities import SEVERITY_FILE, TARGET_SSIM  # noqa: E402

IMAGES = ("64 phantom CT-like slices (64 x 64, seed 0; RGB operations: the same slices tinted H&E-like pink)")
#: The pink of the RGB calibration images: background near white, tissue pink-purple.
TINT = torch.tensor([0.85, 0.55, 0.75]).view(1, 3, 1, 1)


def calibration_images() -> dict[str, torch.Tensor]:
    grey, _, _ = make_phantoms(PhantomParams(n=64, size=64, seed=0))
    rgb = (1 - grey * (1 - TINT)).clamp(0, 1)
    return {"grey": grey.double(), "rgb": rgb.double()}


def measure(op, x: torch.Tensor, p: float) -> tuple[float, float]:
    out = op.fn(x, p, torch.Generator().manual_seed(0))
    decibels = psnr(out, x)
    finite = decibels[torch.isfinite(decibels)]
    return float(ssim(out, x).mean()), float(finite.mean()) if len(finite) else float("inf")


def calibrate(op, x: torch.Tensor, steps: int = 30) -> dict:
    parameters, reached = [], []
    for target in TARGET_SSIM:
        if measure(op, x, op.p_max)[0] > target:
            parameters.append(None)
            reached.append(False)
            continue
        low, high = 0.0, op.p_max
        for _ in range(steps):
            mid = (low + high) / 2
            if measure(op, x, mid)[0] > target:
                low = mid
            else:
                high = mid
        parameters.append(high)
        reached.append(True)
    last = max([p for p in parameters if p is not None], default=0.0)
    missing = [i for i, p in enumerate(parameters) if p is None]
    for j, i in enumerate(missing, start=1):  # unreached bands: evenly up to p_max
        parameters[i] = last + (op.p_max - last) * j / len(missing)
    for i in range(1, len(parameters)):  # severities never weaken (a noisy SSIM curve)
        parameters[i] = max(parameters[i], parameters[i - 1])
    achieved = [measure(op, x, p) for p in parameters]
    return {"parameters": [round(p, 6) for p in parameters], "ssim": [round(s, 4) for s, _ in achieved],
            "psnr": [round(d, 2) for _, d in achieved], "reached": reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write medaudit/plugins/attacks/{SEVERITY_FILE}")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = calibration_images()
    table = {"images": IMAGES, "command": "python benchmarks/calibrate_corruptions.py --write",
             "target_ssim": list(TARGET_SSIM), "corruptions": {}}
    for name, op in _corruption_ops.OPS.items():
        x = images["rgb" if op.modality == "rgb" else "grey"]
        entry = table["corruptions"][name] = calibrate(op, x)
        print(f"{name:18s} p_max {op.p_max:<6g} parameters {entry['parameters']}  ssim {entry['ssim']}  "
              f"psnr {entry['psnr']}  reached {sum(entry['reached'])}/5", flush=True)
    if args.write:
        path = ROOT / "medaudit" / "plugins" / "attacks" / SEVERITY_FILE
        path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
