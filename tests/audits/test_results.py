"""Statistics and verdict logic on hand-made numbers."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from medaudit import hookimpl
from medaudit.audits.aggregation import compute_metric, detection_summary, per_class_table
from medaudit.audits.results import judge, validity_checks, wilson_interval
from medaudit.core.components import Attack, AttackFamily, Facet, Norm, Task
from medaudit.core.host import get_host
from medaudit.core.jobs import Job, Records
from medaudit.core.spec import WORST_CASE, Criterion
from medaudit.core.tasks import worst_case_records
from medaudit.plugins.metrics.classification import MinNormMedian, RobustAccuracy


def test_wilson_interval_matches_reference_values():
    # Reference: Wilson 95% interval for 8/10 is (0.4902, 0.9433); for 0/10 (0, 0.2775).
    low, high = wilson_interval(8, 10, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 10, 0.95)
    assert low == 0 and round(high, 4) == 0.2775


def crit(**kw) -> Criterion:
    return Criterion.model_validate({"id": "A", "metric": "robust_accuracy", "epsilon": 0.01, **kw})


VALUE = {"value": 0.8, "n": 10, "successes": 8, "ci_low": 0.4902, "ci_high": 0.9433}


@pytest.mark.parametrize(
    "kw,verdict,compared",
    [
        ({"op": ">=", "threshold": 0.49}, "PASS", 0.4902),  # lower bound by default for >=
        ({"op": ">=", "threshold": 0.50}, "FAIL", 0.4902),
        ({"op": ">=", "threshold": 0.50, "statistic": "point"}, "PASS", 0.8),
        ({"op": "<=", "threshold": 0.95}, "PASS", 0.9433),  # upper bound for <=
        ({"op": "<=", "threshold": 0.94}, "FAIL", 0.9433),
        ({"op": ">=", "threshold": 0.1, "min_n": 11}, "INCONCLUSIVE", 0.4902),
    ],
)
def test_judge(kw, verdict, compared):
    out = judge(crit(**kw), VALUE, Norm.LINF)
    assert out["verdict"] == verdict and out["compared"] == compared


def test_judge_without_value_is_inconclusive():
    assert judge(crit(op=">=", threshold=0.5), None, Norm.LINF)["verdict"] == "INCONCLUSIVE"


def test_worst_case_needs_every_attack_to_fail():
    a = [{"adv_correct": True, "in_range": True, "linf": 0.1}, {"adv_correct": False, "in_range": True, "linf": 0.2}]
    b = [{"adv_correct": False, "in_range": True, "linf": 0.3}, {"adv_correct": True, "in_range": True, "linf": 0.4}]
    merged = worst_case_records([a, b])
    assert [r["adv_correct"] for r in merged] == [False, False]
    assert [r["linf"] for r in merged] == [0.3, 0.2]  # the record of the attack that broke it


# -- facets, not keys -------------------------------------------------------------------

CLASSIFIED = {Facet.CLASSIFICATION, Facet.PERTURBATION, Facet.FINITE}


def rows(min_norms: list) -> list[dict]:
    return [{"attacked": True, "adv_correct": False, "in_range": True, "min_norm": m} for m in min_norms]


def test_a_metric_runs_only_on_records_declaring_what_it_needs():
    minimal = Records(rows([0.1, 0.2, 0.3]), CLASSIFIED | {Facet.MINIMUM_NORM})
    assert compute_metric(MinNormMedian(), minimal, 0.95)["value"] == 0.2
    # The same fields, undeclared: no value (a key present by chance is no minimum-norm search).
    assert compute_metric(MinNormMedian(), Records(minimal, CLASSIFIED), 0.95) is None
    assert compute_metric(RobustAccuracy(), Records(minimal, {Facet.PERTURBATION}), 0.95) is None


def test_the_worst_case_keeps_only_the_facets_every_attack_declares():
    deepfool = Records(rows([0.1, 0.2]), CLASSIFIED | {Facet.MINIMUM_NORM})
    fgsm = Records([{"attacked": True, "adv_correct": True, "in_range": True}] * 2, CLASSIFIED)
    merged = worst_case_records([fgsm, deepfool], Task.CLASSIFICATION)
    assert merged.facets == CLASSIFIED
    assert compute_metric(MinNormMedian(), merged, 0.95) is None
    assert compute_metric(RobustAccuracy(), merged, 0.95)["value"] == 0.0


def test_tables_follow_the_declared_facets():
    dense = [{"clean_dice": [1.0, 0.8], "adv_dice": [1.0, 0.4]}]
    assert per_class_table(Records(dense, {Facet.SEGMENTATION}), ["bg", "organ"])[1] == \
        {"class": "organ", "clean_dice": 0.8, "dice": 0.4}
    assert per_class_table(Records(dense, ()), ["bg", "organ"]) == []
    scored = [{"clean_score": 0.1, "adv_score": 0.9, "adv_pred": 1, "label": 0, "adv_rejected": True}]
    assert detection_summary(Records(scored, {Facet.CLASSIFICATION})) is None
    assert detection_summary(Records(scored, {Facet.CLASSIFICATION, Facet.REJECTION})) is None  # rejects, no scores
    detector = {Facet.CLASSIFICATION, Facet.REJECTION, Facet.DETECTION_SCORE}
    assert detection_summary(Records(scored, detector))["rejected"] == 1.0


# -- attack strength compares families ---------------------------------------------------


class VendorIterative(Attack):
    """A vendor's iterative attack, under a name medaudit has never heard of."""

    name = "vendor-walk"
    family = AttackFamily.ITERATIVE

    def perturb(self, model, x, y, *, eps, norm, generator):
        return x


