"""Comparing two audit runs: every metric both report, the difference (B minus A) and a test
of it, and the regression gate of the spec (``acceptance.regression``) built on the same
comparison.

Two runs of the same data (equal ``data_sha256``) are compared case by case, paired on the
records' case ids: a proportion with the exact McNemar test on the discordant pairs and
Newcombe's interval for a paired difference, a mean over cases with a paired bootstrap of
the mean difference. Runs of different data are compared as independent samples: Fisher's
exact test and Newcombe's hybrid score interval for proportions, a bootstrap of the
difference of means for means. A metric that is not a proportion or a mean over cases (a
maximum, a median) is shown without a test.

A case's value of any metric is the metric computed on that case's record alone; where
these values do not add up to the metric on the whole group (a per-class rate taken at the
worst class, a rate relative to the data set's mean) the runs are compared unpaired, from
the group's counts or per-case values, and the entry says why. Every bootstrap is seeded:
the same two runs always give the same comparison. No correction for multiple comparisons
is made: a comparison of many metrics flags some by chance, which the regression gate
avoids by naming one metric in advance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medaudit.audits.records import read_records, record_path
from medaudit.audits.statistics import BOOTSTRAP_RESAMPLES, wilson_interval
from medaudit.core.components import Metric, MetricValue
from medaudit.core.errors import MedauditError
from medaudit.core.host import Host
from medaudit.core.jobs import CLEAN, Records
from medaudit.core.spec import WORST_CASE
from medaudit.core.tasks import protocol

#: Seed of every bootstrap of a comparison (results are reproducible).
SEED = 0
#: Tolerance when a group's per-case values are added up again and compared with the metric.
_ADD_UP = 1e-9
FINGERPRINT_NAMES = {"spec_sha256": "spec", "model_sha256": "model", "data_sha256": "data"}

PAIRED_PROPORTION, PAIRED_MEAN = "exact McNemar", "paired bootstrap"
UNPAIRED_PROPORTION, UNPAIRED_MEAN = "Fisher exact", "bootstrap"


# -- the runs ---------------------------------------------------------------------------


@dataclass
class Run:
    """A finished run (its results.json), or the run being judged (results so far, records
    already read): what a comparison reads of either."""

    path: Path
    results: dict[str, Any]
    records: dict[str, Records] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Run":
        path = Path(path)
        file = path / "results.json"
        if not file.is_file():
            raise MedauditError(f"{path}: no results.json; name a finished run directory")
        try:
            results = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise MedauditError(f"{file}: not readable JSON ({exc})") from None
        return cls(path, results)

    @property
    def fingerprints(self) -> dict[str, str]:
        return self.results.get("fingerprints") or {}

    def job_records(self, job: dict) -> Records | None:
        """A job's records, each naming its attack as :func:`compute_results` has them; None
        when the run directory no longer holds them."""
        if job["id"] not in self.records:
            if not record_path(self.path, job["id"]).is_file():
                return None
            found = read_records(self.path, job["id"])
            for row in found:
                row["attack"] = job["attack"]
            self.records[job["id"]] = found
        return self.records[job["id"]]

    def header(self) -> dict[str, Any]:
        audit = self.results.get("audit") or {}
        return {
            "run_dir": str(self.path), "audit": audit.get("name"), "title": audit.get("title"),
            "report_id": audit.get("report_id"), "finished": audit.get("finished"),
            "verdict": self.results.get("verdict"), "fingerprints": self.fingerprints,
            "medaudit_version": self.results.get("medaudit_version"),
        }


def _eps_key(eps: float) -> str:
    return f"{float(eps):.12g}"


def _groups(results: dict) -> dict[tuple, dict]:
    """Each value group of a run, keyed ``(defense, attack, view, epsilon)``: the clean job of
    each defense (attack ``clean``, epsilon 0) and each row of results (worst case included),
    with the stored metric values and the jobs whose records make the group."""
    jobs = results.get("jobs") or []
    out: dict[tuple, dict] = {}
    for defense, metrics in (results.get("clean") or {}).items():
        members = [j for j in jobs if j["defense"] == defense and j["attack"] == CLEAN]
        out[(defense, CLEAN, None, _eps_key(0.0))] = {
            "defense": defense, "attack": CLEAN, "view": None, "epsilon": 0.0, "epsilon_label": "0",
            "metrics": metrics, "jobs": members}
    for row in results.get("rows") or []:
        def member(j: dict) -> bool:
            if j["defense"] != row["defense"] or j["attack"] == CLEAN or "skipped" in j:
                return False
            if _eps_key(j["epsilon"]) != _eps_key(row["epsilon"]):
                return False
            if row["attack"] == WORST_CASE:
                return not j.get("budget")
            return j["attack"] == row["attack"] and j.get("budget") == row.get("budget")

        view = None if row["attack"] == WORST_CASE else row.get("view")
        out[(row["defense"], row["attack"], view, _eps_key(row["epsilon"]))] = {
            "defense": row["defense"], "attack": row["attack"], "view": view, "epsilon": row["epsilon"],
            "epsilon_label": row.get("epsilon_label"), "metrics": row.get("metrics") or {},
            "jobs": [j for j in jobs if member(j)]}
    return out


def _group_records(run: Run, group: dict, task: str) -> Records | None:
    """The records behind a group: one job's, or the worst case over its jobs, case by case."""
    found = [run.job_records(j) for j in group["jobs"]]
    if not found or any(f is None for f in found):
        return None
    if group["attack"] == WORST_CASE:
        return protocol(task).worst_case(found)
    return found[0] if len(found) == 1 else None


