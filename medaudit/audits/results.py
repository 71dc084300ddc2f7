"""From per-sample records to results: metrics per group, worst case, validity, verdicts.

Everything here reads the run directory's records only, so results can be recomputed
from a run directory, and a resumed run gives the same results as an uninterrupted one.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from statistics import NormalDist, fmean
from typing import Any

from medaudit.audits.records import has_nonfinite_output, read_records
from medaudit.core.components import Metric, MetricValue, Norm
from medaudit.core.errors import ExitCode
from medaudit.core.host import Host
from medaudit.core.jobs import ADAPTIVE_SUFFIX, Job
from medaudit.core.segmentation import case_mean
from medaudit.core.spec import NO_DEFENSE, WORST_CASE, Criterion, Spec, epsilon_label

PASS, FAIL, INCONCLUSIVE, INVALID, WARN = "PASS", "FAIL", "INCONCLUSIVE", "INVALID", "WARN"
#: A validity check whose subject is absent from the audit (e.g. no FGSM to compare).
NOT_APPLICABLE = "N/A"
NOT_ASSESSED = "NOT ASSESSED"

VERDICT_EXIT_CODES = {
    PASS: ExitCode.PASS,
    FAIL: ExitCode.FAIL,
    INCONCLUSIVE: ExitCode.INCONCLUSIVE,
    INVALID: ExitCode.INVALID,
    NOT_ASSESSED: ExitCode.NO_DATA,
}

#: Slack for floating-point round-off when checking that a perturbation respects its budget.
BUDGET_TOLERANCE = 1e-5
#: Gap in a robust metric (absolute) above which one attack counts as stronger than another.
STRENGTH_TOLERANCE = 0.05
#: Iterative gradient attacks FGSM is compared with.
ITERATIVE_ATTACKS = frozenset({"pgd", "bim", "mifgsm", "tifgsm", "apgd-ce", "apgd-t", "autoattack"})
#: An L-inf budget at which any classifier should be nearly always fooled (methods.md 12, C17).
LARGE_LINF = 16 / 255


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good coverage at small n)."""
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


#: Bootstrap resamples for intervals on means over cases (seeded: results are reproducible).
BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: tuple[float, ...], confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over cases."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(BOOTSTRAP_RESAMPLES, len(data)))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def _value(mv: MetricValue | None, confidence: float) -> dict[str, Any] | None:
    if mv is None:
        return None
    out: dict[str, Any] = {"value": mv.value, "n": mv.n}
    if mv.successes is not None:
        low, high = wilson_interval(mv.successes, mv.n, confidence)
        out.update(successes=mv.successes, ci_low=low, ci_high=high, interval="wilson")
    elif mv.per_case is not None and len(mv.per_case) >= 2:
        low, high = bootstrap_interval(mv.per_case, confidence)
        out.update(ci_low=low, ci_high=high, interval="bootstrap")
    return out


def worst_case_records(per_attack: list[list[dict]]) -> list[dict]:
    """Merge the records of several attacks at one epsilon, per case. Classification: a
    sample is robust only if it survives every attack; a broken sample takes the record of
    the first attack that broke it. Segmentation: each case takes the record of the attack
    that left it the lowest Dice (robust Dice = minimum over the attacks)."""
    merged = []
    for rows in zip(*per_attack):
        if "adv_dice" in rows[0]:
            row = dict(min(rows, key=lambda r: case_mean(r["adv_dice"])))
            for key in ("target_dice", "target_pixel_accuracy", "target_changed", "target_hit"):
                row.pop(key, None)  # targets differ between attacks: no worst case
        else:
            broken = [r for r in rows if not r["adv_correct"]]
            row = dict(broken[0] if broken else rows[0])
        row["in_range"] = all(r["in_range"] for r in rows)
        merged.append(row)
    return merged


def per_class_table(records: list[dict], class_names: list[str]) -> list[dict]:
    """Mean Dice per class over cases, clean and under attack (segmentation rows)."""
    if not records or "adv_dice" not in records[0]:
        return []
    k = len(records[0]["adv_dice"])
    names = class_names if len(class_names) == k else [f"class {i}" for i in range(k)]
    return [
        {
            "class": names[c],
            "clean_dice": fmean(r["clean_dice"][c] for r in records),
            "dice": fmean(r["adv_dice"][c] for r in records),
        }
        for c in range(k)
    ]


