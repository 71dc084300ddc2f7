"""Corruption errors normalised to a baseline run (CE, relative CE, mCE), and the spec's
baseline section."""

from __future__ import annotations

import json

import pytest

from medaudit.audits.aggregation import corruption_errors
from medaudit.core.errors import SpecError
from medaudit.core.spec import load_spec
from tests.conftest import spec_text


def row(attack: str, level: float, accuracy: float, defense: str = "none") -> dict:
    return {"defense": defense, "attack": attack, "epsilon": level, "corruption": {"strength": 0.1},
            "metrics": {"robust_accuracy": {"value": accuracy}}}


def results(clean: float, rows: list[dict]) -> dict:
    return {"clean": {"none": {"clean_accuracy": {"value": clean}}}, "rows": rows,
            "fingerprints": {"data_sha256": "abc"}}


def test_ce_divides_summed_errors_by_the_baselines_and_mce_averages_them():
    ours = results(0.9, [row("noise", 1, 0.8), row("noise", 2, 0.6), row("blur", 1, 0.7),
                         row("pgd", 1, 0.0, defense="none") | {"corruption": None}, row("noise", 1, 0.1, "jpeg")])
    baseline = results(0.8, [row("noise", 1, 0.6), row("noise", 2, 0.4), row("noise", 3, 0.2), row("blur", 1, 0.7)])
    errors = corruption_errors(ours["rows"], ours["clean"], baseline, "reference v1", "robust_accuracy", "clean_accuracy")
    noise, blur = errors["corruptions"]
    assert noise["attack"] == "noise" and noise["levels"] == [1, 2]  # severity 3: only the baseline has it
    assert noise["ce"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6))
    assert noise["relative_ce"] == pytest.approx(((0.2 - 0.1) + (0.4 - 0.1)) / ((0.4 - 0.2) + (0.6 - 0.2)))
    assert blur["ce"] == pytest.approx(1.0) and blur["relative_ce"] == pytest.approx(0.2 / 0.1)
    assert errors["mce"] == pytest.approx((0.6 + 1.0) / 2) and errors["baseline"] == "reference v1"
    assert errors["same_data"] == "abc"  # the runner compares it with its own data fingerprint
    assert corruption_errors(ours["rows"], ours["clean"], results(0.8, []), "x", "robust_accuracy",
                             "clean_accuracy") is None  # nothing shared


def test_a_baseline_without_results_is_refused(tmp_path, host):
    (tmp_path / "ref").mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(baseline="baseline: {run_dir: ref, name: reference}"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"baseline.run_dir: no results.json in .*ref"):
        load_spec(path, host)
    (tmp_path / "ref" / "results.json").write_text(json.dumps(results(0.9, [])), encoding="utf-8")
    assert load_spec(path, host).baseline.run_dir == tmp_path / "ref"  # relative to the spec's folder
