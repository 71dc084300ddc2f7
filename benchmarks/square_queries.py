"""Model calls of Square with and without its early exit, on the trained demo model.

    python benchmarks/square_queries.py [--n 128] [--queries 1000] [--eps 8]

Square on the phantom cases at eps/255 (L-inf), once querying every sample on every
iteration (``early_exit: false``, earlier versions) and once only the samples not fooled
yet (the default, as the reference does). Prints the samples sent through the model, wall
and CPU time, robust accuracy of each, and whether the adversarials are the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=8.0, help="L-inf budget in grey levels (/255)")
    args = parser.parse_args()

    from medaudit.core.components import Norm, Task
    from medaudit.core.models import CallCounter
    from medaudit.core.phantoms import PhantomParams, make_phantoms
    from medaudit.plugins.attacks.autoattack import Square, SquareParams
    from medaudit.plugins.models.demo import DemoModel, DemoParams

    model = DemoModel(DemoParams()).load(Task.CLASSIFICATION).module.eval()  # the example's model, trained once, cached
    x, y, _ = make_phantoms(PhantomParams(n=args.n, size=64, seed=1))
    out = {}
    for early_exit in (False, True):
        counting = CallCounter(model)
        attack = Square(SquareParams(queries=args.queries, early_exit=early_exit))
        wall, cpu = time.perf_counter(), time.process_time()
        x_adv = attack.perturb(counting, x, y, eps=args.eps / 255, norm=Norm.LINF,
                               generator=torch.Generator().manual_seed(0))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with torch.no_grad():
            robust = float((model(x_adv).argmax(1) == y).float().mean())
        out[early_exit] = (counting.samples, wall, cpu, robust, x_adv)
        print(f"early_exit={early_exit!s:5s} samples through the model {counting.samples:8d}  wall {wall:6.2f} s  "
              f"cpu {cpu:6.2f} s  robust accuracy {robust:.4f}", flush=True)
    (a, wa, ca, ra, xa), (b, wb, cb, rb, xb) = out[False], out[True]
    print(f"early exit / every sample: model calls {b / a:.3f}, wall {wb / wa:.3f}, cpu {cb / ca:.3f}; "
          f"same robust accuracy: {ra == rb}; max |difference| of the adversarials {float((xa - xb).abs().max()):.2e}")


if __name__ == "__main__":
    main()
