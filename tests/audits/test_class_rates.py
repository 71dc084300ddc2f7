"""The direction of errors: confusion matrices, per-class sensitivity and specificity, and
criteria on them, on hand-made classification records."""

from __future__ import annotations

import pytest

from medaudit.audits.acceptance import class_value, judge
from medaudit.audits.aggregation import class_rates, group_row
from medaudit.core.components import Facet, Norm
from medaudit.core.jobs import Records
from medaudit.core.spec import Criterion
from medaudit.plugins.metrics.classification import FalseNegativeRate, Sensitivity, Specificity

NAMES = ["normal", "nodule"]


def records(pairs: list[tuple[int, int, int]], rejected: set[int] = frozenset()) -> Records:
    """Records from (label, clean prediction, prediction under attack) triples, with the
    derived flags that ``read_records`` adds."""
    rows = []
    for i, (label, clean, adv) in enumerate(pairs):
        row = {"label": label, "clean_pred": clean, "adv_pred": adv, "attacked": clean == label,
               "clean_finite": True, "adv_finite": True, "clean_rejected": False, "adv_rejected": i in rejected}
        row["clean_correct"] = clean == label
        row["adv_correct"] = row["clean_correct"] and (adv == label or i in rejected)
        rows.append(row)
    return Records(rows, frozenset({Facet.CLASSIFICATION, Facet.FINITE, Facet.REJECTION}))


# 10 nodules: 8 found clean, 5 still found under attack; 10 normals: 9 right clean, 6 under attack.
PAIRS = ([(1, 1, 1)] * 5 + [(1, 1, 0)] * 3 + [(1, 0, 0)] * 2
         + [(0, 0, 0)] * 6 + [(0, 0, 1)] * 3 + [(0, 1, 1)])


def test_confusion_counts_sum_to_n_and_rates_follow_them():
    recs = records(PAIRS)
    adv = class_rates(recs, NAMES, "adv", 0.95)
    assert adv["confusion"] == [[6, 4, 0], [5, 5, 0]]  # rows: truth; columns: normal, nodule, no answer
    assert sum(map(sum, adv["confusion"])) == len(recs)
    clean = class_rates(recs, NAMES, "clean", 0.95)
    assert clean["confusion"] == [[9, 1, 0], [2, 8, 0]]
    nodule = adv["rates"][1]
    assert nodule["class"] == "nodule" and nodule["n"] == 10
    assert nodule["sensitivity"]["value"] == 0.5 and nodule["false_negative_rate"]["value"] == 0.5
    assert nodule["specificity"]["value"] == pytest.approx(6 / 10)  # normals not called nodule
    assert nodule["sensitivity"]["ci_low"] < 0.5 < nodule["sensitivity"]["ci_high"]
    assert clean["rates"][1]["sensitivity"]["value"] == 0.8


def test_a_rejected_input_answers_no_class():
    recs = records([(1, 1, 0), (0, 0, 1)], rejected={0, 1})
    adv = class_rates(recs, NAMES, "adv", 0.95)
    assert adv["confusion"] == [[0, 0, 1], [0, 0, 1]]
    assert adv["rates"][1]["sensitivity"]["value"] == 1.0  # a rejected nodule goes to a reader: not missed
    assert adv["rates"][1]["specificity"]["value"] == 1.0  # and a rejected normal is no false alarm


def test_without_a_class_the_rate_is_the_worst_class():
    recs = records(PAIRS)
    assert Sensitivity().compute(recs).value == 0.5  # nodule 5/10 < normal 6/10
    assert Specificity().compute(recs).value == 0.5  # for normal: nodules not called normal, 5/10
    assert FalseNegativeRate().compute(recs).value == 0.5


def crit(**kw) -> Criterion:
    return Criterion.model_validate({"id": "S", "metric": "sensitivity", "epsilon": 0.01, "op": ">=", **kw})


@pytest.mark.parametrize("threshold,statistic,verdict", [
    (0.45, "point", "PASS"), (0.55, "point", "FAIL"), (0.2, "auto", "PASS"), (0.3, "auto", "FAIL"),
])
def test_a_criterion_on_a_class_sensitivity_passes_and_fails(threshold, statistic, verdict):
    row = group_row("none", "pgd", 0.01, Norm.LINF, records(PAIRS), {}, 0.95, NAMES)
    value = class_value(row["class_rates"], "nodule", "sensitivity")
    assert value["value"] == 0.5 and value["ci_low"] == pytest.approx(0.2366, abs=1e-4)  # Wilson, 5/10
    c = crit(**{"class": "nodule", "threshold": threshold, "statistic": statistic})
    assert c.class_name == "nodule"
    assert judge(c, value, Norm.LINF)["verdict"] == verdict


def test_an_unknown_class_has_no_value():
    row = group_row("none", "pgd", 0.01, Norm.LINF, records(PAIRS), {}, 0.95, NAMES)
    assert class_value(row["class_rates"], "effusion", "sensitivity") is None
