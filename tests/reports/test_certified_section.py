"""Certified results in a whole audit: randomized smoothing certifies every case, results.json
keeps the certificates and the certified accuracy by radius, the report's "Formal / certified
results" section shows them with the figure and the caveat of a base model not trained with
the noise, and a resumed run reads the certificates back instead of certifying again."""

from __future__ import annotations

import json

import pytest

from medaudit.core.host import get_host
from medaudit.core.spec import load_spec_text
from tests.conftest import spec_text
from tests.helpers import run_audit

SMOOTHING = ("defenses:\n  - name: randomized-smoothing\n"
             "    params: {sigma: 0.05, n0: 8, n: 64, alpha: 0.01, attack_samples: 2, eot_samples: 2}")


@pytest.fixture(scope="module")
def certified_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("certified")
    host = get_host(load_entry_points=False)
    text = spec_text(
        data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: l2\n  epsilons: [0.1]",
        attacks="attacks:\n  - name: fgsm", defenses=SMOOTHING,
        validity="validity: {convergence_cases: 0, noise_cases: 8}",
        runtime=f"runtime: {{device: cpu, batch_size: 16, seed: 0, output_dir: {tmp_path}}}",
    ) + "report: {formats: [html, json]}\n"
    spec = load_spec_text(text, host, tmp_path)
    outcome = run_audit(spec, host)
    return outcome.run_dir, outcome.results, spec


@pytest.mark.slow
def test_every_case_is_certified_and_the_curve_falls_with_the_radius(certified_run):
    run_dir, results, _ = certified_run
    found = results["certified"]["randomized-smoothing"]
    assert found["cases"] == 16 and found["sigma"] == 0.05 and found["n"] == 64
    details = found["cases_detail"]
    assert len(details) == 16 and all(d["radius"] >= 0 for d in details)
    assert all(d["radius"] == 0 for d in details if d["prediction"] < 0)  # abstentions certify nothing
    curve = found["curve"]
    assert curve[0][0] == 0 and 0.1 in [r for r, _ in curve]  # the L2 budget is on the grid
    assert all(a1 <= a0 for (_, a0), (_, a1) in zip(curve, curve[1:]))
    correct = sum(d["prediction"] == d["truth"] and d["radius"] > 0 for d in details)
    assert curve[0][1] == correct / 16
    # The largest certificate n = 64, alpha = 0.01 allows: sigma * Phi^-1(0.01^(1/64)).
    assert max(d["radius"] for d in details) <= 0.05 * 2.08
    assert (run_dir / "certified" / "randomized-smoothing.json").is_file()


@pytest.mark.slow
def test_the_report_shows_the_certified_section_with_its_figure_and_caveat(certified_run):
    run_dir, results, _ = certified_run
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Formal / certified results" in html
    assert "Certified accuracy against the L2 radius" in html
    assert "was not trained with Gaussian noise" in html  # trained_sigma not declared
    assert any(f["id"] == "certified" and f["section"] == "certified" for f in results["figures"])
    checks = {c["id"]: c for c in results["validity"]}
    assert checks["randomness_handled"]["status"] == "PASS"  # fgsm@eot averages over the noise


@pytest.mark.slow
def test_resumed_results_read_the_certificates_back(certified_run, monkeypatch):
    run_dir, results, spec = certified_run
    from medaudit.plugins.defenses.smoothing import RandomizedSmoothing

    def refuse(*args, **kwargs):
        raise AssertionError("certified again")

    monkeypatch.setattr(RandomizedSmoothing, "certify", refuse)
    host = get_host(load_entry_points=False)
    again = run_audit(spec, host, run_dir).results
    assert again["certified"] == json.loads(json.dumps(results["certified"]))
