"""AutoAttack against the reference implementation (fra31/auto-attack) on a 10-class problem.

    python benchmarks/autoattack_reference.py --reference DIR [--write]   # the reference (DIR holds `autoattack`)
    python benchmarks/autoattack_reference.py                           # medaudit, against the recorded numbers

The reference is not on PyPI and CI has no network, so its results are recorded once in
``tests/data/autoattack_reference.json`` (``--write``) with its commit, the command, the
torch version and the problem's fingerprints, and medaudit is compared against that file.
Problem: ``tests/reference_problem.py`` (a small CNN on 200 synthetic 16 x 16 images, 10
classes). For L-inf and L2, each at one epsilon where APGD-CE leaves about half the cases
robust: the standard version of the ensemble (APGD-CE, APGD-T, FAB-T, Square, each on the
cases still robust) and each member alone on the cases classified correctly, with the
standard version's settings (100 iterations, 1 restart, 9 target classes, Square with
p_init 0.8, 5000 queries and its schedule not rescaled; ``--queries`` cuts Square's
queries for both sides, recorded). Records per-case robust flags (1: still classified
correctly) so that a comparison counts the cases the two disagree on, not only the rates.
CPU, at most two threads; prints (and records) the wall time of each run, which follows the
machine's load more than the implementation on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medaudit.core.components import Attack, Norm  # noqa: E402
from tests.reference_problem import problem_fingerprints, ten_class_problem  # noqa: E402

RECORD = ROOT / "tests" / "data" / "autoattack_reference.json"
MEMBERS = ("apgd-ce", "apgd-t", "fab-t", "square")
#: Budgets where APGD-CE leaves roughly half of the cases robust on this problem.
EPSILONS = {Norm.LINF: 12 / 255, Norm.L2: 0.6}
EPS_TEXT = {Norm.LINF: "12/255", Norm.L2: "0.6"}
REFERENCE_NORM = {Norm.LINF: "Linf", Norm.L2: "L2"}


def within_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> bool:
    """Whether every adversarial lies in [0, 1] and in the eps-ball (float32 slack)."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    return bool((size <= eps * (1 + 1e-5) + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1)


