"""Model calls and time of DeepFool stepping every sample vs only the samples not fooled yet.

    python benchmarks/deepfool_calls.py [--n 96] [--steps 50] [--repeats 5] [--norm l2 linf]

DeepFool's minimal search on the trained demo model (``medaudit.testing.tiny``), once with
the loop of earlier versions (``before``, kept in tests/reference_deepfool.py: every step
runs the model forward and backward on the whole batch and masks the fooled samples' steps) and once with the attack
as it is (``after``: each step runs only the samples not fooled yet). The two run in turns,
``repeats`` times (the order alternates), on one thread with a passive OpenMP wait policy,
so that neither profits from a warmer machine. Prints the samples sent through the model
(forward calls, counted by :class:`~medaudit.core.models.CallCounter`), the median wall and
CPU time of each, their ratios, and how far the two results are apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="phantom cases (one batch)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--overshoot", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--norm", nargs="+", default=["l2", "linf"], choices=["l2", "linf"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from medaudit.core.components import Norm
    from medaudit.core.models import CallCounter
    from medaudit.plugins.attacks.minimum_norm import DeepFool, DeepFoolParams
    from medaudit.testing import tiny
    from tests.reference_deepfool import deepfool_every_sample

    model = tiny.demo_model().module  # trained once, then read from the model cache
    data = tiny.phantom_data(n=args.n)
    x, y = data.images, data.labels
    params = DeepFoolParams(steps=args.steps, overshoot=args.overshoot)
    attack = DeepFool(params)
    variants = {
        "before": lambda m, norm: deepfool_every_sample(m, x, y, norm=norm, steps=params.steps,
                                                        overshoot=params.overshoot, candidates=params.candidates),
        "after": lambda m, norm: attack.minimal(m, x, y, norm=norm, generator=torch.Generator()),
    }
    print(f"deepfool on {args.n} demo cases, {args.steps} steps, overshoot {args.overshoot}, {args.repeats} repeats "
          f"interleaved, 1 thread, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
    for norm in map(Norm, args.norm):
        samples, walls, cpus, results = {}, {k: [] for k in variants}, {k: [] for k in variants}, {}
        for rep in range(args.repeats):
            for name in list(variants) if rep % 2 == 0 else list(variants)[::-1]:
                counting = CallCounter(model)
                wall, cpu = time.perf_counter(), time.process_time()
                results[name] = variants[name](counting, norm)
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
                samples[name] = counting.samples
        with torch.inference_mode():
            fooled = {name: model(x_adv).argmax(1) != y for name, x_adv in results.items()}
        wall = {k: statistics.median(v) for k, v in walls.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        for name in variants:
            print(f"{norm.value:4s} {name:6s} samples through the model {samples[name]:6d}  wall {wall[name]:6.3f} s  "
                  f"cpu {cpu[name]:6.3f} s  fooled {int(fooled[name].sum())}/{args.n}", flush=True)
        diff = float((results["after"] - results["before"]).abs().max())
        print(f"{norm.value:4s} after / before: model calls {samples['after'] / samples['before']:.3f}, "
              f"wall {wall['after'] / wall['before']:.3f}, cpu {cpu['after'] / cpu['before']:.3f}; "
              f"same fooled cases: {bool(torch.equal(fooled['after'], fooled['before']))}; "
              f"max |difference| of the adversarials {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
