"""The report's content: the guide's outline, statements derived from the run, plugin
sections, hostile text from every source, and verdicts right at a threshold."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import medaudit
from medaudit.audits.runner import physical_budgets
from medaudit.core.spec import load_spec
from medaudit.cli import cli
from medaudit.core.components import ReportSection
from medaudit.core.errors import ExitCode, PrivacyError
from medaudit.core.host import get_host
from medaudit.plugins.datasets.phantom import Phantom, PhantomParams
from medaudit.reports.html import render_report
from tests.conftest import spec_text
from tests.helpers import run_audit

HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
OUTLINE = ["cover", "summary", "scope", "system", "data", "methods", "results", "defenses", "validity",
           "limitations", "reproducibility", "standards"]


class HostilePhantom(Phantom):
    """The phantom, with class names a hostile vendor plugin or folder could supply."""

    name = "hostile-phantom"

    def load(self):
        data = super().load()
        data.class_names = [f"normal{HOSTILE}", f"nodule{HOSTILE}"]
        return data


class LeakyParams(PhantomParams):
    leak_class_name: bool = False


class LeakyPhantom(Phantom):
    """The phantom, flagging a patient's name as identifying (as the DICOM loader would),
    and optionally letting it slip into a class name."""

    name = "leaky-phantom"
    Params = LeakyParams

    def load(self):
        data = dataclasses.replace(super().load(), sensitive_values=frozenset({"Quartermaine^Zebulon", "Zebulon"}))
        if self.params.leak_class_name:
            data.class_names = ["normal", "nodule (Zebulon)"]
        return data


class LeakyPlugin:
    @medaudit.hookimpl
    def register_datasets(self, register):
        register(LeakyPhantom)


class VendorSection(ReportSection):
    """A vendor's own section: its own template folder, placed between the built-ins by order."""

    name, title, order, template = "vendor", "Vendor notes", 75, "vendor.html.j2"

    def context(self, results):
        return {"note": f"vendor says {HOSTILE}"}


class VendorPlugin:
    @medaudit.hookimpl
    def register_datasets(self, register):
        register(HostilePhantom)

    @medaudit.hookimpl
    def register_report_sections(self, register):
        register(VendorSection)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    templates = out / "templates"
    templates.mkdir()
    (templates / "vendor.html.j2").write_text("<p id='vendor-note'>{{ note }}; classes: {{ results.data.class_names | join(', ') }}</p>")
    VendorSection.template_dir = templates
    host = get_host(load_entry_points=False, extra_plugins=[("vendor", VendorPlugin())])
    spec = out / "spec.yaml"
    spec.write_text(spec_text(
        audit=f"audit:\n  name: report\n  title: 'Report {HOSTILE}'",
        data="data:\n  dataset: hostile-phantom\n  params: {n: 48, size: 64, seed: 0}",
        attacks="attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 3}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 48\n  seed: 0\n  output_dir: {out}",
        intended_use="intended_use:\n  device: Nodule CAD 2.1\n  clinical_task: flags nodules for review\n"
                     "  out_of_scope: [paediatric CT]",
    ))
    outcome = run_audit(load_spec(spec, host), host)
    html = (outcome.run_dir / "report.html").read_text(encoding="utf-8")
    return outcome, host, html


def section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', html)


def test_sections_follow_the_report_guide_outline_with_plugin_sections_in_place(run):
    _, _, html = run
    ids = section_ids(html)
    assert [i for i in ids if i != "vendor"] == OUTLINE
    assert ids.index("vendor") == ids.index("results") + 1  # order 75: after results (70), before defenses (80)
    for i in ids:
        assert f'<a href="#{i}">' in html, f"{i} missing from the contents"


def test_hostile_text_from_spec_class_names_and_plugins_is_inert(run):
    _, _, html = run
    assert "<script" not in html and "<img src=x" not in html and "onerror=alert(2)>" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert f"Report {escaped}" in html  # audit title
    assert f"normal{escaped}" in html and f"vendor says {escaped}" in html  # class names, plugin text


def test_cover_pins_every_input_and_results_json(run):
    outcome, host, html = run
    fp = outcome.results["fingerprints"]
    for key in ("spec_sha256", "model_sha256", "data_sha256"):
        assert fp[key] in html
    assert hashlib.sha256((outcome.run_dir / "results.json").read_bytes()).hexdigest() in html
    report_id = re.search(r"MA-[0-9A-F]{16}", html).group()
    assert report_id in render_report(outcome.results, host, outcome.run_dir)  # re-rendering keeps the id
    changed = copy.deepcopy(outcome.results)
    changed["fingerprints"]["spec_sha256"] = "0" * 64  # e.g. a threshold edited after the run
    assert report_id not in render_report(changed, host, outcome.run_dir)


def test_intended_use_is_shown_and_gaps_are_marked(run):
    outcome, _, html = run
    scope = html.split('<section id="scope">')[1].split("</section>")[0]
    assert "Nodule CAD 2.1" in scope and "flags nodules for review" in scope and "paediatric CT" in scope
    stated = {k for k, v in outcome.results["intended_use"].items() if v}
    assert scope.count("not stated in the spec") == 7 - len(stated) == 4


