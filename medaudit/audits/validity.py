"""Validity checks: can the numbers support a claim? Budgets respected, outputs finite, the
model one fixed function, gradients usable, and the attacks' relative strength (Carlini et
al. 2019). ``gating`` failures make the audit INVALID; the others are warnings.

The strength checks compare attack families (:class:`AttackFamily`, declared by each
attack) and the view each job attacked (``Job.view``), never attack names or labels, so
they hold for vendors' attacks and defenses' views alike.
"""

from __future__ import annotations

from typing import Any

from medaudit.audits.aggregation import facets_of
from medaudit.audits.records import has_nonfinite_output
from medaudit.core.components import AttackFamily, Facet, Norm
from medaudit.core.host import Host
from medaudit.core.jobs import NAIVE, Job
from medaudit.core.spec import WORST_CASE, Spec, epsilon_label
from medaudit.core.tasks import protocol

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
#: A validity check whose subject is absent from the audit (e.g. no single-step attack to compare).
NOT_APPLICABLE = "N/A"

#: Slack for floating-point round-off when checking that a perturbation respects its budget.
BUDGET_TOLERANCE = 1e-5
#: Gap in a robust metric (absolute) above which one attack counts as stronger than another.
STRENGTH_TOLERANCE = 0.05
#: An L-inf budget at which any classifier should be nearly always fooled (methods.md 12, C17).
LARGE_LINF = 16 / 255
#: Families that search with the model's gradients within the budget: the white box that
#: score- and decision-based attacks should not beat. Transfer and universal attacks are
#: weaker by design, so they are compared with nothing.
WHITE_BOX = frozenset({AttackFamily.SINGLE_STEP, AttackFamily.ITERATIVE, AttackFamily.MINIMUM_NORM})
BLACK_BOX = frozenset({AttackFamily.SCORE_BASED, AttackFamily.DECISION_BASED})


def validity_checks(
    spec: Spec, host: Host, jobs: list[Job], records: dict[str, list[dict]], rows: list[dict],
    gradient_health: dict[str, dict] | None = None, probe: dict[str, Any] | None = None,
) -> list[dict]:
    """Checks that the numbers can support a claim. ``gating`` failures make the audit INVALID.
    ``probe``: the runner's findings on the audited model (``deterministic``,
    ``weights_unchanged``, ``randomized`` as the spec declares it, ``cases`` probed)."""
    checks = [budget_check(spec, host, jobs, records)]
    headline = protocol(spec.task).headline
    bumps = []
    for defense in sorted({r["defense"] for r in rows}):
        curve = [r for r in rows if r["defense"] == defense and r["attack"] == WORST_CASE]
        values = [(r["epsilon_label"], (r["metrics"].get(headline) or {}).get("value")) for r in curve]
        for (e0, v0), (e1, v1) in zip(values, values[1:]):
            if v0 is not None and v1 is not None and v1 > v0 + 1e-12:
                bumps.append(f"{defense}: {v0:.3f} at {e0} -> {v1:.3f} at {e1}")
    if headline in spec.metrics:
        checks += attack_strength_checks(spec, host, jobs, rows, headline)
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


def budget_check(spec: Spec, host: Host, jobs: list[Job], records: dict[str, list[dict]]) -> dict:
    """Gating: every perturbation within its budget and every adversarial input in [0, 1].
    A norm-bounded job's records measure each perturbation in the threat norm; an attack
    sized by its own :class:`~medaudit.core.components.Budget` records each changed case's
    size under the budget's ``measure``, which must be at most the limit of the job's level
    (a changed case without it fails the check too: its size is unknown)."""
    norm_field = spec.threat_model.norm.value
    worst_excess, out_of_range, normed, own = 0.0, 0, False, {}
    for job in jobs:
        if job.is_clean:
            continue
        budget = host.get("attack", job.attack_name).budget
        normed |= budget is None
        for r in records[job.id]:
            out_of_range += not r["in_range"]
            if budget is None:
                worst_excess = max(worst_excess, r[norm_field] - job.epsilon)
                continue
            measured = (r["extras"] if Facet.EXTRAS in facets_of(records[job.id]) else {}).get(budget.measure)
            excess, missing = own.get(job.spec_attack, (0.0, 0))
            if measured is None:
                own[job.spec_attack] = (excess, missing + bool(r["attacked"]))
            else:
                own[job.spec_attack] = (max(excess, measured - budget.limit(job.epsilon)), missing)
    own_excess = max((e for e, _ in own.values()), default=0.0)
    unmeasured = sum(m for _, m in own.values())
    ok = worst_excess <= BUDGET_TOLERANCE and own_excess <= BUDGET_TOLERANCE and unmeasured == 0 and out_of_range == 0
    evidence = [f"largest excess of the {norm_field} norm over epsilon: {worst_excess:.2e}"] if normed else []
    for label, (excess, missing) in own.items():
        budget = host.get("attack", next(j.attack_name for j in jobs if j.spec_attack == label)).budget
        evidence.append(f"{label}: largest excess of its {budget.measure} over its {budget.name}'s limit: {excess:.2e}"
                        + (f", {missing} changed cases without a recorded {budget.measure}" if missing else ""))
    return {
        "id": "budget_respected",
        "title": "Perturbations respect the budget and the valid range",
        "status": PASS if ok else FAIL,
        "gating": True,
        "evidence": "; ".join([*evidence, f"tolerance {BUDGET_TOLERANCE:.0e}", f"adversarial inputs outside [0, 1]: {out_of_range}"]),
    }


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