def compute_results(
    spec: Spec, host: Host, jobs: list[Job], run_dir: Path, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Metrics per defense (clean) and per (defense, attack or worst case, epsilon)."""
    confidence, norm = spec.acceptance.confidence, spec.threat_model.norm
    metrics: dict[str, Metric] = {name: host.get("metric", name)() for name in spec.metrics}
    clean_metrics = {n: m for n, m in metrics.items() if m.clean}
    attack_metrics = {n: m for n, m in metrics.items() if not m.clean}

    records = {job.id: read_records(run_dir, job.id) for job in jobs}
    for job in jobs:
        for row in records[job.id]:
            row["attack"] = job.attack
    clean: dict[str, dict] = {}
    rows: list[dict[str, Any]] = []
    defenses = [NO_DEFENSE] + [d.label for d in spec.defenses]
    for defense in defenses:
        clean_job = next(j for j in jobs if j.defense == defense and j.is_clean)
        clean[defense] = {n: _value(m.compute(records[clean_job.id]), confidence) for n, m in clean_metrics.items()}
        for eps in spec.threat_model.epsilons:
            group = [j for j in jobs if j.defense == defense and not j.is_clean and j.epsilon == eps]
            for job in group:
                rows.append(_row(defense, job.attack, eps, norm, records[job.id], attack_metrics, confidence, class_names))
            merged = worst_case_records([records[j.id] for j in group])
            rows.append(_row(defense, WORST_CASE, eps, norm, merged, attack_metrics, confidence, class_names))
    curves = [
        robustness_curve(defense, job.attack, records[job.id])
        for defense in defenses
        for job in jobs
        if job.defense == defense and not job.is_clean and job.epsilon == max(spec.threat_model.epsilons)
        and any("min_norm" in r for r in records[job.id])
    ]
    return {"clean": clean, "rows": rows, "curves": curves, "records": records, "nonfinite": nonfinite_cases(jobs, records)}


def nonfinite_cases(jobs: list[Job], records: dict[str, list[dict]]) -> dict[tuple, int]:
    """Cases with a NaN or Inf output per scope of a criterion: ``(defense,)`` for the clean
    metrics, ``(defense, attack, epsilon)`` for an attack or the worst case; scopes without
    any are left out."""
    cases: dict[tuple, set] = {}
    for job in jobs:
        bad = {r["case"] for r in records[job.id] if has_nonfinite_output(r)}
        if bad:
            scopes = [(job.defense,)] if job.is_clean else [(job.defense, job.attack, job.epsilon), (job.defense, WORST_CASE, job.epsilon)]
            for scope in scopes:
                cases.setdefault(scope, set()).update(bad)
    return {scope: len(found) for scope, found in cases.items()}


def robustness_curve(defense: str, attack: str, records: list[dict], points: int = 11) -> dict:
    """Robust accuracy against epsilon from a minimum-norm attack's per-sample smallest
    perturbations: a sample is robust at eps if it is correct and its minimal perturbation
    is larger than eps (or none was found)."""
    sizes = [
        (float("inf") if r["min_norm"] is None else r["min_norm"]) if r["clean_correct"] else -1.0 for r in records
    ]
    finite = [s for s in sizes if 0 <= s < float("inf")]
    top = max(finite) if finite else 0.0
    grid = [top * i / (points - 1) for i in range(points)] if top > 0 else [0.0]
    return {
        "defense": defense,
        "attack": attack,
        "points": [[e, sum(s > e for s in sizes) / len(sizes)] for e in grid],
    }


def _row(
    defense: str, attack: str, eps: float, norm: Norm, records: list[dict], metrics: dict[str, Metric], confidence: float,
    class_names: list[str] | None,
) -> dict:
    row = {
        "defense": defense,
        "attack": attack,
        "epsilon": eps,
        "epsilon_label": epsilon_label(eps, norm),
        "metrics": {n: _value(m.compute(records), confidence) for n, m in metrics.items()},
    }
    table = per_class_table(records, class_names or [])
    if table:
        row["per_class"] = table
    detection = detection_summary(records)
    if detection:
        row["detection"] = detection
    return row


def detection_summary(records: list[dict]) -> dict | None:
    """A detector defense's separation of clean inputs from adversarial ones: AUROC and TPR
    at 5 % FPR (threshold from these clean scores), and the share its deployed threshold
    rejects, over the adversarial inputs that fool the classifier."""
    if not records or "clean_score" not in records[0]:
        return None
    import torch

    from medaudit.core.statistics import auroc, tpr_at_fpr

    clean = [r["clean_score"] for r in records]
    fooling = [r for r in records if r.get("adv_score") is not None and r["adv_pred"] != r["label"]]
    out: dict[str, Any] = {"n_clean": len(clean), "n_adversarial": len(fooling)}
    if fooling:
        adv = torch.tensor([r["adv_score"] for r in fooling])
        out.update(
            auroc=auroc(torch.tensor(clean), adv),
            tpr_at_5fpr=tpr_at_fpr(torch.tensor(clean), adv, 0.05),
            rejected=sum(r["adv_rejected"] for r in fooling) / len(fooling),
        )
    return out


# -- validity -------------------------------------------------------------------------


def validity_checks(
    spec: Spec, host: Host, jobs: list[Job], records: dict[str, list[dict]], rows: list[dict],
    gradient_health: dict[str, dict] | None = None, probe: dict[str, Any] | None = None,
) -> list[dict]:
    """Checks that the numbers can support a claim. ``gating`` failures make the audit INVALID.
    ``probe``: the runner's findings on the audited model (``deterministic``,
    ``weights_unchanged``, ``randomized`` as the spec declares it, ``cases`` probed)."""
    norm_field = "linf" if spec.threat_model.norm.value == "linf" else "l2"
    worst_excess, out_of_range = 0.0, 0
    for job in jobs:
        if job.is_clean:
            continue
        for r in records[job.id]:
            worst_excess = max(worst_excess, r[norm_field] - job.epsilon)
            out_of_range += not r["in_range"]
    budget_ok = worst_excess <= BUDGET_TOLERANCE and out_of_range == 0
    checks = [
        {
            "id": "budget_respected",
            "title": "Perturbations respect the budget and the valid range",
            "status": PASS if budget_ok else FAIL,
            "gating": True,
            "evidence": f"largest excess of the {norm_field} norm over epsilon: {worst_excess:.2e} "
            f"(tolerance {BUDGET_TOLERANCE:.0e}); adversarial inputs outside [0, 1]: {out_of_range}",
        }
    ]
    headline = "robust_dice" if spec.task.value == "segmentation" else "robust_accuracy"
    bumps = []
    for defense in sorted({r["defense"] for r in rows}):
        curve = [r for r in rows if r["defense"] == defense and r["attack"] == WORST_CASE]
        values = [(r["epsilon_label"], (r["metrics"].get(headline) or {}).get("value")) for r in curve]
        for (e0, v0), (e1, v1) in zip(values, values[1:]):
            if v0 is not None and v1 is not None and v1 > v0 + 1e-12:
                bumps.append(f"{defense}: {v0:.3f} at {e0} -> {v1:.3f} at {e1}")
    if headline in spec.metrics:
        checks += _attack_strength_checks(spec, host, jobs, rows, headline)
        checks.append(
            {
                "id": "epsilon_monotonic",
                "title": f"Worst-case {headline.replace('_', ' ')} does not rise with epsilon",
                "status": WARN if bumps else PASS,
                "gating": False,
                "evidence": "; ".join(bumps) if bumps else "non-increasing for every defense",
            }
        )
    checks.append(outputs_check(jobs, records))
    if probe is not None:
        checks += model_checks(probe)
    if gradient_health:
        checks.append(gradient_check(gradient_health))
    return checks


def outputs_check(jobs: list[Job], records: dict[str, list[dict]]) -> dict:
    """Gating: a NaN or Inf output is no prediction (its argmax is arbitrary); such cases
    count as errors, and a run that met any cannot support a claim."""
    problems = [f"{job.title()}: {n} of {len(records[job.id])} cases" for job in jobs
                if (n := sum(has_nonfinite_output(r) for r in records[job.id]))]
    return {
        "id": "outputs_finite", "title": "Model outputs are finite (no NaN or Inf)",
        "status": FAIL if problems else PASS, "gating": True,
        "evidence": "NaN or Inf outputs, counted as errors, in " + "; ".join(problems) if problems
        else "every output of every job was finite",
    }


def model_checks(probe: dict[str, Any]) -> list[dict]:
    """Gating: the audited model is one fixed function (Carlini et al. 2019). A model the
    load-time probe finds non-deterministic stops the run unless the spec declares it
    randomised; a randomised model needs attacks that average over its randomness (EOT),
    which medaudit does not have yet, so its audit cannot support a claim."""
    seen = (f"two forward passes on the first {probe['cases']} cases "
            + ("gave identical outputs" if probe["deterministic"] else "gave different outputs"))
    return [
        {
            "id": "model_deterministic", "title": "The model is deterministic",
            "status": FAIL if probe["randomized"] else PASS, "gating": True,
            "evidence": f"the spec declares a randomised model (model.randomized: true; {seen}): EOT is required, an "
            "attack that averages its gradients over the model's randomness, and no attack in medaudit does yet"
            if probe["randomized"] else seen,
        },
        {
            "id": "weights_unchanged", "title": "The model's weights did not change during the audit",
            "status": PASS if probe["weights_unchanged"] else FAIL, "gating": True,
            "evidence": "the sha256 of the model's parameters and buffers after the last job is the one before the first"
            if probe["weights_unchanged"] else "the model changed its own parameters or buffers during the jobs: the "
            "numbers mix different models",
        },
    ]


def _check(check_id: str, title: str, problems: list[str], ok: str, applicable: bool = True) -> dict:
    status = NOT_APPLICABLE if not applicable else WARN if problems else PASS
    return {"id": check_id, "title": title, "status": status, "gating": False,
            "evidence": "; ".join(problems) if problems else ok}


def _attack_strength_checks(spec: Spec, host: Host, jobs: list[Job], rows: list[dict], headline: str) -> list[dict]:
    """Carlini et al. (2019) sanity checks on the attacks' relative strength (methods.md 12:
    C4 iterative >= single-step, C5 white-box >= black-box, C10 naive vs adaptive, C3/C17
    large budgets). Each compares robust metrics of the same defense and budget; a gap
    counts when it exceeds ``STRENGTH_TOLERANCE`` (a fixed 5 points: with a few hundred
    cases, smaller gaps are within sampling noise)."""
    value = {(r["defense"], r["attack"], r["epsilon"]): (r["metrics"].get(headline) or {}).get("value") for r in rows}
    names = {j.attack: j.attack_name for j in jobs if not j.is_clean}
    needs = {label: host.get("attack", name).needs.value for label, name in names.items()}
    single, masked, blackbox = [], [], []
    for (defense, attack, eps), v in value.items():
        if v is None or attack == WORST_CASE:
            continue
        where = f"{defense}, eps {epsilon_label(eps, spec.threat_model.norm)}"
        if names.get(attack) == "fgsm":  # against the iterative attacks of the same view (naive or adaptive)
            view = attack.endswith(ADAPTIVE_SUFFIX)
            iterative = [(a, value.get((defense, a, eps))) for a, n in names.items()
                         if n in ITERATIVE_ATTACKS and a.endswith(ADAPTIVE_SUFFIX) == view]
            beaten = [(a, w) for a, w in iterative if w is not None and w > v + STRENGTH_TOLERANCE]
            single += [f"{where}: {attack} {v:.3f} < {a} {w:.3f}" for a, w in beaten]
        if attack.endswith(ADAPTIVE_SUFFIX):
            naive = value.get((defense, attack[: -len(ADAPTIVE_SUFFIX)], eps))
            if naive is not None and naive > v + STRENGTH_TOLERANCE:
                masked.append(f"{where}: naive {attack[: -len(ADAPTIVE_SUFFIX)]} {naive:.3f} vs adaptive {v:.3f}")
        if needs.get(attack) in ("scores", "decisions"):
            white = [w for (d, a, e), w in value.items()
                     if d == defense and e == eps and needs.get(a) == "gradients" and w is not None]
            if white and v + STRENGTH_TOLERANCE < min(white):
                blackbox.append(f"{where}: {attack} {v:.3f} < best white-box {min(white):.3f}")
    label = headline.replace("_", " ")
    has_pair = "fgsm" in names.values() and bool(ITERATIVE_ATTACKS & set(names.values()))
    has_blackbox = bool({"scores", "decisions"} & set(needs.values())) and "gradients" in needs.values()
    checks = [
        _check("iterative_beats_single_step", f"Iterative attacks do at least as well as FGSM ({label})", single,
               "no single-step attack beat an iterative one by more than 5 points" if has_pair
               else "FGSM and an iterative gradient attack are needed", applicable=has_pair),
        _check("whitebox_beats_blackbox", f"White-box attacks do at least as well as score- and decision-based ones ({label})",
               blackbox, "no gradient-free attack beat the best white-box attack by more than 5 points" if has_blackbox
               else "a gradient-free and a gradient attack are needed", applicable=has_blackbox),
    ]
    if any(j.adaptive for j in jobs):
        checks.append(_check(
            "naive_vs_adaptive", f"Naive attacks on defenses are not far weaker than adaptive ones ({label})", masked,
            "every naive attack came within 5 points of its adaptive twin",
        ))
    if spec.threat_model.norm.value == "linf" and spec.task.value == "classification":
        top = max(spec.threat_model.epsilons)
        high = [f"{d}: {v:.3f}" for (d, a, e), v in value.items() if a == WORST_CASE and e == top and v is not None and v > 0.1]
        checks.append(_check(
            "large_budget_breaks_model", "Robust accuracy falls towards 0 at large budgets",
            high if top >= LARGE_LINF else [],
            f"worst-case robust accuracy at eps {epsilon_label(top, Norm.LINF)} is at most 0.1 for every model"
            if top >= LARGE_LINF
            else f"the largest budget, {epsilon_label(top, Norm.LINF)}, is below {epsilon_label(LARGE_LINF, Norm.LINF)}",
            applicable=top >= LARGE_LINF,
        ))
    return checks


def gradient_check(gradient_health: dict[str, dict]) -> dict:
    """AutoAttack's zero-gradient flag (methods.md 12, C8) on the first batch of each model:
    all-zero gradients are a warning (masked gradients); non-finite ones fail the gate, since
    a gradient attack then steps along NaN."""
    problems = [
        f"{label}: {h['zero']} of {h['n']} inputs with an all-zero gradient, {h['nonfinite']} non-finite"
        for label, h in gradient_health.items() if h["zero"] or h["nonfinite"]
    ]
    check = _check("gradients_usable", "Input gradients are finite and non-zero", problems,
                   f"finite, non-zero input gradients for every model ({', '.join(gradient_health)})")
    nonfinite = any(h["nonfinite"] for h in gradient_health.values())
    return {**check, "status": FAIL if nonfinite else check["status"], "gating": True}


# -- acceptance -----------------------------------------------------------------------

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def judge(criterion: Criterion, value: dict | None, norm: Norm) -> dict[str, Any]:
    """Verdict of one criterion on the confidence bound on the patient's side (by default)."""
    statistic = criterion.statistic
    if statistic == "auto":
        statistic = "lower_bound" if criterion.op in (">=", ">") else "upper_bound"
    out: dict[str, Any] = {**criterion.model_dump(mode="json"), "statistic": statistic, "estimate": None}
    if criterion.epsilon is not None:
        out["epsilon_label"] = epsilon_label(criterion.epsilon, norm)
    if value is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": "no value: no sample in scope"}
    if statistic != "point" and "ci_low" not in value:
        statistic = out["statistic"] = "point"  # no interval for this metric
    compared = {"point": value["value"], "lower_bound": value.get("ci_low"), "upper_bound": value.get("ci_high")}[statistic]
    out.update(estimate=value["value"], ci_low=value.get("ci_low"), ci_high=value.get("ci_high"), n=value["n"], compared=compared)
    if value["n"] < criterion.min_n:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"n={value['n']} is below min_n={criterion.min_n}"}
    ok = _OPS[criterion.op](compared, criterion.threshold)
    return {**out, "verdict": PASS if ok else FAIL, "reason": ""}


