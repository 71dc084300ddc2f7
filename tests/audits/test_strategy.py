"""runtime.strategy verdict: attacks cheapest first, each on the cases still robust, adversarials
carried to larger budgets, and a stop once the blocking criteria are decided; the worst case
and the verdict are those of strategy full."""

from __future__ import annotations

import json

import pytest

from medaudit.audits.plan import plan_jobs
from medaudit.audits.records import read_records
from medaudit.audits.strategy import Verdict, carried_over, exact_jobs, run_order
from medaudit.core.errors import SpecError
from medaudit.core.jobs import Records
from medaudit.core.spec import load_spec
from tests.audits.test_results_schema import SMALL_CLASSIFIER
from tests.conftest import spec_text
from tests.helpers import run_audit

EPSILONS = "threat_model:\n  norm: linf\n  epsilons: [0.5/255, 1/255, 4/255]"
#: Deterministic attacks only: a case's result does not depend on the other cases of its batch.
ATTACKS = ("attacks:\n  - name: pgd\n    params: {steps: 5, random_start: false}\n  - name: fgsm\n  - name: deepfool\n    params: {steps: 10}\n"
           "  - name: bim\n    params: {steps: 3}")
EVERY_BUDGET = ("acceptance:\n  criteria:\n"
                "    - {id: AC-0, metric: robust_accuracy, attack: worst_case, epsilon: 0.5/255, op: '>=', threshold: 0.3}\n"
                + "".join(f"    - {{id: AC-{i}, metric: perturbation_linf_max, attack: worst_case, epsilon: {eps}, op: '<=', "
                          "threshold: 0.5}\n" for i, eps in ((1, "1/255"), (2, "4/255"))))
SMALL_BUDGET = ("acceptance:\n  criteria:\n"
                "    - {id: AC-01, metric: robust_accuracy, attack: worst_case, epsilon: 0.5/255, op: '>=', threshold: 0.3}\n"
                "    - {id: AC-02, metric: robust_accuracy, attack: worst_case, epsilon: 4/255, op: '>=', threshold: 0.3,"
                " severity: advisory}")
METRICS = "metrics: [clean_accuracy, robust_accuracy, attack_success_rate, perturbation_linf_max, min_norm_median]"


def _spec(tmp_path, host, strategy: str, acceptance: str = EVERY_BUDGET, attacks: str = ATTACKS, name: str = "spec"):
    path = tmp_path / f"{name}-{strategy}.yaml"
    path.write_text(spec_text(
        threat_model=EPSILONS, attacks=attacks, acceptance=acceptance + "\n" + METRICS,
        model=f"model:\n  loader: demo\n  params: {json.dumps(SMALL_CLASSIFIER)}", report="report:\n  figures: []",
        data="data:\n  dataset: phantom\n  params: {n: 32, size: 32, seed: 0}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 16\n  seed: 0\n  strategy: {strategy}"), encoding="utf-8")
    return load_spec(path, host)


def _worst(results: dict) -> dict:
    return {r["epsilon_label"]: r["metrics"]["robust_accuracy"] for r in results["rows"] if r["attack"] == "worst_case"}


def _robust_cases(run_dir, results: dict, eps: float) -> set[str]:
    """The cases every attack left correct at ``eps``, from the records."""
    jobs = [j for j in results["jobs"] if j["attack"] != "clean" and j["epsilon"] == eps and "skipped" not in j]
    per_job = [{r["case"] for r in read_records(run_dir, j["id"]) if r["adv_correct"]} for j in jobs]
    return set.intersection(*per_job)


# -- order, scope and the stop rule ----------------------------------------------------------


