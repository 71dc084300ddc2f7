"""From per-sample records to the numbers of results.json: metrics per group (a job, or the
worst case over the attacks at one budget), the per-class table, the robustness curve of
a minimum-norm attack, a detector's separation, the cases with NaN or Inf outputs and the
metrics per subgroup of cases that share a covariate value (site, sex, lesion size...).

What a group's records hold is read from the facets they declare (:class:`Facet`), never
from the keys of a record: a metric is computed on a group only when its records declare
every facet the metric ``needs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from typing import Any, Sequence

from medaudit.audits.records import has_nonfinite_output, read_records
from medaudit.audits.statistics import BOOTSTRAP, WILSON, metric_value
from medaudit.core.components import Facet, Metric, MetricValue, Norm
from medaudit.core.host import Host
from medaudit.core.jobs import CLEAN, Job, Records
from medaudit.core import rates as class_counts
from medaudit.core.spec import NO_DEFENSE, WORST_CASE, Spec, epsilon_label, level_label
from medaudit.core.tasks import protocol


def facets_of(records: Sequence[dict]) -> frozenset[Facet]:
    """The facets a group's records declare (a plain list declares none)."""
    return getattr(records, "facets", frozenset())


def applies(metric: Metric | type[Metric], records: Sequence[dict]) -> bool:
    """Do the records declare every facet the metric needs?"""
    return metric.needs <= facets_of(records)


def compute_metric(
    metric: Metric, records: Sequence[dict], confidence: float, proportion: str = WILSON, mean: str = BOOTSTRAP
) -> dict[str, Any] | None:
    """A metric's value on a group as results.json keeps it; None when the group's records
    lack a facet it needs (or it has no value there)."""
    if not applies(metric, records):
        return None
    return metric_value(metric.compute(records), confidence, proportion, mean)


def interval_choice(spec: Spec) -> tuple[str, str]:
    """The intervals the spec asks for: on proportions and on means over cases."""
    return spec.acceptance.proportion_interval, spec.acceptance.mean_interval