# -- per-case values ----------------------------------------------------------------------


@dataclass
class Sample:
    """A metric on one group of one run: the whole group's value, and each case's value when
    they add up to it (``per_case`` maps case id to value; None otherwise)."""

    kind: str  #: "proportion", "mean" or "other" (neither: no test)
    whole: MetricValue
    per_case: dict[str, float] | None


def sample(metric: Metric, records: Records) -> Sample | None:
    """The metric on ``records`` and, if they add up to it, its value on each case alone
    (a proportion gives 0 or 1, or None where the case does not count; a mean the case's value)."""
    if not metric.needs <= records.facets:
        return None
    whole = metric.compute(records)
    if whole is None:
        return None
    kind = "proportion" if whole.successes is not None else "mean" if whole.per_case is not None else "other"
    values: dict[str, float] = {}
    for record in records:
        one = metric.compute(Records([record], records.facets))
        if one is None:
            continue
        if one.n != 1 or record.get("case") is None or record["case"] in values:
            return Sample(kind, whole, None)
        values[record["case"]] = float(one.successes) if kind == "proportion" else float(one.value)
    count, total = len(values), sum(values.values())
    if kind == "proportion":
        adds_up = count == whole.n and total == whole.successes
    else:
        close = count > 0 and abs(total / count - whole.value) <= _ADD_UP * max(1.0, abs(whole.value))
        adds_up = count == whole.n and close
    if kind == "other" and adds_up:  # a mean over cases that gives no per-case values (a mean perturbation size)
        return Sample("mean", MetricValue(whole.value, whole.n, per_case=tuple(values.values())), values)
    return Sample(kind, whole, values if adds_up else None)


# -- tests of a difference ----------------------------------------------------------------


