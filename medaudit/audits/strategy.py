"""``runtime.strategy``: in which order the jobs run, on which cases, and when a run may stop.

``full`` runs every planned job on every case, in the planned order. ``verdict`` spends
compute only where it can still change the verdict:

- jobs run clean first, then budget by budget (smallest first) and, at each budget, attacks
  cheapest first (:meth:`Attack.cost`), then the attacks sized by their own budget;
- a norm-bounded attack job runs only on the cases still robust in the worst-case order:
  a case an earlier job broke at this budget or a smaller one of the same norm is not
  attacked again, and its record carries the earlier adversarial over (``carried`` names
  the job that found it). An adversarial within eps_k is within every larger eps, so the
  worst case counts it there, as the full strategy counts the attack that found it;
- a job whose own figure a criterion or regression gate reads runs on every case
  (:func:`exact_jobs`), so that figure is the one ``full`` gives;
- after every job the blocking criteria are judged on what has run (:class:`Verdict`), and
  the run stops once no remaining job can change the verdict. The jobs left are listed as
  skipped, with the reason.

The worst case at each budget that ran is the one ``full`` gives, case by case, as long as
an attack's result on a case does not depend on which other cases share its batch: true
of deterministic attacks; attacks that draw random starts for a whole batch draw other
numbers for a smaller batch, an equally valid draw (the examples' test checks the totals).
Segmentation has no per-case "broken": every attack runs on every case there, and only
the order and the early stop apply.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from medaudit.audits.aggregation import compute_metric, interval_choice
from medaudit.audits.records import has_nonfinite_output
from medaudit.core.components import Attack
from medaudit.core.host import Host
from medaudit.core.jobs import Job, Records
from medaudit.core.spec import WORST_CASE, Criterion, Regression, Spec, attack_levels
from medaudit.core.tasks import protocol

FULL, VERDICT = "full", "verdict"


def run_order(spec: Spec, jobs: list[Job], attacks: dict[str, Attack], num_classes: int) -> list[Job]:
    """The order the strategy runs the planned ``jobs`` in (``full``: as planned)."""
    if spec.runtime.strategy == FULL:
        return list(jobs)
    position = {job.id: i for i, job in enumerate(jobs)}
    cost = {label: attack.cost(num_classes) for label, attack in attacks.items()}
    clean = [j for j in jobs if j.is_clean]
    bounded = [j for j in jobs if not j.is_clean and not j.budget]
    own = [j for j in jobs if not j.is_clean and j.budget]
    bounded.sort(key=lambda j: (j.epsilon, cost[j.spec_attack], position[j.id]))
    return clean + bounded + own


def _scope(spec: Spec, jobs: list[Job], defense: str, attack: str, epsilon: float | None, clean: bool) -> list[Job]:
    """The jobs whose records a criterion's (or gate's) value is computed from."""
    if clean:
        return [j for j in jobs if j.defense == defense and j.is_clean]
    same = [j for j in jobs if j.defense == defense and not j.is_clean
            and (epsilon is None or abs(j.epsilon - epsilon) < 1e-12)]
    if attack == WORST_CASE:
        return [j for j in same if not j.budget]
    return [j for j in same if j.attack == attack]


def exact_jobs(spec: Spec, host: Host, jobs: list[Job]) -> set[str]:
    """Ids of the attack jobs whose own figure a criterion or a regression gate reads: under
    ``verdict`` they run on every case, so that the figure is not cumulative."""
    exact: set[str] = set()
    for c in [*spec.acceptance.criteria, *spec.acceptance.regression]:
        if c.attack == WORST_CASE or host.get("metric", c.metric).clean:
            continue
        exact |= {j.id for j in _scope(spec, jobs, c.defense, c.attack, c.epsilon, False)}
    return exact


def carried_over(job: Job, earlier: list[Job], records: Callable[[str], Records], n: int) -> list[dict | None]:
    """Per case, the record of the first adversarial an ``earlier`` job (same defense, norm-
    bounded, same or smaller budget) found, marked with the job that found it (``carried``);
    None for a case still robust."""
    found: list[dict | None] = [None] * n
    for other in earlier:
        if other.defense != job.defense or other.is_clean or other.budget or other.epsilon > job.epsilon + 1e-12:
            continue
        for i, row in enumerate(records(other.id)):
            if found[i] is None and row["attacked"] and not row["adv_correct"]:
                found[i] = {**row, "carried": row.get("carried") or other.id}
    return found


@dataclasses.dataclass
class Decision:
    stop: bool
    reason: str = ""


class Verdict:
    """The blocking criteria and regression gates of a spec, judged on the jobs done so far,
    to tell whether any job left can still change the verdict."""

    def __init__(self, spec: Spec, host: Host, jobs: list[Job]):
        self.spec, self.host = spec, host
        self.task = protocol(spec.task)
        self.blocking: list[tuple[Criterion | Regression, list[Job]]] = []
        for c in [*spec.acceptance.criteria, *spec.acceptance.regression]:
            if c.severity != "blocking":
                continue
            clean = host.get("metric", c.metric).clean
            if isinstance(c, Regression) and c.epsilon is None and not clean:
                _, levels = attack_levels(spec, host, c.attack)
                scope = [j for eps in levels for j in _scope(spec, jobs, c.defense, c.attack, eps, False)]
            else:
                scope = _scope(spec, jobs, c.defense, c.attack, c.epsilon, clean)
            self.blocking.append((c, scope))

    def decide(self, done: set[str], records: Callable[[str], Records]) -> Decision:
        """Stop when a blocking criterion has failed for good, or when every blocking
        criterion's jobs are done; the jobs left cannot change the verdict then (the gating
        validity checks judge the jobs that ran)."""
        open_ = []
        for c, scope in self.blocking:
            finished = all(j.id in done for j in scope)
            if self._failed(c, [j for j in scope if j.id in done], finished, records):
                kind = "regression gate" if isinstance(c, Regression) else "criterion"
                state = "" if finished else " before every attack at its budget ran (more attacks can only lower it)"
                return Decision(True, f"blocking {kind} {c.id} failed{state}: the verdict is FAIL whatever the "
                                      "remaining jobs find")
            if not finished:
                open_.append(c.id)
        if not open_:
            return Decision(True, "every blocking criterion is decided by the jobs that ran")
        return Decision(False)

    def _failed(self, c: Criterion | Regression, ran: list[Job], finished: bool,
                records: Callable[[str], Records]) -> bool:
        """Has ``c`` failed on the jobs that ran, and can no job left make it pass? Regression
        gates and per-class or subgroup criteria are judged only at the end of the run."""
        from medaudit.audits.acceptance import FAIL, judge

        if isinstance(c, Regression) or c.class_name is not None or c.subgroup is not None or not ran:
            return False
        metric = self.host.get("metric", c.metric)
        if not finished:  # a worst case that can only get worse as attacks are added
            worse_is_failing = (metric.better == "higher") == (c.op in (">=", ">"))
            if c.attack != WORST_CASE or not metric.monotone or not worse_is_failing:
                return False
        groups = [records(j.id) for j in ran]
        if any(has_nonfinite_output(r) for g in groups for r in g):
            return False  # INCONCLUSIVE in the end, not FAIL
        group = groups[0] if len(groups) == 1 else self.task.worst_case(groups)
        value = compute_metric(metric(), group, self.spec.acceptance.confidence, *interval_choice(self.spec))
        if value is not None and not finished and value.get("successes") is None \
                and self.spec.acceptance.mean_interval == "bca":
            return False  # a BCa bound need not fall with every per-case value
        return judge(c, value, self.spec.threat_model.norm)["verdict"] == FAIL


def describe(spec: Spec, order: list[Job], done: set[str], skipped: dict[str, str], carried: dict[str, int],
             exact: set[str], stopped: dict[str, Any] | None) -> dict[str, Any]:
    """results.json's ``strategy``: what ran, in which order, and what it means for the figures."""
    out: dict[str, Any] = {"name": spec.runtime.strategy, "order": [j.id for j in order if j.id in done]}
    if spec.runtime.strategy == VERDICT:
        out.update(
            carried=carried, exact=sorted(exact), stopped=stopped,
            skipped=[{"job": j.id, "title": j.title(), "reason": skipped[j.id]} for j in order if j.id in skipped],
        )
    return out


def read_cached(run_dir: Path, cache: dict[str, Records]) -> Callable[[str], Records]:
    """A reader of finished jobs' records that reads each file once."""
    from medaudit.audits.records import read_records

    def read(job_id: str) -> Records:
        if job_id not in cache:
            cache[job_id] = read_records(run_dir, job_id)
        return cache[job_id]

    return read
