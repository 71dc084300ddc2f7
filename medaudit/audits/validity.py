"""Validity checks: can the numbers support a claim? Every automatable check of Carlini et
al. 2019 (methods.md 12; each check's ``ref`` names its item): the model above chance,
budgets respected, outputs finite logits, the model one fixed function or attacked through
its randomness (EOT), gradients usable, no optimisation inside the forward pass, the
attacks' relative strength, converged and beyond random noise, and robust never above
clean. ``gating`` failures make the audit INVALID; the others are warnings.

A gap between two estimates counts when it exceeds sampling noise: the lower end of
Newcombe's interval on their difference (from each estimate's own binomial or bootstrap
interval at the spec's confidence) above 0, not a fixed number of points.

The strength checks compare attack families (:class:`AttackFamily`, declared by each
attack) and the view each job attacked (``Job.view``), never attack names or labels, so
they hold for vendors' attacks and defenses' views alike. The findings that need the
model run again come from :mod:`medaudit.audits.soundness`.
"""

from __future__ import annotations

import math
from typing import Any

from medaudit.audits.aggregation import facets_of
from medaudit.audits.records import has_nonfinite_output
from medaudit.core.components import CROSS_ENTROPY, MARGIN, AttackFamily, Facet, Norm, Task
from medaudit.core.host import Host
from medaudit.core.jobs import NAIVE, Job
from medaudit.core.spec import NO_DEFENSE, WORST_CASE, Spec, epsilon_label
from medaudit.core.tasks import protocol

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
#: A validity check whose subject is absent from the audit (e.g. no single-step attack to compare).
NOT_APPLICABLE = "N/A"

#: Slack for floating-point round-off when checking that a perturbation respects its budget.
BUDGET_TOLERANCE = 1e-5
#: The gap between two estimates that counts when they carry no interval (methods.md 12's fallback).
FALLBACK_TOLERANCE = 0.01
#: How the evidence names the tolerance of :func:`exceeds`.
BEYOND_NOISE = "beyond sampling noise (Newcombe interval on the difference)"
#: Attack success on the undefended twin below which an attack looks broken (methods.md 12, C18).
TWIN_SUCCESS = 0.95
#: An L-inf budget at which any classifier should be nearly always fooled (methods.md 12, C17).
LARGE_LINF = 16 / 255
#: Families that search with the model's gradients within the budget: the white box that
#: score- and decision-based attacks should not beat. Transfer and universal attacks are
#: weaker by design, so they are compared with nothing.
WHITE_BOX = frozenset({AttackFamily.SINGLE_STEP, AttackFamily.ITERATIVE, AttackFamily.MINIMUM_NORM})
BLACK_BOX = frozenset({AttackFamily.SCORE_BASED, AttackFamily.DECISION_BASED})