def test_verdict_orders_clean_first_then_budget_by_budget_cheapest_first(tmp_path, host):
    spec = _spec(tmp_path, host, "verdict")
    from medaudit.audits.execute import _Builder

    build = _Builder(spec, host, None)
    attacks = {a.label: build.component("attack", a.name, a.params) for a in spec.attacks}
    jobs = plan_jobs(spec, host)
    order = run_order(spec, jobs, attacks, num_classes=2)
    assert sorted(j.id for j in order) == sorted(j.id for j in jobs)
    assert order[0].is_clean
    assert [j.epsilon for j in order[1:]] == sorted(j.epsilon for j in order[1:])
    first = [j.attack for j in order[1:5]]
    assert first == ["fgsm", "bim", "pgd", "deepfool"], first  # costs 3, 9, 15, 30 model passes per case
    full = _spec(tmp_path, host, "full")
    assert run_order(full, plan_jobs(full, host), attacks, 2) == plan_jobs(full, host)


def test_a_spec_without_a_blocking_criterion_cannot_use_the_verdict_strategy(tmp_path, host):
    advisory = ("acceptance:\n  criteria:\n    - {id: A, metric: clean_accuracy, op: '>=', threshold: 0.5, "
                "severity: advisory}")
    with pytest.raises(SpecError, match="without a blocking criterion"):
        _spec(tmp_path, host, "verdict", acceptance=advisory)


def test_the_default_strategy_and_the_figures_leave_the_spec_digest_as_before(tmp_path, host):
    import hashlib

    path = tmp_path / "plain.yaml"
    path.write_text(spec_text(), encoding="utf-8")
    plain = load_spec(path, host)
    path.write_text(spec_text(runtime="runtime:\n  device: cpu\n  batch_size: 32\n  seed: 0\n  strategy: full",
                              report="report:\n  figures: []"), encoding="utf-8")
    assert load_spec(path, host).digest() == plain.digest()
    data = plain.model_dump(mode="json")  # as specs were hashed before these settings existed
    data["runtime"].pop("strategy")
    data["report"].pop("figures")
    for where in ("output_dir", "history", "executor", "ray"):
        data["runtime"].pop(where)
    assert plain.digest() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert _spec(tmp_path, host, "verdict").digest() != _spec(tmp_path, host, "full").digest()


def _row(case: str, correct: bool, attacked: bool = True, linf: float = 0.0) -> dict:
    return {"case": case, "attacked": attacked, "adv_correct": correct, "linf": linf, "adv_pred": 0 if correct else 1}


def test_carried_over_takes_the_first_adversarial_of_the_same_or_a_smaller_budget(tmp_path, host):
    spec = _spec(tmp_path, host, "verdict")
    jobs = {(j.attack, j.epsilon): j for j in plan_jobs(spec, host)}
    e0, e1, e2 = spec.threat_model.epsilons
    records = {
        jobs["fgsm", e0].id: [_row("a", False, linf=e0), _row("b", True), _row("c", True), _row("d", True, attacked=False)],
        jobs["pgd", e0].id: [_row("a", False, linf=e0 / 2), _row("b", False, linf=e0), _row("c", True), _row("d", True, False)],
        jobs["fgsm", e2].id: [_row("a", True), _row("b", True), _row("c", False, linf=e2), _row("d", True, False)],
    }
    earlier = [jobs["fgsm", e0], jobs["pgd", e0], jobs["fgsm", e2]]
    found = carried_over(jobs["pgd", e1], earlier, lambda i: records[i], 4)
    assert found[0]["carried"] == jobs["fgsm", e0].id and found[0]["linf"] == e0  # the first that broke it
    assert found[1]["carried"] == jobs["pgd", e0].id
    assert found[2] is None  # broken only at a larger budget
    assert found[3] is None  # never attacked (wrong when clean)
    again = carried_over(jobs["bim", e2], [jobs["pgd", e1]], lambda i: [found[0], _row("b", True), _row("c", True),
                                                                         _row("d", True, False)], 4)
    assert again[0]["carried"] == jobs["fgsm", e0].id  # a carried record names the job that found the adversarial


def _records(rows: list[dict]) -> Records:
    from medaudit.core.components import Facet

    return Records([{"label": 1, "clean_pred": 1, "clean_correct": True, "clean_finite": True, "adv_finite": True, "in_range": True,
                     **r} for r in rows], {Facet.CLASSIFICATION, Facet.PERTURBATION, Facet.FINITE})


