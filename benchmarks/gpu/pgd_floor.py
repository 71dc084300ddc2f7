"""PGD against its floor, in fp32 and bf16 autocast, with ART and torchattacks alongside.

    python benchmarks/gpu/pgd_floor.py [--device cuda|cpu] [--small] [--json out.json]

The floor of PGD-k is k x (forward + gradient w.r.t. the input) of the same model on the
same batch: what any implementation must spend. medaudit's ``pgd`` comes from the plugin
registry, as a spec would get it; bf16 runs the model in the engine's own autocast wrapper
(``runtime.autocast: bf16``). Full size: timm resnet50, 1 x 224 x 224, batch 128, PGD-10
and PGD-50, plus dense PGD-10 on a MONAI 3D U-Net at 128^3 (batch 2); --small: timm
resnet18 at 64 x 64, batch 8, 2 and 4 steps, the U-Net at 32^3, so that the CPU run
takes seconds. Weights are random (speed, not strength, is measured); labels are the
model's own clean predictions, so every sample is attacked. Repetitions are interleaved
(ours, floor, ART, torchattacks, ours, ...) so drift in the machine's speed affects all
alike; medians of wall, CPU and (on CUDA) device-event time. Rounds stop at --budget-s;
the JSON is rewritten after every round, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

EPS = 4 / 255
FULL = {"arch": "resnet50", "size": 224, "batch": 128, "steps": [10, 50], "reps": 5,
        "seg3d": {"size": 128, "batch": 2, "steps": 10, "channels": [16, 32, 64, 128, 256]}}
SMALL = {"arch": "resnet18", "size": 64, "batch": 8, "steps": [2, 4], "reps": 2,
         "seg3d": {"size": 32, "batch": 1, "steps": 2, "channels": [8, 16, 32]}}


class Timer:
    """Wall, CPU and device time of one call; the device is synchronised before the clock stops."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.cuda:
            end_event.record()
            torch.cuda.synchronize()
        out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        if self.cuda:
            out["gpu_s"] = start_event.elapsed_time(end_event) / 1000
        return out


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 5) for key in samples[0]}


def ratio(a: dict | None, b: dict | None, key: str = "wall_s") -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def floor_fn(model, x, y, steps, loss):
    def run():
        for _ in range(steps):
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(loss(model(xg), y), xg)
    return run


def fooled(model, x_adv, y) -> float:
    with torch.no_grad():
        return round((model(x_adv).argmax(1) != y).float().mean().item(), 4)


def classifier_cases(cfg: dict, device: torch.device, notes: dict) -> list[dict]:
    """One case per (precision, steps): name, and the functions to time."""
    import numpy as np
    import timm

    from medaudit.core.components import Norm
    from medaudit.core.host import get_host
    from medaudit.core.models import PixelSpaceModel, SpeedWrapper, prepare_for_audit

    pgd_cls = get_host(load_entry_points=False).get("attack", "pgd")
    torch.manual_seed(0)
    net = timm.create_model(cfg["arch"], in_chans=1, num_classes=2)
    fp32 = prepare_for_audit(PixelSpaceModel(net, [0.5], [0.25], 1)).to(device)
    models = {"fp32": fp32, "bf16": prepare_for_audit(SpeedWrapper(fp32, torch.bfloat16, channels_last=False))}
    if device.type == "cuda":  # measured, not assumed: channels-last with bf16 (runtime.channels_last)
        models["bf16-channels-last"] = prepare_for_audit(SpeedWrapper(fp32, torch.bfloat16, channels_last=True))
    size, batch = cfg["size"], cfg["batch"]
    x = torch.rand(batch, 1, size, size, device=device, generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad():
        y = fp32(x).argmax(1)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")

    try:
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier
    except Exception as exc:
        notes["art"] = f"not importable: {type(exc).__name__}: {exc}"
        art = None
    else:
        art = PyTorchClassifier(model=fp32, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, size, size), nb_classes=2,
                                clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")
        notes["art"] = "ProjectedGradientDescentPyTorch, numpy in and out (as ART is called), fp32 only"
    try:
        import torchattacks
    except Exception as exc:
        notes["torchattacks"] = f"not importable: {type(exc).__name__}: {exc}"
        torchattacks = None
    else:
        notes["torchattacks"] = f"torchattacks {torchattacks.__version__} PGD, fp32 only"
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()

    cases = []
    for precision, model in models.items():
        for steps in cfg["steps"]:
            pgd = pgd_cls(pgd_cls.Params(steps=steps))
            gen = torch.Generator(device=device).manual_seed(0)
            step = 2.5 * EPS / steps
            fns = {
                "ours": lambda pgd=pgd, model=model, gen=gen: pgd.perturb(model, x, y, eps=EPS, norm=Norm.LINF, generator=gen),
                "floor": floor_fn(model, x, y, steps, loss),
            }
            if precision == "fp32" and art is not None:
                attack = ProjectedGradientDescentPyTorch(art, norm=np.inf, eps=EPS, eps_step=step, max_iter=steps,
                                                         num_random_init=1, batch_size=batch, verbose=False)
                fns["art"] = lambda attack=attack: torch.from_numpy(attack.generate(x_np, y=y_np)).to(device)
            if precision == "fp32" and device.type == "cuda":  # torch.compile of the forward: does it pay here?
                try:
                    compiled = torch.compile(model)
                except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                    notes["compile"] = f"torch.compile failed: {type(exc).__name__}: {exc}"
                else:
                    notes["compile"] = "ours_compiled: the same PGD on torch.compile(model) (compile time in the first call)"
                    fns["ours_compiled"] = lambda pgd=pgd, m=compiled, gen=gen: pgd.perturb(
                        m, x, y, eps=EPS, norm=Norm.LINF, generator=gen)
            if precision == "fp32" and torchattacks is not None:
                ta = torchattacks.PGD(model, eps=EPS, alpha=step, steps=steps, random_start=True)
                fns["torchattacks"] = lambda ta=ta: ta(x, y)
            cases.append({"name": f"{cfg['arch']} {precision} pgd-{steps}", "precision": precision, "steps": steps,
                          "fns": fns, "check": lambda out, model=model: fooled(model, out, y),
                          "warm_up": steps == cfg["steps"][0]})
    return cases


def seg3d_case(cfg: dict, device: torch.device) -> dict:
    """Dense PGD on a 3D U-Net (per-voxel cross-entropy) against its own floor."""
    from monai.networks.nets import UNet

    from medaudit.core.components import Norm
    from medaudit.core.host import get_host
    from medaudit.core.models import PixelSpaceModel, prepare_for_audit
    from medaudit.core.perturbation import per_sample_loss

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=5, channels=cfg["channels"],
               strides=[2] * (len(cfg["channels"]) - 1), num_res_units=2)
    model = prepare_for_audit(PixelSpaceModel(net, [0.5], [0.25], 1)).to(device)
    s = cfg["size"]
    x = torch.rand(cfg["batch"], 1, s, s, s, device=device, generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    pgd_cls = get_host(load_entry_points=False).get("attack", "pgd")
    pgd = pgd_cls(pgd_cls.Params(steps=cfg["steps"]))
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "name": f"monai 3D U-Net {s}^3 batch {cfg['batch']} fp32 dense pgd-{cfg['steps']}", "precision": "fp32",
        "steps": cfg["steps"],
        "fns": {"ours": lambda: pgd.perturb(model, x, y, eps=EPS, norm=Norm.LINF, generator=gen),
                "floor": floor_fn(model, x, y, cfg["steps"], lambda out, t: per_sample_loss(out, t).sum())},
        "check": lambda out: fooled(model, out, y),  # here: the fraction of voxels whose label changed
        "warm_up": True,
    }


