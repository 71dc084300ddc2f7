"""junit.xml: the acceptance criteria and validity checks as test cases, for CI systems.

One test case per acceptance criterion and per validity check. A blocking criterion that
fails is a ``failure`` and one that is INCONCLUSIVE an ``error`` (the run's exit code is
non-zero for both); an advisory criterion that fails is ``skipped`` with the reason, so it
is visible without failing the pipeline. A gating validity check that fails is a
``failure``; a WARN check is ``skipped`` with the message ``WARN: <evidence>`` (a passing
test case would show it green). The test suite's properties ``verdict`` and ``warnings``
(the number of WARN checks) let CI gate on either. Times: a criterion's test case takes the
seconds of the jobs its metric comes from (all attacks at its budget for the worst case),
a validity check 0, the suite the audit's duration (started to finished). Every text and
attribute goes through :func:`medaudit.core.text.printable`, so the file is well-formed XML
whatever the spec and plugins hold. Written from results.json alone.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from pathlib import Path

from medaudit.audits.rundir import write_atomic
from medaudit.core.spec import WORST_CASE
from medaudit.core.text import printable


def _regression_text(c: dict) -> str:
    """A regression gate: the metric's drop from the baseline run against ``max_drop``, and the test's verdict."""
    scope = f"defense {c['defense']}"
    if c.get("epsilon_label"):
        scope += f", {c['attack']} at eps {c['epsilon_label']}"
    baseline = c.get("baseline_report_id") or c.get("baseline_run") or c.get("baseline")
    drop = "no estimate" if c.get("estimate") is None else f"drop {c['estimate']:.4g}" + (
        f" [{c['ci_low']:.4g}, {c['ci_high']:.4g}]" if c.get("ci_low") is not None else "")
    text = f"regression of {c['metric']} ({scope}) against baseline {baseline}: {drop}, max_drop {c['threshold']}"
    return text + (f"; {c['reason']}" if c.get("reason") else "")


def _criterion_text(c: dict) -> str:
    if c.get("kind") == "regression":
        return _regression_text(c)
    if c.get("epsilon_label"):
        where = f"{c['metric']} ({c['attack']}, defense {c['defense']}) at eps {c['epsilon_label']}"
    else:
        where = f"{c['metric']} (clean, defense {c['defense']})"
    estimate = "no estimate" if c.get("estimate") is None else (
        f"estimate {c['estimate']:.4g}, {c['statistic']} {c.get('compared', c['estimate']):.4g}"
    )
    return f"{where} {c['op']} {c['threshold']}: {estimate}" + (f"; {c['reason']}" if c.get("reason") else "")


def _criterion_seconds(c: dict, results: dict) -> float:
    """Seconds of the jobs behind a criterion's value: the clean job for a clean metric,
    else the attack's job (every attack's, for the worst case) at the criterion's budget."""
    clean = {m["name"]: m["clean"] for m in results.get("metrics", [])}.get(c["metric"], c.get("epsilon") is None)

    def behind(job: dict) -> bool:
        if job["defense"] != c["defense"]:
            return False
        if clean:
            return job["attack"] == "clean"
        same_budget = job["attack"] != "clean" and abs(job["epsilon"] - c["epsilon"]) < 1e-12
        if c["attack"] == WORST_CASE:  # every norm-bounded attack; those sized by their own budget are not in it
            return same_budget and not job.get("budget")
        return same_budget and job["attack"] == c["attack"]

    return sum(job.get("seconds") or 0.0 for job in results.get("jobs", []) if behind(job))


def _suite_seconds(results: dict) -> float:
    """The audit's duration from its start and finish stamps, else the sum of its jobs' seconds."""
    audit = results["audit"]
    if audit.get("started") and audit.get("finished"):
        start, end = (dt.datetime.fromisoformat(audit[k].replace("Z", "+00:00")) for k in ("started", "finished"))
        return (end - start).total_seconds()
    return sum(job.get("seconds") or 0.0 for job in results.get("jobs", []))


def render_junit(results: dict) -> str:
    suite_name = results["audit"]["name"]
    cases = []
    for c in results["acceptance"]["criteria"]:
        case = ET.Element("testcase", classname=f"{suite_name}.acceptance", name=f"{c['id']}: {c.get('description') or c['metric']}".strip(),
                          time=f"{_criterion_seconds(c, results):.3f}")
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
        case = ET.Element("testcase", classname=f"{suite_name}.validity", name=f"{check['id']}: {check['title']}", time="0.000")
        if check["status"] == "FAIL" and check["gating"]:
            ET.SubElement(case, "failure", message=f"INVALID: {check['evidence']}", type="INVALID").text = check["evidence"]
        elif check["status"] == "N/A":
            ET.SubElement(case, "skipped", message=f"not applicable: {check['evidence']}")
        elif check["status"] != "PASS":  # WARN: visible in CI, not green
            ET.SubElement(case, "skipped", message=f"{check['status']}: {check['evidence']}")
        else:
            ET.SubElement(case, "system-out").text = f"{check['status']}: {check['evidence']}"
        cases.append(case)
    counts = {
        "tests": str(len(cases)),
        "failures": str(sum(c.find("failure") is not None for c in cases)),
        "errors": str(sum(c.find("error") is not None for c in cases)),
        "skipped": str(sum(c.find("skipped") is not None for c in cases)),
        "time": f"{_suite_seconds(results):.3f}",
    }
    root = ET.Element("testsuites", name="medaudit", **counts)
    suite = ET.SubElement(root, "testsuite", name=suite_name, timestamp=results["audit"].get("finished") or "", **counts)
    props = ET.SubElement(suite, "properties")
    warnings = sum(check["status"] == "WARN" for check in results["validity"])
    for key, value in (("verdict", results["verdict"]), ("warnings", str(warnings)), ("exit_code", str(results["exit_code"])),
                       ("medaudit_version", results["medaudit_version"])):
        ET.SubElement(props, "property", name=key, value=value)
    suite.extend(cases)
    for element in root.iter():
        element.text = printable(element.text) if element.text else element.text
        element.attrib = {k: printable(v) for k, v in element.attrib.items()}
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(results: dict, run_dir: Path) -> Path:
    path = Path(run_dir) / "junit.xml"
    write_atomic(path, render_junit(results))
    return path