def compute_results(
    spec: Spec, host: Host, jobs: list[Job], run_dir: Path, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Metrics per defense (clean) and per (defense, attack or worst case, epsilon)."""
    confidence, norm = spec.acceptance.confidence, spec.threat_model.norm
    intervals = interval_choice(spec)
    metrics: dict[str, Metric] = {name: host.get("metric", name)() for name in spec.metrics}
    clean_metrics = {n: m for n, m in metrics.items() if m.clean}
    attack_metrics = {n: m for n, m in metrics.items() if not m.clean}
    task = protocol(spec.task)

    records = {job.id: read_records(run_dir, job.id) for job in jobs}
    for job in jobs:
        for row in records[job.id]:
            row["attack"] = job.attack
    clean: dict[str, dict] = {}
    clean_rates: dict[str, dict] = {}
    rows: list[dict[str, Any]] = []
    clean_records: dict[str, Records] = {}
    worst: dict[tuple[str, float], Records] = {}
    defenses = [NO_DEFENSE] + [d.label for d in spec.defenses]
    for defense in defenses:
        clean_job = next(j for j in jobs if j.defense == defense and j.is_clean)
        clean[defense] = {n: compute_metric(m, records[clean_job.id], confidence, *intervals) for n, m in clean_metrics.items()}
        clean_records[defense] = records[clean_job.id]
        if rates := class_rates(records[clean_job.id], class_names or [], "clean", confidence, intervals):
            clean_rates[defense] = rates
        attacked = [j for j in jobs if j.defense == defense and not j.is_clean]
        for eps in spec.threat_model.epsilons:
            group = [j for j in attacked if not j.budget and j.epsilon == eps]
            if not group:  # every attack is sized by its own budget: no norm-bounded row
                continue
            for job in group:
                rows.append(group_row(defense, job.attack, eps, norm, records[job.id], attack_metrics, confidence,
                                      class_names, intervals, view=job.view, spec_attack=job.spec_attack))
            merged = task.worst_case([records[j.id] for j in group])
            rows.append(group_row(defense, WORST_CASE, eps, norm, merged, attack_metrics, confidence, class_names,
                                  intervals, view=None, spec_attack=WORST_CASE))
            worst[defense, eps] = merged
        for job in (j for j in attacked if j.budget):  # sized by their own budget: no worst case with the norm attacks
            rows.append(group_row(defense, job.attack, job.epsilon, norm, records[job.id], attack_metrics, confidence,
                                  class_names, intervals, view=job.view, spec_attack=job.spec_attack, budget=job.budget))
    curves = [
        robustness_curve(defense, job.attack, records[job.id])
        for defense in defenses
        for job in jobs
        if job.defense == defense and not job.is_clean and not job.budget and job.epsilon == max(spec.threat_model.epsilons)
        and Facet.MINIMUM_NORM in facets_of(records[job.id]) and records[job.id]
    ]
    subgroups = subgroup_rows(clean_records, worst, norm, clean_metrics, attack_metrics, confidence, intervals)
    return {"clean": clean, "clean_class_rates": clean_rates, "rows": rows, "curves": curves, "subgroups": subgroups,
            "records": records,
            "nonfinite": nonfinite_cases(jobs, records)}


#: A covariate with more distinct values than this (a case identifier, an exact age) is not
#: grouped by: its subgroups would be too small to say anything.
MAX_SUBGROUPS = 20


def covariate_values(records: Sequence[dict]) -> dict[str, list]:
    """Each covariate the records declare (facet COVARIATES) and its values, sorted (numbers,
    then text, then None for cases that lack it); covariates with more than
    :data:`MAX_SUBGROUPS` values are left out."""
    if Facet.COVARIATES not in facets_of(records):
        return {}
    names = sorted({name for r in records for name in r["covariates"]})
    values = {name: {_hashable(r["covariates"].get(name)) for r in records} for name in names}
    return {name: sorted(found, key=_value_order) for name, found in values.items() if len(found) <= MAX_SUBGROUPS}


def _hashable(value: Any) -> Any:
    """A covariate value as a grouping key: a list or a mapping becomes its JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _value_order(value: Any) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def subgroup_rows(
    clean: dict[str, Records], worst: dict[tuple[str, float], Records], norm: Norm, clean_metrics: dict[str, Metric],
    attack_metrics: dict[str, Metric], confidence: float, intervals: tuple[str, str] = (WILSON, BOOTSTRAP),
) -> list[dict]:
    """The metrics of every subgroup of cases sharing a covariate value: the clean metrics on
    each defense's clean job (attack ``clean``, epsilon 0) and the attack metrics on its
    worst case at each epsilon, with the same intervals as the whole data set and the
    subgroup's size ``n`` (small subgroups keep their row, and their wide interval shows it).
    A metric relative to the data set (the broken-case rate's mean clean Dice) is relative
    to the subgroup here. Empty when the records declare no covariates."""
    groups = [(d, CLEAN, 0.0, recs, clean_metrics) for d, recs in clean.items()]
    groups += [(d, WORST_CASE, eps, recs, attack_metrics) for (d, eps), recs in worst.items()]
    values = covariate_values(next(iter(clean.values()), Records()))
    out = []
    for name, found in values.items():
        for value in found:
            for defense, attack, eps, recs, metrics in groups:
                if Facet.COVARIATES not in facets_of(recs) or not metrics:
                    continue
                subset = Records([r for r in recs if _hashable(r["covariates"].get(name)) == value], recs.facets)
                out.append({
                    "covariate": name, "value": value, "defense": defense, "attack": attack, "epsilon": eps,
                    "epsilon_label": epsilon_label(eps, norm), "n": len(subset),
                    "metrics": {n: compute_metric(m, subset, confidence, *intervals) if subset else None
                                for n, m in metrics.items()},
                })
    return out


def group_row(
    defense: str, attack: str, eps: float, norm: Norm, records: Records | list[dict], metrics: dict[str, Metric],
    confidence: float, class_names: list[str] | None, intervals: tuple[str, str] = (WILSON, BOOTSTRAP), *,
    view: str | None = None, spec_attack: str | None = None, budget: str = "",
) -> dict:
    """One results row: the group's metrics, and its per-class table and detection summary
    where its records have them. ``view`` and ``spec_attack`` say which attack of the spec
    ran against which view of the defense (None and ``worst_case`` for the worst case), so
    readers never parse the display label ``attack``. The row of an attack sized by its own
    budget names it (``budget``), and its ``epsilon`` is that budget's level."""
    row = {
        "defense": defense,
        "attack": attack,
        "epsilon": eps,
        "epsilon_label": level_label(eps, budget) if budget else epsilon_label(eps, norm),
        "view": view,
        "spec_attack": spec_attack if spec_attack is not None else attack,
        "metrics": {n: compute_metric(m, records, confidence, *intervals) for n, m in metrics.items()},
    }
    if budget:
        row["budget"] = budget
        if effect := corruption_effect(records, confidence, intervals):
            row["corruption"] = effect
    if seen := perceptibility(records):
        row["perceptibility"] = seen
    table = per_class_table(records, class_names or [])
    if table:
        row["per_class"] = table
    rates = class_rates(records, class_names or [], "adv", confidence, intervals)
    if rates:
        row["class_rates"] = rates
    detection = detection_summary(records)
    if detection:
        row["detection"] = detection
    return row


def per_class_table(records: Sequence[dict], class_names: list[str]) -> list[dict]:
    """Mean Dice per class over cases, clean and under attack (segmentation records)."""
    if not records or Facet.SEGMENTATION not in facets_of(records):
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


def perceptibility(records: Sequence[dict]) -> dict | None:
    """How visible the changes are: mean SSIM and mean PSNR (dB; a case left unchanged has no
    finite PSNR and is left out of that mean) against the clean images, over the n cases
    the attack or corruption ran on."""
    if Facet.PERCEPTIBILITY not in facets_of(records):
        return None
    measured = [r for r in records if r["attacked"] and r["ssim"] is not None]
    if not measured:
        return None
    decibels = [r["psnr"] for r in measured if r["psnr"] is not None]
    return {"n": len(measured), "ssim_mean": fmean(r["ssim"] for r in measured),
            "psnr_mean": fmean(decibels) if decibels else None}


def corruption_effect(records: Sequence[dict], confidence: float,
                      intervals: tuple[str, str] = (WILSON, BOOTSTRAP)) -> dict | None:
    """What a corruption did over its draws: the typical result beside the worst-of-k figure
    the metrics give (classification: the share of draws classified correctly, a case wrong
    when clean counting 0; segmentation: the mean Dice over the draws), and the strength its
    severity applied. None for records without a corruption's extras."""
    if Facet.EXTRAS not in facets_of(records):
        return None
    changed = [r["extras"] for r in records if r["attacked"] and r["extras"].get("corruption_strength") is not None]
    if not changed:
        return None
    typical = [r["extras"]["draws_mean"] if r["attacked"] and r["extras"].get("draws_mean") is not None
               else float(bool(r.get("adv_correct"))) for r in records]
    return {
        "strength": changed[0]["corruption_strength"],
        "draws_mean": metric_value(MetricValue(value=fmean(typical), n=len(typical), per_case=tuple(typical)),
                                   confidence, *intervals),
    }


def corruption_errors(rows: list[dict], clean: dict, baseline: dict, name: str, metric: str,
                      clean_metric: str) -> dict | None:
    """Each corruption's error normalised to a reference run's (Hendrycks & Dietterich 2019):
    CE = sum over severities of the error (1 - ``metric``) over the same sum of the
    reference, relative CE the same on the drop from each model's clean error, and their
    means over the corruptions (mCE). Severities both runs have count; undefended model."""
    def errors(found: list[dict]) -> dict[tuple[str, float], float]:
        return {(r["attack"], r["epsilon"]): 1 - r["metrics"][metric]["value"] for r in found
                if r.get("corruption") and r["defense"] == NO_DEFENSE and (r["metrics"].get(metric) or {}).get("value") is not None}

    ours, theirs = errors(rows), errors(baseline.get("rows", []))
    clean_ours = 1 - ((clean.get(NO_DEFENSE) or {}).get(clean_metric) or {}).get("value", 1.0)
    clean_theirs = 1 - ((baseline.get("clean", {}).get(NO_DEFENSE) or {}).get(clean_metric) or {}).get("value", 1.0)
    out = []
    for attack in dict.fromkeys(a for a, _ in ours):
        shared = [key for key in ours if key[0] == attack and key in theirs]
        if not shared:
            continue
        reference = sum(theirs[k] for k in shared)
        drop = sum(theirs[k] - clean_theirs for k in shared)
        out.append({"attack": attack, "levels": [e for _, e in shared],
                    "ce": sum(ours[k] for k in shared) / reference if reference > 0 else None,
                    "relative_ce": sum(ours[k] - clean_ours for k in shared) / drop if drop > 0 else None})
    if not out:
        return None
    ces, relatives = [c["ce"] for c in out if c["ce"] is not None], [c["relative_ce"] for c in out if c["relative_ce"] is not None]
    return {"baseline": name, "metric": metric, "corruptions": out,
            "mce": fmean(ces) if ces else None, "relative_mce": fmean(relatives) if relatives else None,
            "same_data": baseline.get("fingerprints", {}).get("data_sha256")}


def class_rates(records: Sequence[dict], class_names: list[str], side: str, confidence: float,
                intervals: tuple[str, str] = (WILSON, BOOTSTRAP)) -> dict | None:
    """The direction of errors (classification records): the confusion matrix (rows: true
    class, columns: the answer; a NaN/Inf output or a rejected input answers none, the last
    column) and each class's sensitivity, specificity and false-negative rate with
    intervals, clean (``side`` "clean") or under attack ("adv")."""
    if not records or Facet.CLASSIFICATION not in facets_of(records):
        return None
    k = max(len(class_names), 1 + max(max(r["label"], r["clean_pred"], r["adv_pred"]) for r in records))
    names = class_names if len(class_names) == k else [f"class {i}" for i in range(k)]
    confusion = [[0] * (k + 1) for _ in range(k)]
    for r in records:
        answer = next((c for c in range(k) if class_counts.answers(r, c, side)), k)
        confusion[r["label"]][answer] += 1

    def rate(flags: list[bool], flip: bool = False) -> dict | None:
        if not flags:
            return None
        hits = sum(flags) if not flip else len(flags) - sum(flags)
        return metric_value(MetricValue(value=hits / len(flags), n=len(flags), successes=hits), confidence, *intervals)

    classes = []
    for c in range(k):
        found, spared = class_counts.found(records, c, side), class_counts.spared(records, c, side)
        classes.append({"class": names[c], "n": sum(confusion[c]), "sensitivity": rate(found),
                        "specificity": rate(spared), "false_negative_rate": rate(found, flip=True)})
    return {"classes": names, "confusion": confusion, "rates": classes}


def robustness_curve(defense: str, attack: str, records: Sequence[dict], points: int = 11) -> dict:
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


def detection_summary(records: Sequence[dict]) -> dict | None:
    """A detector defense's separation of clean inputs from adversarial ones: AUROC and TPR
    at 5 % FPR (threshold from these clean scores), and the share its deployed threshold
    rejects, over the adversarial inputs that fool the classifier."""
    if not records or not {Facet.DETECTION_SCORE, Facet.REJECTION} <= facets_of(records):
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


def nonfinite_cases(jobs: list[Job], records: dict[str, list[dict]]) -> dict[tuple, int]:
    """Cases with a NaN or Inf output per scope of a criterion: ``(defense,)`` for the clean
    metrics, ``(defense, attack, epsilon)`` for an attack or the worst case; scopes without
    any are left out."""
    cases: dict[tuple, set] = {}
    for job in jobs:
        bad = {r["case"] for r in records[job.id] if has_nonfinite_output(r)}
        if bad:
            scopes = ([(job.defense,)] if job.is_clean else [(job.defense, job.attack, job.epsilon)]
                      + ([] if job.budget else [(job.defense, WORST_CASE, job.epsilon)]))
            for scope in scopes:
                cases.setdefault(scope, set()).update(bad)
    return {scope: len(found) for scope, found in cases.items()}