def acceptance(spec: Spec, host: Host, computed: dict[str, Any], checks: list[dict]) -> dict[str, Any]:
    """Judge each criterion and the audit. A criterion whose scope held a case with a NaN or
    Inf output is INCONCLUSIVE: that case has no prediction to score."""
    judged = []
    for c in spec.acceptance.criteria:
        if host.get("metric", c.metric).clean:
            value = computed["clean"][c.defense].get(c.metric)
            scope: tuple = (c.defense,)
        else:
            row = next(
                r for r in computed["rows"]
                if r["defense"] == c.defense and r["attack"] == c.attack and abs(r["epsilon"] - c.epsilon) < 1e-12
            )
            value = row["metrics"].get(c.metric)
            scope = (row["defense"], row["attack"], row["epsilon"])
        judged.append(judge(c, value, spec.threat_model.norm))
        if nonfinite := computed.get("nonfinite", {}).get(scope):
            judged[-1].update(verdict=INCONCLUSIVE, reason=f"{nonfinite} case(s) in scope gave NaN or Inf outputs")
    blocking = [j["verdict"] for j in judged if j["severity"] == "blocking"]
    if any(ch["gating"] and ch["status"] == FAIL for ch in checks):
        verdict = INVALID
    elif not judged:
        verdict = NOT_ASSESSED
    elif FAIL in blocking:
        verdict = FAIL
    elif INCONCLUSIVE in blocking:
        verdict = INCONCLUSIVE
    else:
        verdict = PASS
    return {"criteria": judged, "verdict": verdict, "exit_code": int(VERDICT_EXIT_CODES[verdict])}