def test_threat_model_and_limitations_follow_the_attacks_run(run):
    outcome, _, html = run
    scope = html.split('<section id="scope">')[1].split("</section>")[0]
    assert scope.count("AML.T0043.000 White-Box Optimization") == 2  # fgsm and pgd need gradients
    assert "untargeted" in scope and "AML.T0020" in scope
    limits = html.split('<section id="limitations">')[1].split("</section>")[0]
    assert "No score- or decision-based attack was run" in limits and "No targeted attack was run" in limits
    assert f"{outcome.results['data']['n']} cases: the widest interval" in limits
    # a run with a decision-based attack drops the first note
    results = copy.deepcopy(outcome.results)
    results["attacks"].append({**results["attacks"][0], "label": "hsj", "needs": "decisions"})
    html2 = render_report(results, run[1], outcome.run_dir)
    assert "No score- or decision-based attack was run" not in html2
    assert "AML.T0043.001 Black-Box Optimization" in html2


def test_budgets_are_restated_in_the_data_units():
    assert physical_budgets([0, 1 / 255, 4 / 255], (-1000.0, 400.0)) == [0.0, 5.490196, 21.960784]
    assert physical_budgets([1 / 255], None) is None


def test_budgets_in_hounsfield_units_reach_the_report(run):
    outcome, host, _ = run
    results = copy.deepcopy(outcome.results)
    results["data"].update(intensity_window=[-1000.0, 400.0], intensity_unit="HU")
    results["threat_model"]["epsilons_physical"] = physical_budgets(results["threat_model"]["epsilons"], (-1000.0, 400.0))
    html = render_report(results, host, outcome.run_dir)
    assert "0, 5.49, 21.96 HU" in html.replace("5.490196", "5.49").replace("21.960784", "21.96")


def test_summary_counts_validity_checks_and_quotes_the_worst_case(run):
    outcome, _, html = run
    summary = html.split('<section id="summary">')[1].split("</section>")[0]
    passed, warned = (sum(c["status"] == s for c in outcome.results["validity"]) for s in ("PASS", "WARN"))
    assert f"Validity checks: {passed} passed, {warned} warned, 0 failed" in summary
    assert "At the largest budget, eps 4/255" in summary


def test_a_criterion_just_above_or_below_its_threshold(run, tmp_path):
    """The same estimate against thresholds a hair below and above it: PASS (0), then FAIL (1)."""
    [criterion] = run[0].results["acceptance"]["criteria"]
    bound = criterion["ci_low"]  # the default statistic for '>=' is the lower bound
    for threshold, code, verdict in ((bound - 1e-6, ExitCode.PASS, "PASS"), (bound + 1e-6, ExitCode.FAIL, "FAIL")):
        spec = tmp_path / f"spec-{code}.yaml"
        spec.write_text(spec_text(
            data="data:\n  dataset: phantom\n  params: {n: 48, size: 64, seed: 0}",
            attacks="attacks:\n  - name: fgsm",
            acceptance=f"acceptance:\n  criteria:\n    - {{id: AC-01, metric: clean_accuracy, op: '>=', threshold: {threshold!r}}}",
        ))
        result = CliRunner().invoke(cli, ["run", str(spec), "-q", "--output-dir", str(tmp_path / str(code))])
        assert result.exit_code == code, result.output
        [path] = (tmp_path / str(code)).rglob("results.json")
        assert json.loads(path.read_text())["acceptance"]["criteria"][0]["verdict"] == verdict


def test_the_readme_documents_the_exit_codes():
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \|", readme, re.M), f"exit code {code.value} ({code.name}) not in README"


@pytest.mark.parametrize("where", ["title", "class names"])
def test_an_output_holding_an_identifying_value_is_refused(where, tmp_path):
    """A name the data set flagged reaches the spec or the class names: refused before the run
    starts (the class names are known once the data has loaded, so no job runs first)."""
    host = get_host(load_entry_points=False, extra_plugins=[("leaky", LeakyPlugin())])
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(
        audit=f"audit:\n  name: leak\n  title: Review{' for ZEBULON' if where == 'title' else ''}",
        data=f"data:\n  dataset: leaky-phantom\n  params: {{n: 16, size: 64, seed: 0, leak_class_name: {where != 'title'}}}",
        attacks="attacks:\n  - name: fgsm",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 16\n  output_dir: {tmp_path}",
    ))
    with pytest.raises(PrivacyError) as caught:
        run_audit(load_spec(spec, host), host)
    message = str(caught.value)
    assert "zebulon" not in message.lower()  # the message names files, never the values
    text = "spec.resolved.yaml" if where == "title" else "class names"
    assert message.startswith(f"refused to start the run: {text} (1 value)"), message
    assert not (tmp_path / "leak").exists()
    assert PrivacyError.exit_code == ExitCode.USAGE_ERROR
