"""report.html in a real browser (headless Chromium through Selenium), and report.pdf.

The browser tests need Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``) and are skipped without them; the tests of the missing-Chromium errors
run everywhere.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.core.components import Task
from medaudit.core.errors import ExitCode, MedauditError
from medaudit.core.host import get_host
from medaudit.core.text import printable
from medaudit.reports import pdf as pdf_module
from tests.conftest import spec_text

CHROMIUM = pdf_module.find_chromium()
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (install the Debian packages chromium and chromium-driver, or set MEDAUDIT_CHROMIUM)"
)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium or chromedriver not found (install the Debian packages chromium and chromium-driver)",
)

#: Strings that would run script, add an element, or be evaluated if the report did not escape them.
HOSTILE_TITLE = '<script>alert(1)</script> "><img src=x onerror=alert(2)> javascript:alert(3) {{ 7*7 }} \u202eevil\u202c'
HOSTILE_DESCRIPTION = "<b onmouseover=alert(4)>bold</b> {% if true %}evaluated{% endif %} {{ 7*7 }} \u202egnp.exe"
#: A small, cheap audit: 48 phantom slices, FGSM and 3-step PGD, the session's demo model.
SMALL = {
    "threat_model": "threat_model:\n  norm: linf\n  epsilons: [0, 1/255, 4/255]",
    "attacks": "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 3}",
}


def _run(tmp: Path, name: str, **overrides: str) -> Path:
    spec = tmp / f"{name}.yaml"
    spec.write_text(spec_text(**overrides), encoding="utf-8")
    out = tmp / "runs"
    result = CliRunner().invoke(cli, ["run", str(spec), "--output-dir", str(out), "-q"])
    assert result.exit_code == ExitCode.PASS, result.output
    [run_dir] = [p.parent for p in out.rglob("results.json") if p.parent.parent.name == name]
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("browser"), "tiny", **SMALL)


@pytest.fixture(scope="module")
def hostile_run_dir(tmp_path_factory) -> Path:
    audit = {"name": "hostile", "title": HOSTILE_TITLE, "description": HOSTILE_DESCRIPTION}
    return _run(
        tmp_path_factory.mktemp("hostile"), "hostile",
        audit="audit: " + json.dumps(audit),  # JSON is YAML; \u escapes keep the bidi characters exact
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 4/255]",
        attacks="attacks:\n  - name: fgsm",
        data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
    )


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="medaudit-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in pdf_module.FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1200,3000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        browser.set_page_load_timeout(60)
        browser.get("about:blank")  # leave the start page, whose own requests would be logged otherwise
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_report(driver, run_dir: Path) -> tuple[list[dict], list[str]]:
    """Load run_dir/report.html; return its console messages and the URLs requested from
    the report's own request on (the first is the report itself)."""
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages logged
    url = (run_dir / "report.html").resolve().as_uri()
    driver.get(url)
    console = driver.get_log("browser")
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    assert url in requests, f"no request for the report itself among {requests}"
    return console, requests[requests.index(url):]


@pytest.mark.slow
@needs_browser
def test_report_renders_in_chromium(run_dir, driver):
    from PIL import Image
    from selenium.webdriver.common.by import By

    console, requests = open_report(driver, run_dir)
    severe = [m for m in console if m["level"] == "SEVERE"]
    for m in severe:
        print("console:", m)
    assert not severe, "the report logged errors in the browser console (printed above)"
    page_url = (run_dir / "report.html").resolve().as_uri()
    external = [u for u in requests if u != page_url and not u.startswith("data:")]
    assert not external, f"the report made requests besides itself and data: URIs: {external}"

    # Not blank: a rendered report has text, tables, badges and a figure in many colours.
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    colours = len(shot.getcolors(maxcolors=1 << 24))
    grey = shot.convert("L")
    histogram = grey.histogram()
    background = max(histogram)
    inked = 1 - background / sum(histogram)
    print(f"screenshot {shot.size}: {colours} colours, {inked:.1%} of pixels off the main background")
    assert shot.size[0] >= 1000 and shot.size[1] >= 2000
    assert colours >= 200, f"the page looks blank: {colours} distinct colours"
    assert inked >= 0.05, f"the page looks blank: only {inked:.1%} of pixels are not background"

    verdict = driver.find_element(By.ID, "verdict")
    assert verdict.is_displayed() and verdict.text in {"PASS", "FAIL", "INCONCLUSIVE", "INVALID", "NOT ASSESSED"}

    # Every section the host registers for classification is in the page, with a heading (the
    # subgroup section only where the data set gives covariates, the certified one only where a
    # defense certified).
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    sections = [cls for cls in get_host().components["report_section"].values() if Task.CLASSIFICATION in cls.tasks
                and (cls.name != "subgroups" or results.get("subgroups"))
                and (cls.name != "shift" or any(r.get("corruption") for r in results["rows"]))
                and (cls.name != "certified" or results.get("certified"))]
    assert sections
    for cls in sections:
        found = driver.find_elements(By.ID, cls.name)
        assert len(found) == 1, f"section {cls.name!r} is missing from the page"
        headings = found[0].find_elements(By.TAG_NAME, "h2")
        assert headings and headings[0].text.strip(), f"section {cls.name!r} has no heading"

    # The embedded figures render: every image decoded to a real size.
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.src.slice(0, 22)])"
    )
    assert images, "the report shows no figure"
    for alt, complete, width, src in images:
        assert complete and width > 0, f"image {alt!r} ({src}...) did not load"
        assert src.startswith("data:image/")


