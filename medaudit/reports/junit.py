"""junit.xml: the acceptance criteria and validity checks as test cases, for CI systems.

One test case per acceptance criterion and per validity check. A blocking criterion that
fails is a ``failure`` and one that is INCONCLUSIVE an ``error`` (the run's exit code is
non-zero for both); an advisory criterion that fails is ``skipped`` with the reason, so it
is visible without failing the pipeline. A gating validity check that fails is a
``failure``; a warning is reported in ``system-out``. Written from results.json alone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from medaudit.audits.rundir import write_atomic


def _criterion_text(c: dict) -> str:
    if c.get("epsilon_label"):
        where = f"{c['metric']} ({c['attack']}, defense {c['defense']}) at eps {c['epsilon_label']}"
    else:
        where = f"{c['metric']} (clean, defense {c['defense']})"
    estimate = "no estimate" if c.get("estimate") is None else (
        f"estimate {c['estimate']:.4g}, {c['statistic']} {c.get('compared', c['estimate']):.4g}"
    )
    return f"{where} {c['op']} {c['threshold']}: {estimate}" + (f"; {c['reason']}" if c.get("reason") else "")


def render_junit(results: dict) -> str:
    suite_name = results["audit"]["name"]
    cases = []
    for c in results["acceptance"]["criteria"]:
        case = ET.Element("testcase", classname=f"{suite_name}.acceptance", name=f"{c['id']}: {c.get('description') or c['metric']}".strip())
        text = _criterion_text(c)
        if c["verdict"] == "FAIL" and c["severity"] == "blocking":
            ET.SubElement(case, "failure", message=f"FAIL: {text}", type="FAIL").text = text
        elif c["verdict"] == "INCONCLUSIVE" and c["severity"] == "blocking":
            ET.SubElement(case, "error", message=f"INCONCLUSIVE: {text}", type="INCONCLUSIVE").text = text
        elif c["verdict"] != "PASS":
            ET.SubElement(case, "skipped", message=f"advisory criterion {c['verdict']}: {text}")
        else:
            ET.SubElement(case, "system-out").text = f"PASS: {text}"
        cases.append(case)
    for check in results["validity"]:
        case = ET.Element("testcase", classname=f"{suite_name}.validity", name=f"{check['id']}: {check['title']}")
        if check["status"] == "FAIL" and check["gating"]:
            ET.SubElement(case, "failure", message=f"INVALID: {check['evidence']}", type="INVALID").text = check["evidence"]
        elif check["status"] == "N/A":
            ET.SubElement(case, "skipped", message=f"not applicable: {check['evidence']}")
        else:
            ET.SubElement(case, "system-out").text = f"{check['status']}: {check['evidence']}"
        cases.append(case)
    counts = {
        "tests": str(len(cases)),
        "failures": str(sum(c.find("failure") is not None for c in cases)),
        "errors": str(sum(c.find("error") is not None for c in cases)),
        "skipped": str(sum(c.find("skipped") is not None for c in cases)),
    }
    root = ET.Element("testsuites", name="medaudit", **counts)
    suite = ET.SubElement(root, "testsuite", name=suite_name, timestamp=results["audit"].get("finished") or "", **counts)
    props = ET.SubElement(suite, "properties")
    for key, value in (("verdict", results["verdict"]), ("exit_code", str(results["exit_code"])),
                       ("medaudit_version", results["medaudit_version"])):
        ET.SubElement(props, "property", name=key, value=value)
    suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(results: dict, run_dir: Path) -> Path:
    path = Path(run_dir) / "junit.xml"
    write_atomic(path, render_junit(results))
    return path
