"""Results per subgroup of cases sharing a covariate value, from records written to a run
directory as the engine writes them, and their section of the report."""

from __future__ import annotations

import pytest

from medaudit.audits.aggregation import MAX_SUBGROUPS, compute_results, covariate_values
from medaudit.audits.plan import plan_jobs
from medaudit.audits.records import RecordWriter
from medaudit.core.components import Facet
from medaudit.core.host import get_host
from medaudit.core.jobs import Records
from medaudit.core.spec import load_spec_text
from medaudit.plugins.report.sections import Subgroups
from medaudit.reports.html import make_environment
from tests.conftest import spec_text

EPS = 4 / 255
#: Cases 0-3 come from site A, 4-5 from site B; case 5 is wrong when clean, FGSM breaks
#: case 0 and PGD cases 1 and 4. Case 3 has no lesion size.
SITES = ["A", "A", "A", "A", "B", "B"]
SIZES = ["small", "large", "small", None, "large", "small"]
CLEAN_WRONG, BROKEN = {5}, {"fgsm": {0}, "pgd": {1, 4}}
FACETS = {Facet.CLASSIFICATION, Facet.PERTURBATION, Facet.FINITE}


def record(case: int, broken: bool, covariates: bool) -> dict:
    label = case % 2
    clean_pred = 1 - label if case in CLEAN_WRONG else label
    row = {"case": case, "label": label, "clean_pred": clean_pred, "adv_pred": 1 - label if broken else clean_pred,
           "attacked": case not in CLEAN_WRONG, "linf": EPS, "l2": 0.1, "in_range": True,
           "clean_finite": True, "adv_finite": True}
    if covariates:
        row["covariates"] = {"site": SITES[case], "lesion_size": SIZES[case]}
    return row


def computed(tmp_path, covariates: bool = True) -> dict:
    host = get_host(load_entry_points=False)
    spec = load_spec_text(spec_text(threat_model="threat_model:\n  norm: linf\n  epsilons: [4/255]"), host, tmp_path)
    jobs = plan_jobs(spec, host)
    for job in jobs:
        writer = RecordWriter(tmp_path, job.id)
        broken = set() if job.is_clean else BROKEN[job.spec_attack]
        writer.write(record(case, case in broken, covariates) for case in range(len(SITES)))
        writer.commit(FACETS | ({Facet.COVARIATES} if covariates else set()))
    return compute_results(spec, host, jobs, tmp_path)


def find(subgroups: list[dict], covariate: str, value, attack: str) -> dict:
    [found] = [s for s in subgroups if s["covariate"] == covariate and s["value"] == value and s["attack"] == attack]
    return found


def test_each_covariate_value_gets_its_own_clean_and_worst_case_metrics(tmp_path):
    subgroups = computed(tmp_path)["subgroups"]
    a, b = find(subgroups, "site", "A", "worst_case"), find(subgroups, "site", "B", "worst_case")
    # Site A: cases 0 (FGSM) and 1 (PGD) broken of 4; site B: case 4 broken, case 5 wrong when clean.
    assert (a["n"], a["metrics"]["robust_accuracy"]["value"]) == (4, 0.5)
    assert (b["n"], b["metrics"]["robust_accuracy"]["value"]) == (2, 0.0)
    assert a["metrics"]["robust_accuracy"]["interval"] == "wilson" and a["metrics"]["robust_accuracy"]["n"] == 4
    assert (a["defense"], a["epsilon"], a["epsilon_label"]) == ("none", EPS, "4/255")
    clean_b = find(subgroups, "site", "B", "clean")
    assert list(clean_b["metrics"]) == ["clean_accuracy"] and clean_b["epsilon_label"] == "0"
    assert clean_b["metrics"]["clean_accuracy"] == {"value": 0.5, "n": 2, "successes": 1, "interval": "wilson",
                                                    "ci_low": pytest.approx(0.0945, abs=1e-4),
                                                    "ci_high": pytest.approx(0.9055, abs=1e-4)}
    # A case without the value is a subgroup of its own; every value keeps its row, however small.
    assert find(subgroups, "lesion_size", None, "worst_case")["n"] == 1
    # Small lesions: cases 0 (broken), 2 (robust) and 5 (wrong when clean).
    assert find(subgroups, "lesion_size", "small", "worst_case")["metrics"]["robust_accuracy"]["value"] == 1 / 3
    assert [s["value"] for s in subgroups if s["covariate"] == "lesion_size" and s["attack"] == "clean"] == \
        ["large", "small", None]


def test_records_without_covariates_give_no_subgroups(tmp_path):
    assert computed(tmp_path, covariates=False)["subgroups"] == []


def test_a_covariate_with_too_many_values_is_not_split():
    rows = [{"covariates": {"age": 20 + i, "sex": "FM"[i % 2]}} for i in range(MAX_SUBGROUPS + 1)]
    assert covariate_values(Records(rows, {Facet.COVARIATES})) == {"sex": ["F", "M"]}
    assert covariate_values(Records(rows[:3], {Facet.COVARIATES}))["age"] == [20, 21, 22]
    assert covariate_values(Records(rows, ())) == {}  # keys present by chance, undeclared


