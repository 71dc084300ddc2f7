"""Faults in the outputs (issue 13, items 16, 17, 19, 20): control characters and escape
sequences in spec text, class names and plugin text; huge class names and attack labels in
figures and tables; WARN validity checks and times in junit.xml; advisory criteria on the
terminal."""

from __future__ import annotations

import datetime as dt
import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import medaudit
import medaudit.core.host
from medaudit.audits import figures
from medaudit.cli import cli
from medaudit.core.host import get_host
from medaudit.plugins.datasets.phantom import Phantom
from medaudit.reports.junit import render_junit
from tests.conftest import spec_text

#: An OSC (set the terminal title), a CSI (clear the screen), a bidi override, a form feed, NUL and SOH.
CONTROL = "\x1b]0;pwned\x07\x1b[2J\u202e\x0c\x00\x01"
#: The same in a YAML double-quoted string.
CONTROL_YAML = r"\e]0;pwned\a\e[2J\u202E\f\0\x01"
LONG_NAME = "nodule-" + "x" * 5000
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe(text: str) -> list[str]:
    """Control (other than newline and tab), bidi and XML-forbidden characters in ``text``."""
    return sorted({repr(ch) for ch in text if ch in BIDI or (unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t")})


class HostileNames(Phantom):
    """The phantom, with one class name full of terminal escapes and one of 5 KB."""

    name = "hostile-names"

    def load(self):
        data = super().load()
        data.class_names = [f"normal{CONTROL}", LONG_NAME]
        return data


class HostilePlugin:
    @medaudit.hookimpl
    def register_datasets(self, register):
        register(HostileNames)


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """``medaudit run`` on a spec whose title and criterion text hold escapes, on the hostile
    data set, with a blocking criterion that passes and an advisory one that fails."""
    out = tmp_path_factory.mktemp("outputs")
    spec = out / "spec.yaml"
    spec.write_text(spec_text(
        audit=f'audit:\n  name: outputs\n  title: "Title {CONTROL_YAML}"',
        data="data:\n  dataset: hostile-names\n  params: {n: 48, size: 64, seed: 0}",
        attacks="attacks:\n  - name: fgsm",
        acceptance=(
            "acceptance:\n  criteria:\n"
            f'    - {{id: "AC-01{CONTROL_YAML}", description: "clean {CONTROL_YAML}", metric: clean_accuracy, op: ">=", threshold: 0.5}}\n'
            '    - {id: AC-02, metric: clean_accuracy, op: ">=", threshold: 0.999, statistic: point, severity: advisory}'
        ),
        runtime=f"runtime:\n  device: cpu\n  batch_size: 48\n  seed: 0\n  output_dir: {out}",
    ), encoding="utf-8")
    host = get_host(load_entry_points=False, extra_plugins=[("hostile", HostilePlugin())])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(medaudit.core.host, "get_host", lambda **_: host)
        result = CliRunner().invoke(cli, ["run", str(spec), "-q"])
    [run_dir] = list((out / "outputs").iterdir())
    return result, run_dir


def test_escapes_and_control_characters_reach_no_output(audit):
    result, run_dir = audit
    assert result.exit_code == 0, result.output
    junit = (run_dir / "junit.xml").read_text(encoding="utf-8")
    ET.fromstring(junit.encode("utf-8"))  # well-formed XML 1.0
    outputs = {"junit.xml": junit, "report.html": (run_dir / "report.html").read_text(encoding="utf-8"),
               "terminal": result.output}
    for name, text in outputs.items():
        assert unsafe(text) == [], f"{name} holds {unsafe(text)}"
    # Escaped, not dropped: a reader sees that the spec held an escape sequence.
    assert "AC-01\\x1b]0;pwned\\x07\\x1b[2J\\u202e\\x0c\\x00\\x01: PASS" in result.output
    assert "normal\\x1b]0;pwned" in outputs["report.html"]
    assert "AC-01\\x1b]0;pwned" in junit
    # results.json keeps the data as it was (JSON escapes it)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["data"]["class_names"][0] == f"normal{CONTROL}"


def test_an_error_message_carries_no_escape_sequence(tmp_path):
    missing = tmp_path / f"spec{CONTROL.replace(chr(0), '')}.yaml"  # a file name may hold anything but NUL and /
    result = CliRunner().invoke(cli, ["validate", str(missing)])
    assert result.exit_code == 4, result.output
    assert unsafe(result.output) == [], result.output


def test_a_long_class_name_is_shown_in_full_once_and_capped_elsewhere(audit):
    _, run_dir = audit
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert html.count(LONG_NAME) == 1  # the data section's list of classes
    capped = re.findall(r"nodule-x+…", html)
    assert capped and all(len(label) <= 40 for label in capped)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert {"robust-accuracy", "examples"} <= {f["id"] for f in results["figures"]}


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [line for t in fig.findobj(Text) for line in t.get_text().split("\n")]


def test_figures_cap_a_100kb_class_name_and_attack_label(tmp_path, monkeypatch):
    huge = "x" * 100_000
    made = []
    render = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: made.append((fig, path)))
    rows = [{"defense": "none", "attack": huge, "epsilon": e, "epsilon_label": label, "metrics": {"robust_accuracy": {"value": v}}}
            for e, label, v in ((0.0, "0", 0.9), (4 / 255, "4/255", 0.2))]
    assert figures.robustness_figure(rows, "robust_accuracy", "Robust accuracy", tmp_path / "curve.png")
    job = SimpleNamespace(id="job-1", defense="none", attack=huge, epsilon=4 / 255, epsilon_label="4/255", is_clean=False, budget="")
    (tmp_path / "examples").mkdir()
    images = torch.rand(2, 1, 8, 8)
    torch.save({"image": images, "adversarial": (images + 0.01).clamp(0, 1), "truth": torch.tensor([0, 1]),
                "prediction": torch.tensor([1, 1]), "clean_prediction": torch.tensor([0, 1])},
               tmp_path / "examples" / "job-1.pt")
    assert figures.examples_figure(tmp_path, [job], 4 / 255, [huge, "b"], tmp_path / "examples.png")
    for fig, path in made:
        longest = max(map(len, _texts(fig)))
        assert longest <= 80, f"{path.name}: a label of {longest} characters"
        render(fig, path)  # renders at once with the capped labels
        assert path.stat().st_size > 0


def test_junit_shows_warnings_verdict_and_times(audit):
    _, run_dir = audit
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    before = sum(c["status"] == "WARN" for c in results["validity"])
    warned = next(c for c in results["validity"] if c["status"] == "PASS" and not c["gating"])
    warned.update(status="WARN", evidence="a bump")
    suite = ET.fromstring(render_junit(results).encode("utf-8")).find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict"] == results["verdict"] and props["warnings"] == str(before + 1)
    cases = {c.get("name").split(":")[0]: c for c in suite.iter("testcase")}
    skipped = cases[warned["id"]].find("skipped")
    assert skipped is not None and skipped.get("message") == "WARN: a bump"
    assert cases["AC-02"].find("skipped") is not None  # advisory FAIL: visible, not failing
    started, finished = (dt.datetime.fromisoformat(results["audit"][k].replace("Z", "+00:00")) for k in ("started", "finished"))
    assert float(suite.get("time")) == (finished - started).total_seconds()
    clean_seconds = next(j["seconds"] for j in results["jobs"] if j["attack"] == "clean" and j["defense"] == "none")
    assert all(float(c.get("time")) >= 0 for c in cases.values())
    assert float(cases["AC-02"].get("time")) == pytest.approx(clean_seconds, abs=1e-3)


def test_the_terminal_marks_advisory_criteria(audit):
    result, _ = audit
    assert "AC-02: FAIL (advisory: does not change the verdict)" in result.output
    assert "verdict: PASS" in result.output


def test_log_lines_are_escaped_before_the_terminal():
    import logging

    from medaudit.cli import printable_log_record

    record = logging.LogRecord("medaudit", logging.WARNING, __file__, 1, "reading %s", ("x\x1b]0;pwned\x07\u202e.pt",), None)
    assert printable_log_record(record)
    assert record.getMessage() == "reading x\\x1b]0;pwned\\x07\\u202e.pt"
