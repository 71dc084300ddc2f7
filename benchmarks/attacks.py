"""Attack speed against the floor, ART and torchattacks, measured in one process.

    python benchmarks/attacks.py [--device cpu|cuda] [--reps 5]

The floor of an iterative gradient attack is steps x (forward + backward w.r.t. the input).
Model: timm resnet18, in_chans=1, 2 classes, 64x64, batch 32, random init, eval mode, with
the same pixel-space wrapper (normalisation inside the model) for every implementation.
Segmentation: dense PGD (per-pixel cross-entropy, lowest-Dice iterate kept) on an smp U-Net
(resnet18 encoder, 5 classes, 128x128, batch 8) against its own floor; no library has a
segmentation PGD to compare with. Prints one line per implementation, then one JSON line
with the ratios.

torchattacks is optional: install it with ``pip install --no-deps torchattacks`` (its
metadata pins ``requests~=2.25``, which would downgrade packages timm needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from medaudit.core.components import Norm
from medaudit.core.environment import require_torchvision
from medaudit.core.models import PixelSpaceModel, prepare_for_audit
from medaudit.plugins.attacks.gradient import PGD, PGDParams

STEPS, EPS, BATCH, SIZE = 10, 4 / 255, 32, 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict, device, reps: int) -> dict[str, float]:
    """Median wall time of each function; repetitions are interleaved round-robin so that
    drift in the machine's speed affects every implementation alike."""
    for fn in fns.values():
        fn()  # warm-up
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--autoattack-images", type=int, default=256, help="0 skips the AutoAttack line.")
    args = parser.parse_args()
    device = torch.device(args.device)
    require_torchvision()
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", in_chans=1, num_classes=2)
    model = prepare_for_audit(PixelSpaceModel(net, [0.5], [0.25], 1)).to(device)
    x = torch.rand(BATCH, 1, SIZE, SIZE, device=device)
    y = torch.randint(0, 2, (BATCH,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def floor():
        for _ in range(STEPS):
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(loss_fn(model(xg), y), xg)

    pgd = PGD(PGDParams(steps=STEPS))
    gen = torch.Generator(device=device).manual_seed(0)
    fns = {"floor": floor, "pgd": lambda: pgd.perturb(model, x, y, eps=EPS, norm=Norm.LINF, generator=gen)}

    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, SIZE, SIZE), nb_classes=2,
                            clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")
    art_pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=EPS, eps_step=2.5 * EPS / STEPS, max_iter=STEPS,
                                       num_random_init=1, batch_size=BATCH, verbose=False)
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    fns["art"] = lambda: art_pgd.generate(x_np, y=y_np)
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    else:
        ta = torchattacks.PGD(model, eps=EPS, alpha=2.5 * EPS / STEPS, steps=STEPS, random_start=True)
        fns["torchattacks"] = lambda: ta(x, y)

    seconds = median_seconds(fns, device, args.reps)
    results = {"device": str(device), **{f"{k}_s": v for k, v in seconds.items()}}
    results.setdefault("torchattacks_s", None)
    print(f"floor ({STEPS} x fwd+bwd)           {seconds['floor']:.4f} s")
    print(f"medaudit pgd                   {seconds['pgd']:.4f} s")
    print(f"ART ProjectedGradientDescent   {seconds['art']:.4f} s")
    if torchattacks is None:
        print("torchattacks PGD               not installed (pip install --no-deps torchattacks)")
    else:
        print(f"torchattacks PGD               {seconds['torchattacks']:.4f} s")

    results.update(dense_pgd(device, args.reps))
    print(f"segmentation floor ({STEPS} x fwd+bwd) {results['seg_floor_s']:.4f} s")
    print(f"medaudit dense pgd (U-Net)       {results['seg_pgd_s']:.4f} s")

    if args.autoattack_images:
        results.update(autoattack_on_demo(device, args.autoattack_images))
        print(f"autoattack (standard) on {args.autoattack_images} demo images at 1/255: "
              f"{results['autoattack_s']:.1f} s, robust accuracy {results['autoattack_robust_accuracy']:.3f}")

    ratio = lambda a, b: None if a is None or b is None else round(a / b, 3)  # noqa: E731
    print(json.dumps({
        "device": results["device"],
        "floor_s": round(results["floor_s"], 5),
        "pgd_s": round(results["pgd_s"], 5),
        "pgd_over_floor": ratio(results["pgd_s"], results["floor_s"]),
        "art_over_pgd": ratio(results["art_s"], results["pgd_s"]),
        "torchattacks_over_pgd": ratio(results["torchattacks_s"], results["pgd_s"]),
        "seg_floor_s": round(results["seg_floor_s"], 5),
        "seg_pgd_s": round(results["seg_pgd_s"], 5),
        "seg_pgd_over_floor": ratio(results["seg_pgd_s"], results["seg_floor_s"]),
        "autoattack_s": results.get("autoattack_s"),
        "autoattack_robust_accuracy": results.get("autoattack_robust_accuracy"),
    }))


def dense_pgd(device: torch.device, reps: int) -> dict:
    """Dense PGD on a U-Net against steps x (forward + backward of the per-pixel loss)."""
    from medaudit.core.perturbation import per_sample_loss
    from medaudit.plugins.models.smp import SmpParams, build_smp

    torch.manual_seed(0)
    net = build_smp(SmpParams(arch="Unet", encoder="resnet18", in_channels=1, classes=5))
    model = prepare_for_audit(PixelSpaceModel(net, [0.5], [0.25], 1)).to(device)
    x = torch.rand(8, 1, 128, 128, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own labels, so the attack has something to break

    def floor():
        for _ in range(STEPS):
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(per_sample_loss(model(xg), y).sum(), xg)

    pgd = PGD(PGDParams(steps=STEPS))
    gen = torch.Generator(device=device).manual_seed(0)
    seconds = median_seconds(
        {"floor": floor, "pgd": lambda: pgd.perturb(model, x, y, eps=EPS, norm=Norm.LINF, generator=gen)}, device, reps
    )
    return {"seg_floor_s": seconds["floor"], "seg_pgd_s": seconds["pgd"]}


def autoattack_on_demo(device: torch.device, n: int) -> dict:
    """AutoAttack (standard settings) on the demo model, kept for comparison across versions."""
    from medaudit.core.components import Task
    from medaudit.plugins.attacks.autoattack import AutoAttack
    from medaudit.plugins.models.demo import DemoModel, DemoParams
    from medaudit.plugins.datasets.phantom import Phantom, PhantomParams

    model = DemoModel(DemoParams()).load(Task.CLASSIFICATION).module.to(device)
    data = Phantom(PhantomParams(n=n, size=64, seed=0)).load()
    x, y = data.images.to(device), data.labels.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    x_adv = AutoAttack().perturb(model, x, y, eps=1 / 255, norm=Norm.LINF, generator=gen)
    sync(device)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        accuracy = (model(x_adv).argmax(1) == y).float().mean().item()
    return {"autoattack_s": round(seconds, 2), "autoattack_robust_accuracy": round(accuracy, 4)}


if __name__ == "__main__":
    main()