def mcnemar(a: Sequence[float], b: Sequence[float], confidence: float) -> dict[str, Any]:
    """Paired 0/1 values: the difference of proportions (b - a), Newcombe's interval for a
    paired difference (1998, method 10: Wilson intervals combined with the correlation of
    the pairs) and the exact McNemar test (a binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_b, discordant, 0.5).pvalue)
    p_b, p_a = (both + only_b) / n, (both + only_a) / n
    low_b, high_b = wilson_interval(both + only_b, n, confidence)
    low_a, high_a = wilson_interval(both + only_a, n, confidence)
    spread = (both + only_b) * (neither + only_a) * (both + only_a) * (neither + only_b)
    phi = (both * neither - only_a * only_b) / math.sqrt(spread) if spread > 0 else 0.0
    delta = math.sqrt(max(0.0, (p_b - low_b) ** 2 - 2 * phi * (p_b - low_b) * (high_a - p_a) + (high_a - p_a) ** 2))
    epsilon = math.sqrt(max(0.0, (high_b - p_b) ** 2 - 2 * phi * (high_b - p_b) * (p_a - low_a) + (p_a - low_a) ** 2))
    diff = p_b - p_a
    return {"difference": diff, "ci_low": max(-1.0, diff - delta), "ci_high": min(1.0, diff + epsilon), "p_value": p,
            "test": PAIRED_PROPORTION, "discordant": [only_a, only_b]}


def newcombe_unpaired(successes_a: int, n_a: int, successes_b: int, n_b: int, confidence: float) -> dict[str, Any]:
    """Independent proportions: b - a with Newcombe's hybrid score interval (1998, method 10)
    and Fisher's exact test (valid at any n, where a z-test is not)."""
    from scipy.stats import fisher_exact

    p_a, p_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(successes_a, n_a, confidence)
    low_b, high_b = wilson_interval(successes_b, n_b, confidence)
    diff = p_b - p_a
    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    p = float(fisher_exact(table).pvalue)
    return {"difference": diff, "ci_low": diff - math.hypot(p_b - low_b, high_a - p_a),
            "ci_high": diff + math.hypot(high_b - p_b, p_a - low_a), "p_value": p, "test": UNPAIRED_PROPORTION}


def _bootstrap_result(observed: float, resampled: Any, confidence: float, test: str) -> dict[str, Any]:
    """Percentile interval of the resampled differences and the two-sided p-value of "no
    difference" from the same resamples shifted to a zero mean."""
    import numpy as np

    alpha = (1 - confidence) / 2
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    extreme = int(np.sum(np.abs(resampled - observed) >= abs(observed) - 1e-15))
    p = 1.0 if observed == 0 else (1 + extreme) / (len(resampled) + 1)
    return {"difference": observed, "ci_low": float(low), "ci_high": float(high), "p_value": min(1.0, p), "test": test}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float, seed: int = SEED) -> dict[str, Any]:
    """Paired values: the mean difference (b - a), resampling the pairs."""
    import numpy as np

    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))].mean(1)
    return _bootstrap_result(float(d.mean()), means, confidence, PAIRED_MEAN)


def unpaired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float, seed: int = SEED) -> dict[str, Any]:
    """Independent values: the difference of means (b - a), resampling each run's cases."""
    import numpy as np

    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means_a = xa[rng.integers(0, len(xa), size=(BOOTSTRAP_RESAMPLES, len(xa)))].mean(1)
    means_b = xb[rng.integers(0, len(xb), size=(BOOTSTRAP_RESAMPLES, len(xb)))].mean(1)
    return _bootstrap_result(float(xb.mean() - xa.mean()), means_b - means_a, confidence, UNPAIRED_MEAN)


def difference_test(a: Sample, b: Sample, paired: bool, confidence: float) -> dict[str, Any]:
    """The difference b - a, its interval and p-value; ``paired`` when the runs share their data.
    A test that cannot run says why (``reason``) and leaves p None."""
    if a.kind != b.kind or a.kind == "other":
        return {"p_value": None, "paired": False, "reason": "neither a proportion nor a mean over cases: not tested"}
    if paired and a.per_case is not None and b.per_case is not None:
        cases = [c for c in a.per_case if c in b.per_case]
        if len(cases) >= 2:
            xa, xb = [a.per_case[c] for c in cases], [b.per_case[c] for c in cases]
            out = mcnemar(xa, xb, confidence) if a.kind == "proportion" else paired_bootstrap(xa, xb, confidence)
            unmatched = len(set(a.per_case) ^ set(b.per_case))
            reason = f"{unmatched} case(s) counted in one run only are left out of the pairs" if unmatched else ""
            return {**out, "paired": True, "n_pairs": len(cases), "reason": reason}
    why = "" if not paired else (
        "the per-case values do not add up to the metric (e.g. a rate at the worst class): compared unpaired"
        if a.per_case is None or b.per_case is None else "fewer than two cases in both runs: compared unpaired")
    if a.kind == "proportion":
        if not a.whole.n or not b.whole.n:
            return {"p_value": None, "paired": False, "reason": "no case in scope"}
        out = newcombe_unpaired(a.whole.successes, a.whole.n, b.whole.successes, b.whole.n, confidence)
    else:
        if len(a.whole.per_case) < 2 or len(b.whole.per_case) < 2:
            return {"p_value": None, "paired": False, "reason": "fewer than two cases"}
        out = unpaired_bootstrap(a.whole.per_case, b.whole.per_case, confidence)
    return {**out, "paired": False, "reason": why}