def validity_checks(
    spec: Spec, host: Host, jobs: list[Job], records: dict[str, list[dict]], rows: list[dict],
    gradient_health: dict[str, dict] | None = None, probe: dict[str, Any] | None = None, *,
    attacks: dict[str, Any] | None = None, clean: dict[str, dict] | None = None,
    soundness: dict[str, Any] | None = None, chance: float | None = None,
    averaging_views: dict[str, frozenset[str]] | None = None, cumulative: bool = False,
) -> list[dict]:
    """Checks that the numbers can support a claim. ``gating`` failures make the audit INVALID.
    ``probe``: the runner's findings on the audited model (``deterministic``,
    ``weights_unchanged``, ``randomized`` as the spec declares it, ``cases`` probed);
    ``attacks``: the spec's attack instances by label; ``clean``: the clean metrics by
    defense; ``soundness``: :mod:`medaudit.audits.soundness`'s findings (``behaviour`` of each
    model, ``noise``, ``convergence``); ``chance``: the share of the most frequent class;
    ``averaging_views``: per defense, the views that average over its randomness;
    ``cumulative``: the per-attack figures are cumulative (``runtime.strategy: verdict``),
    so the checks that compare attacks with each other do not apply."""
    headline = protocol(spec.task).headline
    clean_headline = protocol(spec.task).clean_headline
    checks = []
    if clean is not None:
        checks.append(chance_check(spec, clean, clean_headline, chance))
    checks.append(budget_check(spec, host, jobs, records))
    bumps = []
    for defense in sorted({r["defense"] for r in rows}):
        curve = [r for r in rows if r["defense"] == defense and r["attack"] == WORST_CASE]
        values = [(r["epsilon_label"], r["metrics"].get(headline)) for r in curve]
        for (e0, m0), (e1, m1) in zip(values, values[1:]):
            if m0 and m1 and m0.get("value") is not None and m1.get("value") is not None and exceeds(m1, m0):
                bumps.append(f"{defense}: {m0['value']:.3f} at {e0} -> {m1['value']:.3f} at {e1}")
    if headline in spec.metrics:
        clean_value = ((clean or {}).get(NO_DEFENSE, {}).get(clean_headline) or {}).get("value")
        checks += attack_strength_checks(spec, host, jobs, rows, headline, attacks, clean_value, cumulative)
        checks.append(
            {
                "id": "epsilon_monotonic", "ref": "C2",
                "title": f"Worst-case {headline.replace('_', ' ')} does not rise with epsilon",
                "status": WARN if bumps else PASS,
                "gating": False,
                "evidence": "; ".join(bumps) if bumps else "non-increasing for every defense, beyond sampling noise",
            }
        )
        if clean is not None:
            checks.append(robust_below_clean_check(rows, clean, headline, clean_headline))
    checks.append(outputs_check(jobs, records))
    if probe is not None:
        checks += model_checks(probe)
    if soundness is not None:
        behaviour = soundness.get("behaviour", {})
        if probe is not None and probe.get("randomized") and NO_DEFENSE in behaviour:
            behaviour = {**behaviour, NO_DEFENSE: {**behaviour[NO_DEFENSE], "randomized": True}}
        checks.append(logits_check(behaviour))
        checks.append(randomness_check(spec, jobs, behaviour, attacks or {}, averaging_views or {}))
        checks.append(dynamic_check(behaviour))
        if spec.task is Task.CLASSIFICATION:
            checks.append(noise_check(soundness.get("noise"), behaviour, rows, headline))
            checks.append(convergence_check(soundness.get("convergence"), spec))
    if gradient_health:
        checks.append(gradient_check(gradient_health))
    return checks


def exceeds(high: dict, low: dict) -> bool:
    """Whether the estimate ``high`` is above ``low`` by more than sampling noise allows: the
    lower end of Newcombe's hybrid interval on the difference, ``d - sqrt((a - l_a)^2 +
    (u_b - b)^2)`` from each estimate's own interval, is above 0 (Newcombe 1998, method 10;
    with Wilson intervals on proportions). Estimates without an interval need a gap of
    :data:`FALLBACK_TOLERANCE`."""
    a, b = high["value"], low["value"]
    bounds = (high.get("ci_low"), low.get("ci_high"))
    if all(v is not None and not math.isnan(v) for v in bounds):
        tolerance = math.hypot(a - bounds[0], bounds[1] - b)
    else:
        tolerance = FALLBACK_TOLERANCE
    return a - b > max(tolerance, 1e-12)


def chance_check(spec: Spec, clean: dict[str, dict], clean_headline: str, chance: float | None) -> dict:
    """C1: each model does better than chance on clean data, the share of the most frequent
    class (what always answering it scores). Gating where the clean accuracy's whole interval
    is at or below chance for a model a criterion judges (every model without criteria): a
    broken model, whose robustness says nothing. A warning where the interval still includes
    chance (too few cases to tell) or the model is judged by no criterion (a base classifier
    behind its defense)."""
    if spec.task is not Task.CLASSIFICATION or chance is None:
        return {"id": "clean_above_chance", "ref": "C1", "title": "Clean performance is above chance",
                "status": NOT_APPLICABLE, "gating": True,
                "evidence": "no chance level is defined for this task: the clean scores are in the results"}
    claimed = {c.defense for c in spec.acceptance.criteria} or set(clean)
    broken, unclear = [], []
    for defense, metrics in clean.items():
        m = metrics.get(clean_headline)
        if m is None or m.get("value") is None:
            continue
        low, high = m.get("ci_low", m["value"]), m.get("ci_high", m["value"])
        text = f"{defense}: {m['value']:.3f} (interval {low:.3f} to {high:.3f})"
        if high <= chance and defense in claimed:
            broken.append(text)
        elif low <= chance:
            unclear.append(text + ("" if defense in claimed else ", judged by no criterion"))
    share = f"chance ({chance:.3f}, the most frequent class's share)"
    evidence = [f"at or below {share}: " + "; ".join(broken)] if broken else []
    if unclear:
        evidence.append(f"not clearly above {share}: " + "; ".join(unclear))
    return {
        "id": "clean_above_chance", "ref": "C1", "title": "Clean accuracy is above chance",
        "status": FAIL if broken else WARN if unclear else PASS, "gating": not unclear or bool(broken),
        "evidence": ". ".join(evidence) if evidence else f"every model's clean accuracy interval lies above {share}",
    }