def summarise(case: dict, samples: dict[str, list], checks: dict) -> dict:
    out = {"name": case["name"], "precision": case["precision"], "steps": case["steps"],
           "reps": len(samples.get("ours", []))}
    for impl, runs in samples.items():
        if runs:
            out[impl] = medians(runs)
            if impl in checks:
                out[impl]["fooled_fraction"] = checks[impl]
    out["pgd_over_floor"] = ratio(out.get("ours"), out.get("floor"))
    if "gpu_s" in out.get("ours", {}):
        out["pgd_over_floor_gpu"] = ratio(out["ours"], out.get("floor"), "gpu_s")
    for impl in ("art", "torchattacks", "ours_compiled"):
        if impl in out:
            out[f"{impl}_over_ours"] = ratio(out[impl], out.get("ours"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="Tiny sizes for a CPU smoke run.")
    parser.add_argument("--budget-s", type=float, default=170.0, help="Start no round that would end after this.")
    parser.add_argument("--json", type=Path, help="Write the results here (rewritten after every round).")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = SMALL if args.small else FULL
    device = torch.device(args.device)
    timer = Timer(device)
    from medaudit.core.environment import require_torchvision

    require_torchvision()
    notes: dict[str, str] = {}
    cases = classifier_cases(cfg, device, notes)
    try:
        cases.append(seg3d_case(cfg["seg3d"], device))
    except Exception as exc:
        notes["seg3d"] = f"not run: {type(exc).__name__}: {exc}"
    report = {
        "config": {k: v for k, v in cfg.items()} | {"eps": "4/255", "norm": "linf", "device": str(device),
                                                   "cpu_threads": torch.get_num_threads()},
        "weights": "random-init, timing only",
        "labels": "the model's own clean predictions: every sample is attacked",
        "notes": notes, "cases": [], "complete": False,
    }

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    def call(case: dict, impl: str) -> tuple[dict | None, object]:
        """Time one call; an implementation that raises (out of memory...) is noted and dropped."""
        result: list = []
        try:
            return timer(lambda: result.append(case["fns"][impl]())), result[0]
        except Exception as exc:
            notes[f"{case['name']} {impl}"] = f"dropped: {type(exc).__name__}: {str(exc)[:300]}"
            del case["fns"][impl]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None, None

    # Warm-up: every function once at the smallest step count (CUDA context, cuDNN
    # algorithm choice, allocator); the longer runs reuse the same model and kernels.
    for case in cases:
        if case["warm_up"]:
            for impl in list(case["fns"]):
                call(case, impl)
    report["warmup_s"] = round(time.perf_counter() - started, 1)
    samples = [{impl: [] for impl in case["fns"]} for case in cases]
    checks: list[dict] = [{} for _ in cases]
    last_round = 0.0
    for rep in range(cfg["reps"]):
        round_start = time.perf_counter()
        if rep > 0 and round_start - started + last_round > args.budget_s:
            report["stopped"] = f"budget of {args.budget_s:.0f} s reached after {rep} rounds"
            break
        for i, case in enumerate(cases):
            for impl in list(case["fns"]):
                timing, out = call(case, impl)
                if timing is not None:
                    samples[i][impl].append(timing)
                    if impl != "floor" and impl not in checks[i]:
                        checks[i][impl] = case["check"](out)
        last_round = time.perf_counter() - round_start
        report["cases"] = [summarise(case, samples[i], checks[i]) for i, case in enumerate(cases)]
        write()
        for c in report["cases"]:
            print(f"round {rep + 1}: {c['name']}: pgd/floor {c['pgd_over_floor']}"
                  + "".join(f", {k} {c[k]}" for k in ("art_over_ours", "torchattacks_over_ours") if k in c), flush=True)
    report["complete"] = True
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