# -- the comparison -----------------------------------------------------------------------


def _stored(value: dict | None) -> dict | None:
    if not value:
        return None
    return {k: value.get(k) for k in ("value", "ci_low", "ci_high", "n", "interval")}


def direction(difference: float | None, better: str) -> str | None:
    """'better', 'worse' or 'same' for the change b - a of a metric that is better ``higher`` or ``lower``."""
    if difference is None:
        return None
    if abs(difference) < 1e-12:
        return "same"
    return "better" if (difference > 0) == (better == "higher") else "worse"


def compare_entry(run_a: Run, run_b: Run, key: tuple, metric_name: str, host: Host | None, confidence: float,
                  paired: bool) -> dict[str, Any] | None:
    """One (defense, attack, view, epsilon, metric) of both runs; None when either lacks it."""
    group_a, group_b = _groups(run_a.results).get(key), _groups(run_b.results).get(key)
    if group_a is None or group_b is None:
        return None
    return _entry(run_a, run_b, group_a, group_b, metric_name, host, confidence, paired)


def _entry(run_a: Run, run_b: Run, group_a: dict, group_b: dict, metric_name: str, host: Host | None,
           confidence: float, paired: bool) -> dict[str, Any] | None:
    stored_a, stored_b = group_a["metrics"].get(metric_name), group_b["metrics"].get(metric_name)
    if stored_a is None or stored_b is None:
        return None
    cls = host.components["metric"].get(metric_name) if host is not None else None
    better = cls.better if cls is not None else _declared_better(run_a.results, metric_name)
    out: dict[str, Any] = {
        "defense": group_a["defense"], "attack": group_a["attack"], "view": group_a["view"],
        "epsilon": group_a["epsilon"], "epsilon_label": group_a["epsilon_label"], "metric": metric_name,
        "better": better, "a": _stored(stored_a), "b": _stored(stored_b),
        "difference": None if stored_a.get("value") is None or stored_b.get("value") is None
        else stored_b["value"] - stored_a["value"],
        "ci_low": None, "ci_high": None, "p_value": None, "test": None, "paired": False, "reason": "",
    }
    if cls is None:
        out["reason"] = f"metric {metric_name!r} is not registered here: not tested"
    else:
        metric = cls()
        task_a = (run_a.results.get("audit") or {}).get("task", "classification")
        task_b = (run_b.results.get("audit") or {}).get("task", "classification")
        records_a, records_b = _group_records(run_a, group_a, task_a), _group_records(run_b, group_b, task_b)
        if records_a is None or records_b is None:
            out["reason"] = "the records of a run are missing: not tested"
        else:
            sample_a, sample_b = sample(metric, records_a), sample(metric, records_b)
            if sample_a is None or sample_b is None:
                out["reason"] = "no value in one run: not tested"
            else:
                out.update(difference_test(sample_a, sample_b, paired, confidence))
    p = out.get("p_value")
    out["significant"] = p is not None and p < 1 - confidence
    out["direction"] = direction(out["difference"], better)
    return out


def _declared_better(results: dict, metric_name: str) -> str:
    declared = [m.get("better", "higher") for m in results.get("metrics") or [] if m.get("name") == metric_name]
    return declared[0] if declared else "higher"


def pairing(run_a: Run, run_b: Run) -> tuple[bool, str]:
    """Whether the runs are compared case by case, and why not."""
    data_a, data_b = run_a.fingerprints.get("data_sha256"), run_b.fingerprints.get("data_sha256")
    if data_a is None or data_b is None:
        return False, "a run has no data fingerprint: compared as independent samples"
    if data_a != data_b:
        return False, "the runs evaluated different data (data_sha256 differs): compared as independent samples"
    return True, ""