def robust_below_clean_check(rows: list[dict], clean: dict[str, dict], headline: str, clean_headline: str) -> dict:
    """Gating (C17): no robust value above its model's clean value beyond sampling noise; an
    attack cannot make a model better, so one that does points at a broken attack or scoring."""
    above = []
    for r in rows:
        m, c = r["metrics"].get(headline), (clean.get(r["defense"]) or {}).get(clean_headline)
        if m and c and m.get("value") is not None and c.get("value") is not None and exceeds(m, c):
            above.append(f"{r['defense']}, {r['attack']}, {r['epsilon_label']}: {m['value']:.3f} > clean {c['value']:.3f}")
    return {
        "id": "robust_not_above_clean", "ref": "C17", "title": f"{headline.replace('_', ' ').capitalize()} is not "
        f"above {clean_headline.replace('_', ' ')}", "status": FAIL if above else PASS, "gating": True,
        "evidence": "; ".join(above) if above else f"every row is at most its model's clean value, {BEYOND_NOISE}",
    }


def logits_check(behaviour: dict[str, dict]) -> dict:
    """Gating (C8): every deployed model returns logits (or log-probabilities), not
    probabilities, whose saturated softmax hides the gradient from every attack."""
    probabilities = [label for label, b in behaviour.items() if b["probabilities"]]
    return {
        "id": "outputs_are_logits", "ref": "C8", "title": "Models return logits, not probabilities",
        "status": FAIL if probabilities else PASS, "gating": True,
        "evidence": ("probabilities (every output in [0, 1], summing to 1) from " + ", ".join(probabilities)
                     + ": attacks see vanishing gradients; return logits") if probabilities
        else f"no model's outputs on the first cases were a probability distribution ({', '.join(behaviour)})",
    }


def randomness_check(spec: Spec, jobs: list[Job], behaviour: dict[str, dict], attacks: dict[str, Any],
                     averaging_views: dict[str, frozenset[str]]) -> dict:
    """Gating (C9): a randomised model (forward passes that differ, or the spec's
    ``model.randomized``) must be attacked, at every budget, by an attack that averages over
    its randomness: an attack with ``eot_samples`` above 1 (``autoattack`` version ``rand``)
    or a defense's view that averages (``eot``). A single draw's gradient overstates robustness."""
    randomised = [label for label, b in behaviour.items() if b["randomized"]]
    if not randomised:
        return {"id": "randomness_handled", "ref": "C9", "title": "Randomised models are attacked with EOT",
                "status": PASS, "gating": True,
                "evidence": f"repeated forward passes on the first cases gave the same outputs for every model "
                f"({', '.join(behaviour)}): no randomness to average over"}
    missing, averaged = [], []
    for label in randomised:
        views = averaging_views.get(label, frozenset())
        for eps in spec.threat_model.epsilons:
            if eps == 0:
                continue
            ran = [j for j in jobs if j.defense == label and not j.is_clean and not j.budget and j.epsilon == eps]
            eot = [j.attack for j in ran if j.view in views
                   or (j.spec_attack in attacks and attacks[j.spec_attack].eot_samples() > 1)]
            where = f"{label} at eps {epsilon_label(eps, spec.threat_model.norm)}"
            (averaged if eot else missing).append(f"{where}: {', '.join(eot)}" if eot else where)
    differ = "; ".join(f"{label} (outputs differ by up to {behaviour[label]['max_difference']:.2e})"
                       for label in randomised)
    return {
        "id": "randomness_handled", "ref": "C9", "title": "Randomised models are attacked with EOT",
        "status": FAIL if missing else PASS, "gating": True,
        "evidence": f"randomised: {differ}. " + (
            "No attack averaged over the randomness (EOT) for " + "; ".join(missing)
            + ": use autoattack with version: rand, an attack with eot_samples, or the defense's eot view"
            if missing else "averaged over the randomness (EOT) by " + "; ".join(averaged)),
    }


