"""Acceptance: each criterion of the spec judged on its confidence bound, and the audit's
verdict from the criteria and the gating validity checks."""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

from medaudit.core.components import Norm
from medaudit.core.errors import ExitCode, MedauditError
from medaudit.core.host import Host
from medaudit.core.spec import Criterion, Regression, Spec, attack_levels, epsilon_label, is_run_reference, level_label

PASS, FAIL, INCONCLUSIVE, INVALID = "PASS", "FAIL", "INCONCLUSIVE", "INVALID"
NOT_ASSESSED = "NOT ASSESSED"
#: Why a criterion of a run with ``runtime.strategy: verdict`` may have no value.
SKIPPED = "runtime.strategy verdict stops once the blocking criteria are decided"

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


def baseline_run(spec: Spec, gate: Regression) -> Path:
    """The run directory a regression gate's baseline names: its folder, or a report id (or
    ``latest:<audit>``) looked up in the audit history the spec's runs are added to."""
    if not is_run_reference(gate.baseline):
        return Path(gate.baseline)
    from medaudit.audits.history import index_path, resolve_run

    return resolve_run(gate.baseline, index_path(spec.runtime.output_dir, spec.runtime.history))


def judge_regressions(spec: Spec, host: Host, computed: dict[str, Any], run_dir: Path | None) -> list[dict[str, Any]]:
    """Each regression gate against its baseline run, at its budget or at every budget of its
    attack (ids ``<id>@<budget>``). The run is read from ``computed`` (its records) and
    ``run_dir`` (its fingerprints: the same data makes the comparison paired)."""
    from medaudit.audits.compare import Run, regression_check
    from medaudit.audits.plan import plan_jobs

    if not spec.acceptance.regression:
        return []
    current: Run | None = None
    problem = "the runner gave no run directory to read the run's fingerprints from"
    if run_dir is not None:
        jobs = plan_jobs(spec, host)
        ran = set(computed.get("records", {}))
        if not ran <= {j.id for j in jobs} or (spec.runtime.strategy == "full" and ran != {j.id for j in jobs}):
            problem = "the run's records are not those of the spec's jobs"
        else:
            stored = Path(run_dir) / "fingerprints.json"
            fingerprints = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
            results = {
                "audit": {"name": spec.audit.name, "task": spec.task.value}, "fingerprints": fingerprints,
                "metrics": [{"name": m, "better": host.get("metric", m).better} for m in spec.metrics],
                "clean": computed["clean"], "rows": computed["rows"],
                "jobs": [{"id": j.id, "defense": j.defense, "attack": j.attack, "view": j.view, "epsilon": j.epsilon,
                          **({"budget": j.budget} if j.budget else {})} for j in jobs if j.id in ran],
            }
            current = Run(Path(run_dir), results, records=dict(computed["records"]))
    judged = []
    for gate in spec.acceptance.regression:
        metric = host.components["metric"].get(gate.metric)
        budget, levels = attack_levels(spec, host, gate.attack)
        clean = metric is None or metric.clean
        epsilons = [gate.epsilon] if gate.epsilon is not None or clean else levels
        for eps in epsilons:
            entry_id = gate.id if len(epsilons) == 1 or eps is None else (
                f"{gate.id}@{level_label(eps, budget.name) if budget else epsilon_label(eps, spec.threat_model.norm)}")
            try:
                where = baseline_run(spec, gate)
            except MedauditError as exc:
                judged.append(_unjudged(gate, eps, entry_id, f"baseline not found: {exc}"))
                continue
            if current is None:
                judged.append(_unjudged(gate, eps, entry_id, problem))
                continue
            judged.append({**regression_check(gate, where, current, None, host, spec.acceptance.confidence, eps),
                           "id": entry_id})
            scope = (gate.defense,) if clean else (gate.defense, gate.attack, eps)
            if nonfinite := computed.get("nonfinite", {}).get(scope):
                judged[-1].update(verdict=INCONCLUSIVE, reason=f"{nonfinite} case(s) in scope gave NaN or Inf outputs")
    return judged


def _unjudged(gate: Regression, eps: float | None, entry_id: str, reason: str) -> dict[str, Any]:
    """A regression gate that could not be judged, in the shape of a judged one."""
    return {**gate.model_dump(mode="json"), "id": entry_id, "kind": "regression", "epsilon": eps, "op": "<=",
            "threshold": gate.max_drop, "statistic": "drop", "min_n": 1, "class_name": None, "subgroup": None,
            "estimate": None, "ci_low": None, "ci_high": None, "n": None, "compared": None, "baseline_run": None,
            "verdict": INCONCLUSIVE, "reason": reason}


def acceptance(spec: Spec, host: Host, computed: dict[str, Any], checks: list[dict],
               run_dir: Path | None = None) -> dict[str, Any]:
    """Judge each criterion, each regression gate (which needs ``run_dir``: see
    :func:`judge_regressions`) and the audit. A criterion whose scope held a case with a NaN
    or Inf output is INCONCLUSIVE: that case has no prediction to score."""
    judged = []
    for c in spec.acceptance.criteria:
        if host.get("metric", c.metric).clean:
            value = computed["clean"][c.defense].get(c.metric)
            rates = computed.get("clean_class_rates", {}).get(c.defense)
            scope: tuple = (c.defense,)
        else:
            row = next((r for r in computed["rows"] if r["defense"] == c.defense and r["attack"] == c.attack
                        and abs(r["epsilon"] - c.epsilon) < 1e-12), None)
            if row is None:  # runtime.strategy verdict skipped its jobs: the verdict was decided without them
                budget, _ = attack_levels(spec, host, c.attack)
                judged.append({**judge(c, None, spec.threat_model.norm, budget.name if budget else ""),
                               "reason": f"not evaluated: its jobs were skipped ({SKIPPED})"})
                continue
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
    judged += judge_regressions(spec, host, computed, run_dir)
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