def test_the_run_stops_at_a_failed_worst_case_before_every_attack_ran_but_not_at_a_pass(tmp_path, host):
    spec = _spec(tmp_path, host, "verdict", acceptance=SMALL_BUDGET)
    jobs = plan_jobs(spec, host)
    judge = Verdict(spec, host, jobs)
    clean = next(j for j in jobs if j.is_clean)
    fgsm = next(j for j in jobs if j.attack == "fgsm" and j.epsilon == spec.threat_model.epsilons[0])
    n = 48
    broken = {clean.id: _records([{"case": str(i), "adv_correct": True, "attacked": False} for i in range(n)]),
              fgsm.id: _records([{"case": str(i), "adv_correct": i < 5, "attacked": True} for i in range(n)])}
    decision = judge.decide({clean.id, fgsm.id}, broken.__getitem__)
    assert decision.stop and "AC-01 failed before every attack" in decision.reason
    robust = {**broken, fgsm.id: _records([{"case": str(i), "adv_correct": True, "attacked": True} for i in range(n)])}
    assert not judge.decide({clean.id, fgsm.id}, robust.__getitem__).stop  # more attacks may still break cases
    done = {j.id for j in jobs if j.is_clean or j.epsilon == spec.threat_model.epsilons[0]}
    every = {j: robust[fgsm.id] for j in done - {clean.id}} | {clean.id: robust[clean.id]}
    decision = judge.decide(done, every.__getitem__)
    assert decision.stop and "every blocking criterion is decided" in decision.reason  # AC-02 is advisory


def test_a_failed_clean_criterion_stops_before_any_attack(tmp_path, host):
    clean_fails = "acceptance:\n  criteria:\n    - {id: C, metric: clean_accuracy, op: '>=', threshold: 0.9}\n" + \
        "    - {id: R, metric: robust_accuracy, attack: worst_case, epsilon: 4/255, op: '>=', threshold: 0.1}"
    spec = _spec(tmp_path, host, "verdict", acceptance=clean_fails)
    jobs = plan_jobs(spec, host)
    clean = next(j for j in jobs if j.is_clean)
    rows = _records([{"case": str(i), "adv_correct": i < 30, "attacked": False, "clean_correct": i < 30,
                      "clean_pred": 1 if i < 30 else 0} for i in range(48)])
    decision = Verdict(spec, host, jobs).decide({clean.id}, {clean.id: rows}.__getitem__)
    assert decision.stop and "C failed" in decision.reason


def test_jobs_a_criterion_reads_on_their_own_run_on_every_case(tmp_path, host):
    own = ("acceptance:\n  criteria:\n    - {id: P, metric: robust_accuracy, attack: pgd, epsilon: 1/255, op: '>=', "
           "threshold: 0.1}")
    spec = _spec(tmp_path, host, "verdict", acceptance=own)
    jobs = plan_jobs(spec, host)
    assert exact_jobs(spec, host, jobs) == {j.id for j in jobs if j.attack == "pgd" and j.epsilon == 1 / 255}


# -- whole runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same deterministic audit run with each strategy (criteria at every budget: nothing skipped)."""
    from medaudit.core.host import get_host

    host = get_host(load_entry_points=False)
    tmp = tmp_path_factory.mktemp("strategies")
    out = {}
    for strategy in ("full", "verdict"):
        spec = _spec(tmp, host, strategy)
        outcome = run_audit(spec, host, run_dir=tmp / strategy)
        out[strategy] = (outcome.run_dir, outcome.results)
    return out


