"""Statistics and verdict logic on hand-made numbers."""

from __future__ import annotations

import pytest

from medaudit.audits.results import judge, wilson_interval, worst_case_records
from medaudit.core.spec import Criterion
from medaudit.core.components import Norm


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