def compare_runs(run_a: Path | Run, run_b: Path | Run, *, host: Host | None = None,
                 confidence: float = 0.95) -> dict[str, Any]:
    """Every metric value both runs report, clean and under each attack and the worst case
    at each budget, with B - A, its interval, its p-value and whether it is significant at
    ``confidence`` and better or worse. ``host``: the registered metrics (per-case values
    and tests); without it the values are listed untested."""
    a = run_a if isinstance(run_a, Run) else Run.load(run_a)
    b = run_b if isinstance(run_b, Run) else Run.load(run_b)
    paired, why = pairing(a, b)
    groups_a, groups_b = _groups(a.results), _groups(b.results)
    cumulative = [name for name, run in (("A", a), ("B", b))
                  if (run.results.get("strategy") or {}).get("name") == "verdict"]
    if cumulative:  # its per-attack rows count the cases carried over to them: not one attack's figure
        for groups in (groups_a, groups_b):
            for key in [k for k, g in groups.items() if k[1] not in (CLEAN, WORST_CASE) and not _budgeted(g)]:
                del groups[key]
    names_b = {m["name"] for m in b.results.get("metrics") or []}
    metrics = [m["name"] for m in a.results.get("metrics") or [] if m["name"] in names_b]
    entries = []
    for key, group_a in groups_a.items():
        if key not in groups_b:
            continue
        for name in metrics:
            entry = _entry(a, b, group_a, groups_b[key], name, host, confidence, paired)
            if entry is not None:
                entries.append(entry)
    differs = [label for key, label in FINGERPRINT_NAMES.items() if a.fingerprints.get(key) != b.fingerprints.get(key)]
    tested = [e for e in entries if e["p_value"] is not None]
    return {
        "a": a.header(), "b": b.header(), "differs": differs, "paired": paired, "paired_reason": why,
        "confidence": confidence,
        "strategy_note": (f"run {' and '.join(cumulative)} used runtime.strategy verdict, whose per-attack rows are "
                          "cumulative: only the clean values and the worst case are compared") if cumulative else None,
        "summary": {
            "compared": len(entries), "tested": len(tested),
            "significant_worse": sum(e["significant"] and e["direction"] == "worse" for e in entries),
            "significant_better": sum(e["significant"] and e["direction"] == "better" for e in entries),
        },
        "only_in_a": [_key_text(k) for k in groups_a if k not in groups_b],
        "only_in_b": [_key_text(k) for k in groups_b if k not in groups_a],
        "entries": entries,
    }


def _budgeted(group: dict) -> bool:
    """Is the group an attack sized by its own budget (a corruption: never carried over)?"""
    return any(j.get("budget") for j in group["jobs"])


def _key_text(key: tuple) -> str:
    defense, attack, view, eps = key
    return f"{defense}: clean" if attack == CLEAN else f"{defense}: {attack} at eps {eps}"


# -- the regression gate ------------------------------------------------------------------

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