def dynamic_check(behaviour: dict[str, dict]) -> dict:
    """Warning (C11): a forward pass that calls autograd optimises at test time (a dynamic
    defense); fixed attacks then underestimate what an adaptive attacker achieves."""
    dynamic = [f"{label} ({b['autograd_in_forward']} calls)" for label, b in behaviour.items() if b["autograd_in_forward"]]
    return {
        "id": "no_test_time_optimisation", "ref": "C11", "title": "No optimisation inside the forward pass",
        "status": WARN if dynamic else PASS, "gating": False,
        "evidence": ("the forward pass calls torch.autograd (test-time optimisation or a dynamic defense) in "
                     + ", ".join(dynamic) + ": an attack adapted to it is needed") if dynamic
        else "no forward pass called torch.autograd.grad or Tensor.backward",
    }


def noise_check(noise: dict[str, dict] | None, behaviour: dict[str, dict], rows: list[dict] | None = None,
                headline: str = "robust_accuracy") -> dict:
    """C7: random noise of the threat model's norm and size must not fool a case the attacks'
    worst case left robust; if it does, the attacks are under-powered or the gradients masked,
    and the robust numbers are overstated. Gating when the cases noise found would move the
    worst case below the lower end of its interval (the numbers cannot stand), a warning when
    the shift is within sampling noise or the model is randomised (one noisy pass can differ
    by chance)."""
    title = "Random noise finds nothing the attacks missed"
    if not noise:
        return {"id": "noise_baseline", "ref": "C7", "title": title, "status": NOT_APPLICABLE, "gating": True,
                "evidence": "not run (validity.noise_cases: 0, or no norm-bounded attack)"}
    worst = {(r["defense"], r["epsilon_label"]): r["metrics"].get(headline) for r in rows or []
             if r["attack"] == WORST_CASE}
    overstated, within, tried = [], [], []
    for label, per_eps in noise.items():
        for eps, found in per_eps.items():
            tried.append(f"{label} {eps}: {found['robust']} of {found['cases']} cases robust")
            if not found["missed"]:
                continue
            shift = len(found["missed"]) / found["cases"]
            m = worst.get((label, eps)) or {}
            slack = m["value"] - m["ci_low"] if m.get("ci_low") is not None else 0.0
            where = (f"{label} at {eps}: {len(found['missed'])} of {found['cases']} cases "
                     f"({', '.join(found['missed'][:5])}), {shift:.3f} of the worst case")
            random = behaviour.get(label, {}).get("randomized")
            (overstated if shift > slack and not random else within).append(where)
    draws = next(iter(next(iter(noise.values())).values()))["draws"]
    parts = []
    if overstated:
        parts.append("; ".join(overstated) + " (beyond the worst case's interval: the robust numbers are overstated; "
                     "run stronger attacks)")
    if within:
        parts.append("; ".join(within) + " (within the worst case's interval, or a randomised model)")
    status = FAIL if overstated else WARN if within else PASS
    evidence = (f"{draws} random perturbations per case on the eps-sphere fooled cases every attack left robust: "
                + "; ".join(parts)) if parts else (
        f"{draws} random perturbations per case on the eps-sphere fooled none of the cases the attacks left robust ("
        + "; ".join(tried) + ")")
    return {"id": "noise_baseline", "ref": "C7", "title": title, "status": status, "gating": status != WARN,
            "evidence": evidence}