@pytest.mark.slow
@needs_browser
def test_hostile_title_and_description_stay_text(hostile_run_dir, driver):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    console, requests = open_report(driver, hostile_run_dir)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 (the property raises when no dialog is open)
    assert not driver.find_elements(By.CSS_SELECTOR, "img[src=x], img[src='x']")
    assert not driver.find_elements(By.TAG_NAME, "script")
    assert not driver.find_elements(By.CSS_SELECTOR, "[onerror], [onmouseover]")
    assert not driver.find_elements(By.CSS_SELECTOR, "a[href^='javascript:']")
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert not [m for m in console if m["level"] == "SEVERE"], console

    heading = driver.execute_script("return document.querySelector('header h1').textContent")
    shown = printable(HOSTILE_TITLE)  # the bidi override shown escaped, as \u202e, not obeyed
    assert heading == shown and "\u202e" not in heading
    text = driver.execute_script("return document.body.textContent")
    assert shown in text
    assert driver.title.startswith(shown)
    assert "{{ 7*7 }}" in heading and "49" not in heading
    assert printable(HOSTILE_DESCRIPTION) in text and "evaluated{% endif %}" in text  # the description, not evaluated either
    assert not driver.find_elements(By.CSS_SELECTOR, "b[onmouseover]")


@pytest.mark.slow
@needs_chromium
def test_report_pdf(run_dir):
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--pdf"])
    assert result.exit_code == 0, result.output
    path = run_dir / "report.pdf"
    assert f"pdf: {path}" in result.output
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:]
    assert 20_000 < len(data) < 20_000_000, len(data)
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", data))
    print(f"report.pdf: {len(data)} bytes, {pages} pages")
    assert pages >= 2  # the cover alone fills most of a page
    assert not list(run_dir.glob("*.tmp")), "a temporary file was left behind"


def _without_chromium(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MEDAUDIT_CHROMIUM", str(tmp_path / "no-such-chromium"))


def test_report_pdf_without_chromium(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}", encoding="utf-8")  # the browser is checked before it is read
    _without_chromium(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--pdf"])
    assert result.exit_code == ExitCode.USAGE_ERROR == 4, result.output
    assert "cannot write report.pdf" in result.output and "MEDAUDIT_CHROMIUM" in result.output
    assert "Traceback" not in result.output
    assert not (run_dir / "report.pdf").exists() and not (run_dir / "report.html").exists()

    monkeypatch.delenv("MEDAUDIT_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert pdf_module.find_chromium() is None
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--pdf"])
    assert result.exit_code == 4 and "no Chromium found on PATH" in result.output, result.output


def test_run_asking_for_pdf_without_chromium_stops_before_the_audit(monkeypatch, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(report="report:\n  formats: [html, json, pdf]"), encoding="utf-8")
    out = tmp_path / "runs"
    _without_chromium(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 0 and "no Chromium" in result.output, result.output
    result = CliRunner().invoke(cli, ["run", str(spec), "--output-dir", str(out), "-q"])
    assert result.exit_code == 4 and "cannot write report.pdf" in result.output, result.output
    assert not out.exists(), "nothing may be written when the run cannot start"


def test_write_pdf_reports_a_failing_browser(monkeypatch, tmp_path):
    (tmp_path / "report.html").write_text("<!doctype html><p>x</p>", encoding="utf-8")
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 3\n", encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("MEDAUDIT_CHROMIUM", str(fake))
    with pytest.raises(MedauditError, match=r"failed \(exit code 3\): cannot open display"):
        pdf_module.write_pdf(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-chromium", "report.html"]
