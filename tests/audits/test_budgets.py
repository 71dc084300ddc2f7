"""Attacks sized by their own budget (a corruption's severity), not by the threat norm:
planned at their levels, checked by their own rule, reported beside the worst case."""

from __future__ import annotations

import textwrap

import pytest

import medaudit
from medaudit.audits.plan import plan_jobs
from medaudit.audits.validity import budget_check
from medaudit.core.components import AttackOutcome, Facet
from medaudit.core.errors import SpecError
from medaudit.core.host import get_host
from medaudit.core.jobs import Records
from medaudit.core.spec import load_spec
from medaudit.plugins.attacks.corruptions import RicianNoise
from tests.helpers import run_audit

ATTACKS = "attacks:\n  - name: pgd\n    params: {steps: 2}\n  - name: rician-noise\n    levels: [1, 2]"
EPSILONS = "threat_model:\n  norm: linf\n  epsilons: [1/255, 4/255]"


def criteria(*items: str) -> str:
    return "acceptance:\n  criteria:\n" + textwrap.indent("\n".join(items), "    ")


RICIAN_AT_2 = "- id: AC-N\n  metric: robust_accuracy\n  attack: rician-noise\n  epsilon: 2\n  op: '>='\n  threshold: 0.1"
WORST_AT_1 = "- id: AC-W\n  metric: robust_accuracy\n  attack: worst_case\n  epsilon: 1/255\n  op: '>='\n  threshold: 0.1"


def test_planned_at_its_levels_not_at_the_epsilons(write_spec, host):
    spec = load_spec(write_spec(attacks=ATTACKS, threat_model=EPSILONS), host)
    jobs = [j for j in plan_jobs(spec, host) if j.defense == "none" and not j.is_clean]
    noise = [j for j in jobs if j.spec_attack == "rician-noise"]
    assert [(j.epsilon, j.budget, j.epsilon_label) for j in noise] == [(1.0, "severity", "severity 1"),
                                                                       (2.0, "severity", "severity 2")]
    assert all("norm" not in j.config and j.config["budget"] == "severity" for j in noise)
    assert [(j.epsilon_label, j.budget) for j in jobs if j.spec_attack == "pgd"] == [("1/255", ""), ("4/255", "")]
    assert noise[0].title() == "none: rician-noise severity 1"


def test_default_levels_are_the_attacks_own(write_spec, host):
    spec = load_spec(write_spec(attacks="attacks:\n  - name: rician-noise"), host)
    levels = [j.epsilon for j in plan_jobs(spec, host) if not j.is_clean]
    assert levels == list(RicianNoise.budget.levels)


@pytest.mark.parametrize("attacks,acceptance,message", [
    ("attacks:\n  - name: pgd\n    levels: [1, 2]", None, "'levels' is for attacks sized by their own budget"),
    (ATTACKS, criteria(RICIAN_AT_2.replace("epsilon: 2", "epsilon: 3")),
     "epsilon 3 is not in severity levels of attack 'rician-noise' (1, 2)"),
    ("attacks:\n  - name: rician-noise", criteria(WORST_AT_1), "every attack here is sized by its own budget"),
    ("attacks:\n  - name: rician-noise\n    levels: [0]", None, "greater than 0"),
])
def test_spec_refuses_levels_that_cannot_run(attacks, acceptance, message, write_spec, host):
    overrides = {"attacks": attacks, "threat_model": EPSILONS, **({"acceptance": acceptance} if acceptance else {})}
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(**overrides), host)
    assert message in str(err.value)


LIMIT_AT_2 = RicianNoise.budget.limit(2.0)  # the calibrated noise std of severity 2


def _records(measure, attacked=True, in_range=True):
    extras = {} if measure is None else {"corruption_strength": measure}
    return Records([{"attacked": attacked, "in_range": in_range, "linf": 0.3, "extras": extras}],
                   {Facet.PERTURBATION, Facet.EXTRAS})