def test_the_subgroup_section_shows_a_table_per_covariate_with_safe_values(tmp_path):
    results = {"metrics": [{"name": "clean_accuracy", "clean": True}, {"name": "robust_accuracy", "clean": False}],
               "subgroups": computed(tmp_path)["subgroups"],
               "spec": {"acceptance": {"confidence": 0.95}, "report": {"subgroup_min_n": 1}}, "defenses": []}
    for s in results["subgroups"]:
        if s["value"] == "B":
            s["value"] = "B\x1b]0;owned\x07<b>"
    html = Subgroups().render(results, make_environment())
    assert html.count("<table>") == 2 and "<h3>lesion_size" in html and "not given" in html
    assert "B\\x1b]0;owned\\x07&lt;b&gt;" in html and "\x1b" not in html and "<b>" not in html
    assert "worst case, eps 4/255" in html and "50.0% [" in html  # site A's worst case
    assert Subgroups().render({**results, "subgroups": []}, make_environment()).strip() == ""


def test_the_subgroup_section_suppresses_the_metrics_of_small_subgroups(tmp_path):
    results = {"metrics": [{"name": "clean_accuracy", "clean": True}, {"name": "robust_accuracy", "clean": False}],
               "subgroups": computed(tmp_path)["subgroups"],
               "spec": {"acceptance": {"confidence": 0.95}, "report": {"subgroup_min_n": 3}}, "defenses": []}
    html = Subgroups().render(results, make_environment())
    site_b = html[html.index("<td>B</td>"):].split("</tr>")[0]  # 2 cases: n shown, no estimate
    assert "suppressed: n &lt; 3" in site_b and "%" not in site_b and '<td class="num">2</td>' in site_b
    site_a = html[html.index("<td>A</td>"):].split("</tr>")[0]  # 4 cases: shown
    assert "suppressed" not in site_a and "50.0% [" in site_a


def test_a_criterion_on_a_subgroup_is_judged_on_its_cases_only(tmp_path):
    from medaudit.audits.acceptance import judge, subgroup_value
    from medaudit.core.components import Norm
    from medaudit.core.spec import Criterion

    subgroups = computed(tmp_path)["subgroups"]

    def criterion(**kw):
        return Criterion.model_validate({"id": "S", "op": ">=", "statistic": "point", **kw})

    worst_a = criterion(metric="robust_accuracy", epsilon=EPS, threshold=0.5, subgroup={"covariate": "site", "value": "A"})
    assert subgroup_value(subgroups, worst_a)["value"] == 0.5 and subgroup_value(subgroups, worst_a)["n"] == 4
    assert judge(worst_a, subgroup_value(subgroups, worst_a), Norm.LINF)["verdict"] == "PASS"
    worst_b = criterion(metric="robust_accuracy", epsilon=EPS, threshold=0.5, subgroup={"covariate": "site", "value": "B"})
    assert judge(worst_b, subgroup_value(subgroups, worst_b), Norm.LINF)["verdict"] == "FAIL"  # 0 of 2
    clean_b = criterion(metric="clean_accuracy", threshold=0.5, subgroup={"covariate": "site", "value": "B"})
    assert subgroup_value(subgroups, clean_b)["value"] == 0.5
    unsized = criterion(metric="clean_accuracy", threshold=0.5, subgroup={"covariate": "lesion_size", "value": None})
    assert subgroup_value(subgroups, unsized)["n"] == 1


@pytest.mark.parametrize("criterion,message", [
    ("{id: S, metric: robust_accuracy, attack: fgsm, epsilon: 4/255, op: '>=', threshold: 0.5, "
     "subgroup: {covariate: site, value: A}}", "subgroups are measured clean and under the worst case"),
    ("{id: S, metric: clean_sensitivity, class: nodule, op: '>=', threshold: 0.5, subgroup: {covariate: site, value: A}}",
     "a per-class rate is not computed per subgroup"),
])
def test_a_subgroup_criterion_outside_what_subgroups_measure_is_refused(criterion, message, tmp_path):
    from medaudit.core.errors import SpecError

    text = spec_text(threat_model="threat_model:\n  norm: linf\n  epsilons: [4/255]",
                     metrics="metrics: [clean_accuracy, robust_accuracy, clean_sensitivity]",
                     acceptance=f"acceptance:\n  criteria:\n    - {criterion}")
    with pytest.raises(SpecError, match=message):
        load_spec_text(text, get_host(load_entry_points=False), tmp_path)


def test_a_subgroup_the_data_lacks_is_refused_before_the_run():
    from medaudit.audits.runner import check_criterion_scopes
    from medaudit.core.errors import SpecError
    from medaudit.core.spec import load_spec_text as load

    spec = load(spec_text(threat_model="threat_model:\n  norm: linf\n  epsilons: [4/255]", acceptance=(
        "acceptance:\n  criteria:\n    - {id: S, metric: clean_accuracy, op: '>=', threshold: 0.5, "
        "subgroup: {covariate: site, value: C}}")), get_host(load_entry_points=False), ".")
    with pytest.raises(SpecError, match=r"no case has site = 'C' \(its values: 'A', 'B'\)"):
        check_criterion_scopes(spec, ["normal", "nodule"], [{"site": "A"}, {"site": "B"}])
    with pytest.raises(SpecError, match="the data gives no covariate 'site'"):
        check_criterion_scopes(spec, ["normal", "nodule"], None)
    check_criterion_scopes(spec, ["normal", "nodule"], [{"site": "C"}])  # present: no error