def still_correct(model, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


# -- the reference ---------------------------------------------------------------------


def reference_commit(folder: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{folder} is not a git checkout: name its commit with --reference-commit") from None


def run_reference(model, x, y, norm: Norm, eps: float, queries: int) -> dict:
    """The reference's standard evaluation, then each member alone (as its
    ``run_standard_evaluation_individual``), each from a fresh ``AutoAttack`` with seed 0."""
    from autoattack import AutoAttack

    runs = {}
    for name in ("autoattack", *MEMBERS):
        attack = AutoAttack(model, norm=REFERENCE_NORM[norm], eps=eps, version="standard", seed=0, device="cpu",
                            verbose=False)
        attack.square.n_queries = queries
        if name != "autoattack":
            attack.attacks_to_run = [name]
        start = time.perf_counter()
        x_adv = attack.run_standard_evaluation(x, y, bs=len(x))
        seconds = time.perf_counter() - start
        if not within_budget(x_adv, x, eps, norm):
            print(f"WARNING: reference {name} left [0, 1] or the {norm.value} ball of radius {eps}", flush=True)
        runs[name] = (still_correct(model, x_adv, y), seconds)
        print(f"  reference {name:10s} robust accuracy {runs[name][0].float().mean():.3f}  {seconds:7.1f} s",
              flush=True)
    return runs


def write_record(path: Path, record: dict) -> None:
    """Indented JSON with each list of per-case flags on one line."""
    text = json.dumps(record, indent=2)
    text = re.sub(r"\[\s+((?:[01],\s+)*[01])\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def record_reference(args, model, x, y, clean: torch.Tensor) -> None:
    sys.path.insert(0, str(args.reference.resolve()))
    record = {
        "reference": {"repository": "https://github.com/fra31/auto-attack",
                      "commit": reference_commit(args.reference, args.reference_commit)},
        "command": " ".join(["python benchmarks/autoattack_reference.py", "--reference DIR",
                             *(["--reference-commit", args.reference_commit] if args.reference_commit else []),
                             *(["--queries", str(args.queries)] if args.queries != 5000 else []), "--write"]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "problem": {"builder": "tests.reference_problem.ten_class_problem", "seed": 0, "n": len(y),
                    "clean_accuracy": round(clean.float().mean().item(), 4), **problem_fingerprints(model, x, y)},
        "settings": {"version": "standard", "seed": 0, "apgd_iterations": 100, "apgd_restarts": 1,
                     "n_target_classes": 9, "fab_iterations": 100, "fab_restarts": 1, "square_queries": args.queries,
                     "square_p_init": 0.8, "square_rescale_schedule": False},
        "runs": {},
    }
    for norm in args.norms:
        print(f"{norm.value} at eps {EPS_TEXT[norm]}", flush=True)
        runs = run_reference(model, x, y, norm, EPSILONS[norm], args.queries)
        record["runs"][norm.value] = {
            "eps": EPSILONS[norm],
            "eps_text": EPS_TEXT[norm],
            "robust_accuracy": {name: round(flags.float().mean().item(), 4) for name, (flags, _) in runs.items()},
            "seconds": {name: round(seconds, 1) for name, (_, seconds) in runs.items()},
            "robust": {name: flags.int().tolist() for name, (flags, _) in runs.items()},
        }
    if args.write:
        write_record(args.record, record)
        print(f"wrote {args.record.relative_to(ROOT) if args.record.is_relative_to(ROOT) else args.record}")


# -- medaudit ----------------------------------------------------------------------------


def medaudit_attacks(queries: int) -> dict[str, Attack]:
    """medaudit's members with the reference's standard settings (their defaults) and the
    ensemble in its standard version."""
    from medaudit.plugins.attacks.autoattack import APGDCE, APGDT, AutoAttack, AutoAttackParams, Square, SquareParams
    from medaudit.plugins.attacks.fab import FABT

    return {
        "apgd-ce": APGDCE(), "apgd-t": APGDT(), "fab-t": FABT(),
        "square": Square(SquareParams(queries=queries, rescale_schedule=False)),
        "autoattack": AutoAttack(AutoAttackParams(version="standard", square_queries=queries)),
    }


def compare(args, model, x, y, clean: torch.Tensor) -> None:
    record = json.loads(args.record.read_text(encoding="utf-8"))
    recorded = record["problem"]
    mine = problem_fingerprints(model, x, y)
    for key, value in mine.items():
        if recorded[key] != value:
            print(f"WARNING: {key} differs from the record ({value} here, {recorded[key]} recorded): the problem was "
                  "not rebuilt bit for bit, so the numbers below compare different models or data", flush=True)
    queries = record["settings"]["square_queries"]
    attacks = medaudit_attacks(queries)
    ensemble = attacks["autoattack"]
    members = [type(m).name for m in ensemble.members()] if hasattr(ensemble, "members") else []
    print(f"reference {record['reference']['commit'][:7]} (torch {record['torch']}), medaudit on torch "
          f"{torch.__version__}; square queries {queries}; medaudit ensemble: {' -> '.join(members)}", flush=True)
    idx = clean.nonzero().squeeze(1)
    header = ("robust accuracy; 'ref only': cases robust under the reference's attack only, 'ours only': under "
              "medaudit's only; seconds of each run\n"
              f"{'member':11s} {'reference':>9s} {'medaudit':>9s} {'diff pts':>8s} {'ref only':>8s} "
              f"{'ours only':>9s} {'ref s':>7s} {'ours s':>7s}")
    for norm in args.norms:
        run = record["runs"][norm.value]
        eps = run["eps"]
        rows = []
        for name in (*MEMBERS, "autoattack"):
            if name not in attacks:
                rows.append(f"{name:11s} {run['robust_accuracy'][name]:9.3f} {'-':>9s}")
                continue
            start = time.perf_counter()
            result = attacks[name].perturb(model, x[idx], y[idx], eps=eps, norm=norm,
                                           generator=torch.Generator().manual_seed(0))
            x_adv = getattr(result, "adversarial", result)  # a bare tensor or an AttackOutcome
            seconds = time.perf_counter() - start
            ok = "" if within_budget(x_adv, x[idx], eps, norm) else "  OUTSIDE THE BUDGET"
            robust = torch.zeros_like(clean)
            robust[idx] = still_correct(model, x_adv, y[idx])
            reference = torch.tensor(run["robust"][name], dtype=torch.bool)
            ref_acc, acc = reference.float().mean().item(), robust.float().mean().item()
            rows.append(f"{name:11s} {ref_acc:9.3f} {acc:9.3f} {100 * (acc - ref_acc):+8.1f} "
                        f"{int((reference & ~robust).sum()):8d} {int((robust & ~reference).sum()):9d} "
                        f"{run['seconds'][name]:7.1f} {seconds:7.1f}{ok}")
            print(f"  {norm.value} {name} done in {seconds:.1f} s", flush=True)
        print(f"\n{norm.value} at eps {run['eps_text']} (clean accuracy {clean.float().mean():.3f})\n{header}")
        print("\n".join(rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="folder holding the reference's `autoattack` package: run it")
    parser.add_argument("--reference-commit", help="the reference's commit, when --reference is not a git checkout")
    parser.add_argument("--write", action="store_true", help="with --reference: write the record")
    parser.add_argument("--queries", type=int, default=5000, help="Square's queries (reference run; medaudit reads "
                        "them from the record)")
    parser.add_argument("--norms", nargs="+", type=Norm, default=[Norm.LINF, Norm.L2], choices=[Norm.LINF, Norm.L2],
                        metavar="{linf,l2}")
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--threads", type=int, default=2, choices=[1, 2])
    args = parser.parse_args()
    if args.write and args.reference is None:
        parser.error("--write needs --reference")
    if args.write and args.norms != [Norm.LINF, Norm.L2]:
        parser.error("--write records both norms")

    start = time.perf_counter()
    model, x, y = ten_class_problem(seed=0)
    torch.set_num_threads(args.threads)
    clean = still_correct(model, x, y)
    print(f"problem built in {time.perf_counter() - start:.1f} s: {len(y)} cases, clean accuracy "
          f"{clean.float().mean():.3f}, {args.threads} threads", flush=True)
    if args.reference is not None:
        record_reference(args, model, x, y, clean)
    else:
        compare(args, model, x, y, clean)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