class VendorPlugin:
    @hookimpl
    def register_attacks(self, register):
        register(VendorIterative)


EPS = 2 / 255


def strength(values: dict[tuple[str, str], float], views: dict[str, tuple[str, str]] | None = None) -> dict:
    """The validity checks of hand-made rows: ``values`` maps (attack label, attack name) to
    robust accuracy; ``views`` maps a label to (spec attack, view) when not naive."""
    host = get_host(load_entry_points=False, extra_plugins=[("vendor", VendorPlugin())])
    spec = SimpleNamespace(threat_model=SimpleNamespace(norm=Norm.LINF, epsilons=[EPS]), task=Task.CLASSIFICATION,
                           metrics=["robust_accuracy"])
    jobs, table = [], []
    for (label, name), v in values.items():
        spec_attack, view = (views or {}).get(label, (label, "naive"))
        jobs.append(Job(id=label, defense="none", attack=label, attack_name=name, epsilon=EPS, config={"norm": "linf"},
                        view=view, spec_attack=spec_attack))
        table.append({"defense": "none", "attack": label, "epsilon": EPS, "epsilon_label": "2/255",
                      "metrics": {"robust_accuracy": {"value": v}}})
    table.append({"defense": "none", "attack": WORST_CASE, "epsilon": EPS, "epsilon_label": "2/255",
                  "metrics": {"robust_accuracy": {"value": min(values.values())}}})
    records = {j.id: [] for j in jobs}
    return {c["id"]: c for c in validity_checks(spec, host, jobs, records, table)}


def test_a_vendor_attack_declared_iterative_is_compared_with_single_step_ones():
    checks = strength({("fgsm", "fgsm"): 0.30, ("walk", "vendor-walk"): 0.60})
    assert checks["iterative_beats_single_step"]["status"] == "WARN"
    assert "walk 0.600" in checks["iterative_beats_single_step"]["evidence"]


def test_a_transfer_attack_is_not_held_to_the_white_box_standard():
    checks = strength({("fgsm", "fgsm"): 0.30, ("pgd", "pgd"): 0.20, ("tifgsm", "tifgsm"): 0.90})
    assert checks["iterative_beats_single_step"]["status"] == "PASS"
    assert strength({("fgsm", "fgsm"): 0.3, ("tifgsm", "tifgsm"): 0.9})["iterative_beats_single_step"]["status"] == "N/A"


def test_naive_and_adaptive_twins_are_paired_by_the_jobs_view_not_their_label():
    views = {"walk through the filter": ("walk", "eot")}
    checks = strength({("walk", "vendor-walk"): 0.9, ("walk through the filter", "vendor-walk"): 0.2}, views)
    assert checks["naive_vs_adaptive"]["status"] == "WARN"
    assert "naive walk 0.900 vs eot 0.200" in checks["naive_vs_adaptive"]["evidence"]


def test_the_spec_chooses_the_intervals(tmp_path):
    from medaudit.audits.aggregation import interval_choice
    from medaudit.core.spec import load_spec_text
    from tests.conftest import spec_text

    host = get_host(load_entry_points=False)
    default = load_spec_text(spec_text(), host, tmp_path)
    assert interval_choice(default) == ("wilson", "bootstrap")
    chosen = spec_text(acceptance="acceptance:\n  proportion_interval: clopper-pearson\n  mean_interval: bca")
    assert interval_choice(load_spec_text(chosen, host, tmp_path)) == ("clopper-pearson", "bca")