def convergence_check(convergence: dict[str, dict] | None, spec: Spec) -> dict:
    """Warning (C6): the strongest attack, re-run with more iterations and fresh restarts on
    the first cases, must not break significantly more of them (an exact one-sided binomial
    test on the cases the two runs disagree on, at the spec's confidence)."""
    title = "The strongest attack has converged"
    ran = {label: c for label, c in (convergence or {}).items() if "p_value" in c}
    if not ran:
        skipped = "; ".join(f"{label}: {c['skipped']}" for label, c in (convergence or {}).items() if "skipped" in c)
        return {"id": "attack_converged", "ref": "C6", "title": title, "status": NOT_APPLICABLE, "gating": False,
                "evidence": skipped or "not run (validity.convergence_cases: 0, or no iterative attack)"}
    alpha = 1 - spec.acceptance.confidence
    worse, seen = [], []
    for label, c in ran.items():
        line = (f"{label}: {c['attack']} at {c['epsilon_label']} on {c['cases']} cases, robust "
                f"{c['robust_before']:.3f} -> {c['robust_after']:.3f} with {c['factor']}x the iterations and "
                f"{c['restarts']} restarts ({c['newly_broken']} newly broken, {c['no_longer_broken']} not broken again; "
                f"p = {c['p_value']:.3g})")
        (worse if c["p_value"] < alpha else seen).append(line)
    return {
        "id": "attack_converged", "ref": "C6", "title": title, "status": WARN if worse else PASS, "gating": False,
        "evidence": ("more search broke significantly more cases (under-powered attack; raise its steps or restarts): "
                     + "; ".join(worse)) if worse else "; ".join(seen),
    }


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
        "id": "budget_respected", "ref": "C16",
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
        "id": "outputs_finite", "ref": "C8", "title": "Model outputs are finite (no NaN or Inf)",
        "status": FAIL if problems else PASS, "gating": True,
        "evidence": "NaN or Inf outputs, counted as errors, in " + "; ".join(problems) if problems
        else "every output of every job was finite",
    }


def model_checks(probe: dict[str, Any]) -> list[dict]:
    """Gating: the audited model is one fixed function during the audit (Carlini et al. 2019).
    Its randomness, declared or found, is :func:`randomness_check`'s: attacks must average over it."""
    return [
        {
            "id": "weights_unchanged", "ref": "-", "title": "The model's weights did not change during the audit",
            "status": PASS if probe["weights_unchanged"] else FAIL, "gating": True,
            "evidence": "the sha256 of the model's parameters and buffers after the last job is the one before the first"
            if probe["weights_unchanged"] else "the model changed its own parameters or buffers during the jobs: the "
            "numbers mix different models",
        },
    ]


def _check(check_id: str, ref: str, title: str, problems: list[str], ok: str, applicable: bool = True) -> dict:
    status = NOT_APPLICABLE if not applicable else WARN if problems else PASS
    return {"id": check_id, "ref": ref, "title": title, "status": status, "gating": False,
            "evidence": "; ".join(problems) if problems else ok}


#: Why the checks that compare attacks do not apply to cumulative per-attack figures.
CUMULATIVE = ("not compared: under runtime.strategy verdict each attack ran only on the cases the attacks before it "
              "left robust, so per-attack figures are cumulative; run with strategy full to compare attacks")


