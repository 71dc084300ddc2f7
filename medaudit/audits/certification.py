"""Certified results (the report guide's section 11, ISO/IEC 24029-2): every case certified by
each defense that gives certificates (:attr:`~medaudit.core.components.Defense.certifies`,
e.g. randomized smoothing), the certified accuracy against the L2 radius, and the defense's
caveats. Certificates are kept in ``certified/`` of the run directory, so a resumed run
reads them back instead of certifying again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medaudit.audits import rundir
from medaudit.core.components import Norm
from medaudit.core.smoothing import certified_accuracy

#: Radii between 0 and the largest certificate at which the curve is given, besides the L2 budgets.
CURVE_POINTS = 20


def certify_defenses(session, data, spec, run_dir: Path, batch_size: int, console=None) -> dict[str, dict]:
    """Per certifying defense: its certificates on every case (computed on the undefended
    model, so nothing is smoothed twice; seeded per batch), the certified accuracy at the
    spec's L2 budgets and at :data:`CURVE_POINTS` radii up to the largest certificate, its
    settings and caveats. ``console``: where to say that a long certification started."""
    found = {}
    for ref in spec.defenses:
        defense = session.defenses[ref.label][0]
        if not defense.certifies:
            continue
        path = run_dir / "certified" / f"{ref.label}.json"
        if path.is_file():
            found[ref.label] = json.loads(path.read_text(encoding="utf-8"))
            continue
        if console is not None:
            console.print(f"certifying {ref.label} on {len(data)} cases")
        rows, labels, settings = [], [], {}
        started = time.perf_counter()
        for start, x, y in data.batches(0, len(data), batch_size, task=spec.task):
            generator = torch.Generator(device=session.device).manual_seed(spec.runtime.seed + start)
            certificate = defense.certify(session.model, x.to(session.device), generator)
            rows += certificate.rows()
            labels += y.tolist()
            settings = certificate.settings()
        radii = torch.tensor([r["radius"] for r in rows], dtype=torch.float64)
        predictions = torch.tensor([r["prediction"] for r in rows])
        largest = float(radii.max()) if len(radii) else 0.0
        budgets = [e for e in spec.threat_model.epsilons if spec.threat_model.norm is Norm.L2]
        grid = sorted({0.0, *budgets, *(round(largest * k / CURVE_POINTS, 6) for k in range(1, CURVE_POINTS + 1))})
        curve = certified_accuracy(radii, predictions, torch.tensor(labels), grid)
        found[ref.label] = {
            "method": "randomized smoothing (Cohen et al. 2019), CERTIFY with a Clopper-Pearson bound",
            "norm": "l2", **settings, "caveats": defense.caveats(), "cases": len(rows),
            "abstained": sum(r["prediction"] < 0 for r in rows),
            "correct": sum(r["prediction"] == t for r, t in zip(rows, labels)),
            "radius_median": float(radii.median()) if len(radii) else None,
            "curve": [[float(r), float(a)] for r, a in curve],
            "seconds": round(time.perf_counter() - started, 3),
            "cases_detail": [{"case": c, **r, "truth": t} for c, r, t in zip(data.case_ids, rows, labels)],
        }
        with rundir.atomic_file(path, "w") as out:
            json.dump(found[ref.label], out)
    return found