def test_verdict_gives_full_s_worst_case_case_by_case_and_its_verdict(both):
    (full_dir, full), (verdict_dir, verdict) = both["full"], both["verdict"]
    assert verdict["verdict"] == full["verdict"]
    assert [c["verdict"] for c in verdict["acceptance"]["criteria"]] == [c["verdict"] for c in full["acceptance"]["criteria"]]
    for label, value in _worst(full).items():
        assert _worst(verdict)[label]["successes"] == value["successes"], label
        assert _worst(verdict)[label]["ci_low"] == pytest.approx(value["ci_low"])
    for eps in full["threat_model"]["epsilons"]:
        assert _robust_cases(verdict_dir, verdict, eps) == _robust_cases(full_dir, full, eps)
    assert verdict["clean"] == full["clean"]


def test_verdict_attacks_fewer_cases_and_says_which_records_are_carried(both):
    (full_dir, full), (verdict_dir, verdict) = both["full"], both["verdict"]
    attacked = {}
    for name, run_dir, results in (("full", full_dir, full), ("verdict", verdict_dir, verdict)):
        attacked[name] = sum(r["attacked"] and not r.get("carried") for j in results["jobs"] if j["attack"] != "clean"
                             for r in read_records(run_dir, j["id"]))
    assert attacked["verdict"] < attacked["full"]
    strategy = verdict["strategy"]
    assert strategy["name"] == "verdict" and strategy["carried"] and strategy["stopped"] is None
    assert full["strategy"] == {"name": "full", "order": [j["id"] for j in full["jobs"]]}
    job_id, n = next(iter(strategy["carried"].items()))
    rows = read_records(verdict_dir, job_id)
    carried = [r for r in rows if r["carried"]]
    assert len(carried) == n and all(not r["adv_correct"] and r["attacked"] for r in carried)
    assert all(r["linf"] <= next(j["epsilon"] for j in verdict["jobs"] if j["id"] == job_id) + 1e-6 for r in carried)
    # Per-attack rows are cumulative: never above the attack's own figure.
    own = {(r["attack"], r["epsilon_label"]): r["metrics"]["robust_accuracy"]["value"] for r in full["rows"]}
    for r in verdict["rows"]:
        assert r["metrics"]["robust_accuracy"]["value"] <= own[r["attack"], r["epsilon_label"]] + 1e-12
    checks = {c["id"]: c for c in verdict["validity"]}
    assert checks["iterative_beats_single_step"]["status"] == "N/A"
    assert "cumulative" in checks["iterative_beats_single_step"]["evidence"]
    html = (verdict_dir / "report.html").read_text(encoding="utf-8")
    assert "Per-attack figures are cumulative" in html


def test_verdict_stops_once_the_blocking_criteria_are_decided_and_lists_what_it_skipped(tmp_path, host):
    full = run_audit(_spec(tmp_path, host, "full", acceptance=SMALL_BUDGET), host, run_dir=tmp_path / "f").results
    outcome = run_audit(_spec(tmp_path, host, "verdict", acceptance=SMALL_BUDGET), host, run_dir=tmp_path / "v")
    verdict = outcome.results
    assert verdict["verdict"] == full["verdict"]
    assert _worst(verdict)["0.5/255"]["successes"] == _worst(full)["0.5/255"]["successes"]
    skipped = verdict["strategy"]["skipped"]
    assert {s["job"] for s in skipped} == {j["id"] for j in verdict["jobs"] if j["epsilon"] > 0.5 / 255 + 1e-9}
    assert all("every blocking criterion is decided" in s["reason"] for s in skipped)
    assert set(_worst(verdict)) == {"0.5/255"}
    advisory = next(c for c in verdict["acceptance"]["criteria"] if c["id"] == "AC-02")
    assert advisory["verdict"] == "INCONCLUSIVE" and "skipped" in advisory["reason"]
    events = [json.loads(line) for line in (outcome.run_dir / "timeline.jsonl").read_text().splitlines()]
    assert any(e["event"] == "early_stop" for e in events)
    import jsonschema

    from medaudit.audits.results_schema import results_json_schema
    from tests.audits.test_results_schema import undescribed_keys

    schema = results_json_schema()
    jsonschema.Draft202012Validator(schema).validate(verdict)
    assert undescribed_keys(schema, schema, verdict) == []


