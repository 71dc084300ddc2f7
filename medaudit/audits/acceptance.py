"""Acceptance: each criterion of the spec judged on its confidence bound, and the audit's
verdict from the criteria and the gating validity checks."""

from __future__ import annotations

import operator
from typing import Any

from medaudit.core.components import Norm
from medaudit.core.errors import ExitCode
from medaudit.core.host import Host
from medaudit.core.spec import Criterion, Spec, attack_levels, epsilon_label, level_label

PASS, FAIL, INCONCLUSIVE, INVALID = "PASS", "FAIL", "INCONCLUSIVE", "INVALID"
NOT_ASSESSED = "NOT ASSESSED"

VERDICT_EXIT_CODES = {
    PASS: ExitCode.PASS,
    FAIL: ExitCode.FAIL,
    INCONCLUSIVE: ExitCode.INCONCLUSIVE,
    INVALID: ExitCode.INVALID,
    NOT_ASSESSED: ExitCode.NO_DATA,
}

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def judge(criterion: Criterion, value: dict | None, norm: Norm, budget: str = "") -> dict[str, Any]:
    """Verdict of one criterion on the confidence bound on the patient's side (by default).
    ``budget``: the name of the criterion's attack's own budget, when no norm bounds it."""
    statistic = criterion.statistic
    if statistic == "auto":
        statistic = "lower_bound" if criterion.op in (">=", ">") else "upper_bound"
    out: dict[str, Any] = {**criterion.model_dump(mode="json"), "statistic": statistic, "estimate": None}
    if criterion.epsilon is not None:
        out["epsilon_label"] = level_label(criterion.epsilon, budget) if budget else epsilon_label(criterion.epsilon, norm)
    if value is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": "no value: no sample in scope"}
    if statistic != "point" and value.get("ci_low") is None:
        statistic = out["statistic"] = "point"  # no interval for this metric
    compared = {"point": value["value"], "lower_bound": value.get("ci_low"), "upper_bound": value.get("ci_high")}[statistic]
    out.update(estimate=value["value"], ci_low=value.get("ci_low"), ci_high=value.get("ci_high"), n=value["n"], compared=compared)
    if value["n"] < criterion.min_n:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"n={value['n']} is below min_n={criterion.min_n}"}
    ok = _OPS[criterion.op](compared, criterion.threshold)
    return {**out, "verdict": PASS if ok else FAIL, "reason": ""}


def class_value(rates: dict | None, class_name: str, metric: str) -> dict | None:
    """A per-class rate's value for one class, from a row's (or the clean) ``class_rates``."""
    if not rates or class_name not in rates["classes"]:
        return None
    return rates["rates"][rates["classes"].index(class_name)].get(metric.removeprefix("clean_"))


def subgroup_value(subgroups: list[dict], c: Criterion) -> dict | None:
    """A criterion's metric on its subgroup: clean, or under the worst case at its epsilon."""
    clean = c.epsilon is None
    for s in subgroups:
        if (s["covariate"] == c.subgroup.covariate and s["value"] == c.subgroup.value and s["defense"] == c.defense
                and s["attack"] == ("clean" if clean else c.attack) and (clean or abs(s["epsilon"] - c.epsilon) < 1e-12)):
            return s["metrics"].get(c.metric)
    return None


def acceptance(spec: Spec, host: Host, computed: dict[str, Any], checks: list[dict]) -> dict[str, Any]:
    """Judge each criterion and the audit. A criterion whose scope held a case with a NaN or
    Inf output is INCONCLUSIVE: that case has no prediction to score."""
    judged = []
    for c in spec.acceptance.criteria:
        if host.get("metric", c.metric).clean:
            value = computed["clean"][c.defense].get(c.metric)
            rates = computed.get("clean_class_rates", {}).get(c.defense)
            scope: tuple = (c.defense,)
        else:
            row = next(
                r for r in computed["rows"]
                if r["defense"] == c.defense and r["attack"] == c.attack and abs(r["epsilon"] - c.epsilon) < 1e-12
            )
            value, rates = row["metrics"].get(c.metric), row.get("class_rates")
            scope = (row["defense"], row["attack"], row["epsilon"])
        if c.class_name is not None:  # a per-class rate, for the class the criterion names
            value = class_value(rates, c.class_name, c.metric)
        if c.subgroup is not None:  # the metric on the subgroup's cases only
            value = subgroup_value(computed.get("subgroups", []), c)
        budget, _ = attack_levels(spec, host, c.attack)
        judged.append(judge(c, value, spec.threat_model.norm, budget.name if budget else ""))
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