def attack_strength_checks(spec: Spec, host: Host, jobs: list[Job], rows: list[dict], headline: str,
                           attacks: dict[str, Any] | None = None, clean_value: float | None = None,
                           cumulative: bool = False) -> list[dict]:
    """Carlini et al. (2019) sanity checks on the attacks' relative strength (methods.md 12:
    C4 iterative >= single-step, C5 white-box >= black-box, C10 naive vs adaptive, C12
    untargeted >= targeted, C13 loss diversity, C18 the attacks break the undefended twin,
    C3/C17 large budgets). Each compares robust metrics of the same defense and budget; a gap
    counts when it exceeds sampling noise (:func:`exceeds`)."""
    metric = {(r["defense"], r["attack"], r["epsilon"]): r["metrics"].get(headline) for r in rows}
    metric = {k: m for k, m in metric.items() if m and m.get("value") is not None}
    # A label names one (spec attack, view) everywhere; attacks sized by their own budget
    # (corruptions) share no scale with the norm-bounded ones and are compared with nothing.
    by_label = {j.attack: j for j in jobs if not j.is_clean and not j.budget}
    cls = {label: host.get("attack", j.attack_name) for label, j in by_label.items()}
    family = {label: c.family for label, c in cls.items()}
    single, masked, blackbox, targeted = [], [], [], []
    for (defense, attack, eps), m in metric.items():
        if attack == WORST_CASE or attack not in by_label:
            continue
        v, job = m["value"], by_label[attack]
        where = f"{defense}, eps {epsilon_label(eps, spec.threat_model.norm)}"
        same_eps = [(a, w) for (d, a, e), w in metric.items() if d == defense and e == eps and a in by_label]
        if family[attack] == AttackFamily.SINGLE_STEP:  # against the iterative attacks on the same view
            beaten = [(a, w) for a, w in same_eps if family[a] == AttackFamily.ITERATIVE and by_label[a].view == job.view
                      and exceeds(w, m)]
            single += [f"{where}: {attack} {v:.3f} < {a} {w['value']:.3f}" for a, w in beaten]
        if job.view != NAIVE:
            twin = next((a for a, j in by_label.items() if j.spec_attack == job.spec_attack and j.view == NAIVE), None)
            naive = metric.get((defense, twin, eps))
            if naive is not None and exceeds(naive, m):
                masked.append(f"{where}: naive {twin} {naive['value']:.3f} vs {job.view} {v:.3f}")
        if family[attack] in BLACK_BOX:
            white = [w for a, w in same_eps if family[a] in WHITE_BOX]
            if white and exceeds(min(white, key=lambda w: w["value"]), m):
                blackbox.append(f"{where}: {attack} {v:.3f} < best white-box {min(w['value'] for w in white):.3f}")
        if cls[attack].targeted:
            untargeted = [(a, w) for a, w in same_eps if family[a] in WHITE_BOX and not cls[a].targeted]
            if untargeted and exceeds(min((w for _, w in untargeted), key=lambda w: w["value"]), m):
                best = min(untargeted, key=lambda aw: aw[1]["value"])
                targeted.append(f"{where}: targeted {attack} {v:.3f} < untargeted {best[0]} {best[1]['value']:.3f}")
    label = headline.replace("_", " ")
    families = set(family.values())
    has_pair = AttackFamily.SINGLE_STEP in families and AttackFamily.ITERATIVE in families
    has_blackbox = bool(BLACK_BOX & families) and bool(WHITE_BOX & families)
    has_targeted = any(c.targeted for c in cls.values()) and any(
        not c.targeted and c.family in WHITE_BOX for c in cls.values())
    noise = BEYOND_NOISE
    checks = [
        _check("iterative_beats_single_step", "C4",
               f"Iterative attacks do at least as well as single-step ones ({label})",
               single, f"no single-step attack beat an iterative one {noise}" if has_pair
               else "a single-step and an iterative gradient attack are needed", applicable=has_pair),
        _check("whitebox_beats_blackbox", "C5",
               f"White-box attacks do at least as well as score- and decision-based ones ({label})",
               blackbox, f"no gradient-free attack beat the best white-box attack {noise}" if has_blackbox
               else "a gradient-free and a gradient attack are needed", applicable=has_blackbox),
        _check("untargeted_beats_targeted", "C12",
               f"Untargeted attacks do at least as well as targeted ones ({label})", targeted,
               f"no targeted attack beat the best untargeted white-box attack {noise}" if has_targeted
               else "a targeted and an untargeted white-box attack are needed", applicable=has_targeted),
    ]
    if any(j.view != NAIVE for j in jobs):
        checks.append(_check(
            "naive_vs_adaptive", "C10", f"Naive attacks on defenses are not far weaker than adaptive ones ({label})",
            masked, f"no naive attack beat its adaptive twin {noise}",
        ))
    if spec.task is Task.CLASSIFICATION and attacks:
        checks.append(loss_diversity_check(jobs, attacks))
        if spec.defenses:
            checks.append(twin_check(spec, rows, headline, clean_value, by_label, family))
    if cumulative:  # each compares one attack's own figure with another's
        relative = {"iterative_beats_single_step", "whitebox_beats_blackbox", "untargeted_beats_targeted",
                    "naive_vs_adaptive", "attack_breaks_undefended_twin"}
        checks = [_check(c["id"], c["ref"], c["title"], [], CUMULATIVE, applicable=False) if c["id"] in relative else c
                  for c in checks]
    if spec.threat_model.norm.value == "linf" and spec.task.value == "classification" and by_label:
        top = max((e for (_, a, e) in metric if a == WORST_CASE), default=max(spec.threat_model.epsilons))  # that ran
        high = [f"{d}: {m['value']:.3f}" for (d, a, e), m in metric.items()
                if a == WORST_CASE and e == top and m["value"] > 0.1]
        checks.append(_check(
            "large_budget_breaks_model", "C3", "Robust accuracy falls towards 0 at large budgets",
            high if top >= LARGE_LINF else [],
            f"worst-case robust accuracy at eps {epsilon_label(top, Norm.LINF)} is at most 0.1 for every model"
            if top >= LARGE_LINF
            else f"the largest budget, {epsilon_label(top, Norm.LINF)}, is below {epsilon_label(LARGE_LINF, Norm.LINF)}",
            applicable=top >= LARGE_LINF,
        ))
    return checks