@pytest.mark.parametrize("measure,attacked,status", [
    (LIMIT_AT_2, True, "PASS"),  # severity 2's calibrated sigma, the limit itself
    (LIMIT_AT_2 * 1.2, True, "FAIL"),  # more noise than severity 2 allows
    (None, True, "FAIL"),      # a changed case whose size was not recorded
    (None, False, "PASS"),     # a case not attacked has nothing to measure
])
def test_budget_check_reads_the_attacks_own_measure_not_the_norm(measure, attacked, status, write_spec, host):
    """The records' L-inf size (0.3) is far above any epsilon: the L-p rule would fail every
    corruption; the budget's own rule reads its measure against its level's limit."""
    spec = load_spec(write_spec(attacks=ATTACKS, threat_model=EPSILONS), host)
    [job] = [j for j in plan_jobs(spec, host) if j.defense == "none" and j.budget and j.epsilon == 2]
    check = budget_check(spec, host, [job], {job.id: _records(measure, attacked)})
    assert check["status"] == status, check["evidence"]
    assert "rician-noise: largest excess of its corruption_strength over its severity's limit" in check["evidence"]


class LoudNoise(RicianNoise):
    """Adds three times the noise its level allows (and records it): the check must catch it by its own measure."""

    name = "loud-noise"

    def perturb(self, model, x, y, *, eps, norm, generator):
        sigma = 3 * self.budget.limit(eps)
        return AttackOutcome(self.op.fn(x, sigma, generator), {"corruption_strength": [sigma] * len(x)})


class LoudPlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(LoudNoise)


@pytest.mark.slow
def test_a_run_with_noise_rows_beside_the_worst_case(write_spec, tmp_path):
    """End to end: the noise jobs pass the budget gate (an L-p check would make this run
    INVALID), get rows of their own, stay out of the worst case, are judged by a criterion
    at a level, and get their own curve; an attack exceeding its own limit is INVALID."""
    host = get_host(load_entry_points=False)
    spec = load_spec(write_spec(
        attacks=ATTACKS, threat_model=EPSILONS, acceptance=criteria(RICIAN_AT_2, WORST_AT_1),
        data="data:\n  dataset: phantom\n  params: {n: 32, size: 64, seed: 0}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 32\n  output_dir: {tmp_path}"), host)
    results = run_audit(spec, host).results
    checks = {c["id"]: c for c in results["validity"]}
    assert checks["budget_respected"]["status"] == "PASS", checks["budget_respected"]["evidence"]
    rows = {(r["attack"], r["epsilon_label"]): r for r in results["rows"] if r["defense"] == "none"}
    assert {k for k in rows if k[0] == "rician-noise"} == {("rician-noise", "severity 1"), ("rician-noise", "severity 2")}
    assert all(rows["rician-noise", f"severity {s}"]["budget"] == "severity" for s in (1, 2))
    for eps in ("1/255", "4/255"):  # the worst case is PGD's alone, though noise at severity 2 does more harm
        assert rows["worst_case", eps]["metrics"]["robust_accuracy"] == rows["pgd", eps]["metrics"]["robust_accuracy"]
    judged = {c["id"]: c for c in results["acceptance"]["criteria"]}
    noise = rows["rician-noise", "severity 2"]["metrics"]["robust_accuracy"]
    assert judged["AC-N"]["epsilon_label"] == "severity 2" and judged["AC-N"]["estimate"] == noise["value"]
    assert "robust-accuracy-severity" in {f["id"] for f in results["figures"]}
    assert [a["budget"]["name"] if a["budget"] else None for a in results["attacks"]] == [None, "severity"]

    loud_host = get_host(load_entry_points=False, extra_plugins=[("loud", LoudPlugin())])
    loud = load_spec(write_spec(
        attacks="attacks:\n  - name: loud-noise\n    levels: [1]", threat_model=EPSILONS, name="loud.yaml",
        data="data:\n  dataset: phantom\n  params: {n: 8, size: 64, seed: 0}",
        runtime=f"runtime:\n  device: cpu\n  output_dir: {tmp_path / 'loud'}"), loud_host)
    outcome = run_audit(loud, loud_host)
    [check] = [c for c in outcome.results["validity"] if c["id"] == "budget_respected"]
    assert check["status"] == "FAIL" and outcome.results["verdict"] == "INVALID"