def attack_strength_checks(spec: Spec, host: Host, jobs: list[Job], rows: list[dict], headline: str) -> list[dict]:
    """Carlini et al. (2019) sanity checks on the attacks' relative strength (methods.md 12:
    C4 iterative >= single-step, C5 white-box >= black-box, C10 naive vs adaptive, C3/C17
    large budgets). Each compares robust metrics of the same defense and budget; a gap
    counts when it exceeds ``STRENGTH_TOLERANCE`` (a fixed 5 points: with a few hundred
    cases, smaller gaps are within sampling noise)."""
    value = {(r["defense"], r["attack"], r["epsilon"]): (r["metrics"].get(headline) or {}).get("value") for r in rows}
    # A label names one (spec attack, view) everywhere; attacks sized by their own budget
    # (corruptions) share no scale with the norm-bounded ones and are compared with nothing.
    by_label = {j.attack: j for j in jobs if not j.is_clean and not j.budget}
    family = {label: host.get("attack", j.attack_name).family for label, j in by_label.items()}
    single, masked, blackbox = [], [], []
    for (defense, attack, eps), v in value.items():
        if v is None or attack == WORST_CASE or attack not in by_label:
            continue
        job = by_label[attack]
        where = f"{defense}, eps {epsilon_label(eps, spec.threat_model.norm)}"
        if family[attack] == AttackFamily.SINGLE_STEP:  # against the iterative attacks on the same view
            iterative = [(a, value.get((defense, a, eps))) for a, j in by_label.items()
                         if family[a] == AttackFamily.ITERATIVE and j.view == job.view]
            beaten = [(a, w) for a, w in iterative if w is not None and w > v + STRENGTH_TOLERANCE]
            single += [f"{where}: {attack} {v:.3f} < {a} {w:.3f}" for a, w in beaten]
        if job.view != NAIVE:
            twin = next((a for a, j in by_label.items() if j.spec_attack == job.spec_attack and j.view == NAIVE), None)
            naive = value.get((defense, twin, eps))
            if naive is not None and naive > v + STRENGTH_TOLERANCE:
                masked.append(f"{where}: naive {twin} {naive:.3f} vs {job.view} {v:.3f}")
        if family[attack] in BLACK_BOX:
            white = [w for (d, a, e), w in value.items()
                     if d == defense and e == eps and family.get(a) in WHITE_BOX and w is not None]
            if white and v + STRENGTH_TOLERANCE < min(white):
                blackbox.append(f"{where}: {attack} {v:.3f} < best white-box {min(white):.3f}")
    label = headline.replace("_", " ")
    families = set(family.values())
    has_pair = AttackFamily.SINGLE_STEP in families and AttackFamily.ITERATIVE in families
    has_blackbox = bool(BLACK_BOX & families) and bool(WHITE_BOX & families)
    checks = [
        _check("iterative_beats_single_step", f"Iterative attacks do at least as well as single-step ones ({label})",
               single, "no single-step attack beat an iterative one by more than 5 points" if has_pair
               else "a single-step and an iterative gradient attack are needed", applicable=has_pair),
        _check("whitebox_beats_blackbox", f"White-box attacks do at least as well as score- and decision-based ones ({label})",
               blackbox, "no gradient-free attack beat the best white-box attack by more than 5 points" if has_blackbox
               else "a gradient-free and a gradient attack are needed", applicable=has_blackbox),
    ]
    if any(j.view != NAIVE for j in jobs):
        checks.append(_check(
            "naive_vs_adaptive", f"Naive attacks on defenses are not far weaker than adaptive ones ({label})", masked,
            "every naive attack came within 5 points of its adaptive twin",
        ))
    if spec.threat_model.norm.value == "linf" and spec.task.value == "classification" and by_label:
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