def test_an_interrupted_verdict_run_resumes_to_the_same_results(both, tmp_path):
    from medaudit.core.errors import ExitCode
    from medaudit.core.host import get_host
    from tests.helpers import StopAfter

    host = get_host(load_entry_points=False, extra_plugins=[("stopper", StopAfter(4))])
    spec = _spec(tmp_path, host, "verdict")
    with pytest.raises(Exception) as info:
        run_audit(spec, host, run_dir=tmp_path / "run")
    assert info.value.exit_code == ExitCode.INTERRUPTED
    counter = StopAfter(-1)
    host = get_host(load_entry_points=False, extra_plugins=[("counter", counter)])
    resumed = run_audit(_spec(tmp_path, host, "verdict"), host, tmp_path / "run").results
    _, reference = both["verdict"]
    assert len(counter.seen) == len(reference["strategy"]["order"]) - 4
    assert resumed["rows"] == reference["rows"]
    assert resumed["strategy"]["carried"] == reference["strategy"]["carried"]
    assert resumed["acceptance"] == reference["acceptance"]


def test_compare_sets_a_verdict_run_against_a_full_one_on_the_worst_case_only(both, host):
    from medaudit.audits.compare import compare_runs

    (full_dir, _), (verdict_dir, _) = both["full"], both["verdict"]
    found = compare_runs(full_dir, verdict_dir, host=host)
    assert "run B used runtime.strategy verdict" in found["strategy_note"]
    assert {e["attack"] for e in found["entries"]} == {"clean", "worst_case"}
    worst = [e for e in found["entries"] if e["attack"] == "worst_case" and e["metric"] == "robust_accuracy"]
    assert len(worst) == 3 and all(e["difference"] == 0 and not e["significant"] for e in worst)


def test_a_worst_case_that_fails_early_stops_the_run_and_its_row_says_it_is_an_upper_bound(tmp_path, host):
    fails = ("acceptance:\n  criteria:\n    - {id: R, metric: robust_accuracy, attack: worst_case, epsilon: 4/255, "
             "op: '>=', threshold: 0.6}")
    full = run_audit(_spec(tmp_path, host, "full", acceptance=fails), host, run_dir=tmp_path / "f").results
    verdict = run_audit(_spec(tmp_path, host, "verdict", acceptance=fails), host, run_dir=tmp_path / "v").results
    assert full["verdict"] == verdict["verdict"] == "FAIL"
    assert "R failed before every attack at its budget ran" in verdict["strategy"]["stopped"]["reason"]
    row = next(r for r in verdict["rows"] if r["attack"] == "worst_case" and r["epsilon_label"] == "4/255")
    assert row["skipped_attacks"]  # the costlier attacks at 4/255 never ran
    assert row["metrics"]["robust_accuracy"]["value"] >= _worst(full)["4/255"]["value"]
    assert verdict["acceptance"]["criteria"][0]["compared"] < 0.6


def test_a_minimum_norm_attack_searches_each_case_once_across_budgets_and_subsets():
    """Under verdict a larger budget attacks a subset of what a smaller one did: the cached search serves it."""
    import torch

    from medaudit.plugins.attacks.minimum_norm import DeepFool, DeepFoolParams
    from tests.helpers import run

    searched = []

    class Counting(DeepFool):
        def minimal(self, model, x, y, **kwargs):
            searched.append(len(x))
            return super().minimal(model, x, y, **kwargs)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval().requires_grad_(False)
    x = torch.rand(6, 3, 8, 8)
    y = model(x).argmax(1)
    attack = Counting(DeepFoolParams(steps=10))
    run(attack, model, x, y, 0.05)
    subset = [1, 3, 4]
    later = run(attack, model, x[subset], y[subset], 0.1)
    assert searched == [6]
    alone = run(Counting(DeepFoolParams(steps=10)), model, x[subset], y[subset], 0.1)
    assert torch.equal(later.adversarial, alone.adversarial) and later.extras == alone.extras