def regression_check(criterion: Any, baseline_dir: Path, run_dir: Path | Run, results: dict | None, host: Host,
                     confidence: float, epsilon: float | None = None) -> dict[str, Any]:
    """Judge one regression entry (:class:`~medaudit.core.spec.Regression`) of the run against
    its baseline run: FAIL when the metric dropped (in its ``better`` direction) by more than
    ``max_drop`` and the paired (or unpaired) test finds the change significant at
    ``confidence``; PASS otherwise; INCONCLUSIVE when the comparison cannot be made.

    ``run_dir``: the run, a finished run directory or a :class:`Run` holding what the runner
    has computed so far (``results`` then ignored); ``results``: the run's results when
    ``run_dir`` is a path whose results.json is not written yet (with ``clean``, ``rows``,
    ``jobs`` and ``fingerprints``). ``epsilon``: the budget judged, when the entry names none.
    Returns a criterion-like dict for ``results["acceptance"]["criteria"]``."""
    eps = criterion.epsilon if criterion.epsilon is not None else epsilon
    out: dict[str, Any] = {
        **criterion.model_dump(mode="json"), "kind": "regression", "epsilon": eps,
        "op": "<=", "threshold": criterion.max_drop, "statistic": "drop", "min_n": 1, "class_name": None,
        "subgroup": None, "estimate": None, "ci_low": None, "ci_high": None, "n": None, "compared": None,
        "baseline_run": str(baseline_dir), "baseline_report_id": None, "baseline_value": None,
        "current_value": None, "p_value": None, "paired": None, "test": None,
    }
    try:
        baseline = Run.load(Path(baseline_dir))
        current = run_dir if isinstance(run_dir, Run) else (
            Run(Path(run_dir), results) if results is not None else Run.load(Path(run_dir)))
    except MedauditError as exc:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"baseline not usable: {exc}"}
    out["baseline_report_id"] = (baseline.results.get("audit") or {}).get("report_id")
    cls = host.components["metric"].get(criterion.metric)
    if cls is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"metric {criterion.metric!r} is not registered"}
    if cls.clean:
        key = (criterion.defense, CLEAN, None, _eps_key(0.0))
    elif eps is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"metric {criterion.metric!r} needs an epsilon"}
    else:
        view = None if criterion.attack == WORST_CASE else "naive"
        key = (criterion.defense, criterion.attack, view, _eps_key(eps))
    current_group, baseline_group = _groups(current.results).get(key), _groups(baseline.results).get(key)
    for group in (baseline_group, current_group):
        if group is not None and not cls.clean:
            out["epsilon_label"] = group["epsilon_label"]
    where = f"defense {criterion.defense}"
    if not cls.clean:
        where += f", {criterion.attack} at eps {out.get('epsilon_label') or eps}"
    if baseline_group is None or (baseline_group["metrics"].get(criterion.metric) is None):
        return {**out, "verdict": INCONCLUSIVE, "reason": f"the baseline has no {criterion.metric} for {where}"}
    if current_group is None or current_group["metrics"].get(criterion.metric) is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"this run has no {criterion.metric} for {where}"}
    paired, why = pairing(baseline, current)
    entry = _entry(baseline, current, baseline_group, current_group, criterion.metric, host, confidence, paired)
    assert entry is not None  # both groups hold the metric
    sign = -1.0 if cls.better == "higher" else 1.0  # a drop is a change for the worse
    drop = None if entry["difference"] is None else sign * entry["difference"] + 0.0  # + 0.0: no "-0"
    bounds = [None if entry[k] is None else sign * entry[k] + 0.0 for k in ("ci_low", "ci_high")]
    low, high = (min(bounds), max(bounds)) if None not in bounds else (None, None)
    out.update(
        estimate=drop, compared=drop, ci_low=low, ci_high=high,
        n=entry.get("n_pairs") or (entry["b"] or {}).get("n"),
        baseline_value=(entry["a"] or {}).get("value"), current_value=(entry["b"] or {}).get("value"),
        p_value=entry["p_value"], paired=entry["paired"], test=entry["test"],
    )
    baseline_name = out["baseline_report_id"] or str(baseline_dir)
    change = (f"{criterion.metric} {_fmt(out['baseline_value'])} in baseline {baseline_name} -> "
              f"{_fmt(out['current_value'])} here")
    if drop is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"{change}: no value to compare"}
    if entry["p_value"] is None:
        return {**out, "verdict": INCONCLUSIVE, "reason": f"{change}: the change cannot be tested ({entry['reason']})"}
    test = f"{entry['test']}{'' if entry['paired'] else ', unpaired'}"
    if why:
        test += f"; {why}"
    elif entry["reason"]:
        test += f"; {entry['reason']}"
    stated = f"{change}: drop {drop:.4g}, p = {entry['p_value']:.3g} ({test})"
    failed = drop > criterion.max_drop and entry["significant"]
    if failed:
        return {**out, "verdict": FAIL,
                "reason": f"{stated}: more than max_drop {criterion.max_drop:g} and significant"}
    because = "within max_drop" if drop <= criterion.max_drop else "not significant"
    return {**out, "verdict": PASS, "reason": f"{stated}: {because}"}


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"