def loss_diversity_check(jobs: list[Job], attacks: dict[str, Any]) -> dict:
    """Warning (C13): a model attacked with only one kind of loss may flatten that loss
    (saturated softmax for cross-entropy, a rescaled margin) and hide robustness gaps; both a
    cross-entropy and a margin-type loss (CW, DLR, the boundary distance) should run."""
    problems, seen = [], []
    attacked = [j for j in jobs if not j.is_clean and not j.budget and j.spec_attack in attacks]
    for defense in sorted({j.defense for j in attacked}):
        used: dict[str, set[str]] = {}
        for j in attacked:
            if j.defense == defense:
                for kind in attacks[j.spec_attack].losses():
                    used.setdefault(kind, set()).add(j.attack)
        text = "; ".join(f"{kind}: {', '.join(sorted(labels))}" for kind, labels in sorted(used.items())) or "no loss declared"
        (seen if {CROSS_ENTROPY, MARGIN} <= set(used) else problems).append(f"{defense} ({text})")
    return _check("loss_diversity", "C13", "Attacks use both a cross-entropy and a margin loss",
                  [f"only one kind of loss for {p}: add a margin-loss attack (apgd-t, apgd-dlr, cw, square) or a "
                   "cross-entropy one (pgd, apgd-ce)" for p in problems],
                  "both kinds of loss for every model: " + "; ".join(seen))


def twin_check(spec: Spec, rows: list[dict], headline: str, clean_value: float | None, by_label: dict[str, Job],
               family: dict[str, AttackFamily]) -> dict:
    """Warning (C18): each white-box attack run against a defense must break the undefended
    model (its standard twin) at the largest budget, on at least :data:`TWIN_SUCCESS` of the
    cases it classifies correctly (``(clean - robust) / clean``); if not, the attack is
    likelier broken than the defense strong."""
    top = max(spec.threat_model.epsilons)
    robust = {r["attack"]: (r["metrics"].get(headline) or {}).get("value") for r in rows
              if r["defense"] == NO_DEFENSE and r["epsilon"] == top}
    weak, fine = [], []
    for label, job in sorted(by_label.items()):
        if family[label] in WHITE_BOX and job.view == NAIVE and robust.get(label) is not None and clean_value:
            rate = (clean_value - robust[label]) / clean_value
            (fine if rate >= TWIN_SUCCESS else weak).append(f"{label} {rate:.3f}")
    eps = epsilon_label(top, spec.threat_model.norm)
    return _check("attack_breaks_undefended_twin", "C18",
                  "Each white-box attack breaks the undefended model at the largest budget",
                  [f"success on the undefended model at eps {eps} below {TWIN_SUCCESS:.2f}: " + ", ".join(weak)]
                  if weak else [], f"attack success on the undefended model at eps {eps}: " + ", ".join(fine),
                  applicable=bool(weak or fine))


def gradient_check(gradient_health: dict[str, dict]) -> dict:
    """AutoAttack's zero-gradient flag (methods.md 12, C8) on the first batch of each model:
    all-zero gradients are a warning (masked gradients); non-finite ones fail the gate, since
    a gradient attack then steps along NaN."""
    problems = [
        f"{label}: {h['zero']} of {h['n']} inputs with an all-zero gradient, {h['nonfinite']} non-finite"
        for label, h in gradient_health.items() if h["zero"] or h["nonfinite"]
    ]
    check = _check("gradients_usable", "C8", "Input gradients are finite and non-zero", problems,
                   f"finite, non-zero input gradients for every model ({', '.join(gradient_health)})")
    nonfinite = any(h["nonfinite"] for h in gradient_health.values())
    return {**check, "status": FAIL if nonfinite else check["status"], "gating": True}
