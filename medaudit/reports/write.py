"""Writing a finished audit's outputs: results.json and the reports the spec asks for.

The runner computes the results and renders nothing; the command line hands them here,
so the engine knows no report format and a report can be rendered again from
results.json alone (``medaudit report``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from rich.console import Console

from medaudit.audits import history, rundir
from medaudit.core.errors import MedauditError
from medaudit.core.host import Host
from medaudit.core.privacy import refuse_leaks
from medaudit.core.text import printable

#: Run-directory files whose text a reader sees (checked for identifying values before writing).
TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".xml", ".html"}


def check_reports_possible(formats: Iterable[str]) -> None:
    """Refuse now, before the audit runs, what would fail once it has run (a PDF without Chromium)."""
    if "pdf" in formats:
        from medaudit.reports.pdf import require_chromium

        require_chromium()


def write_reports(run_dir: Path, results: dict[str, Any], host: Host, formats: Iterable[str],
                  sensitive_values: Mapping[str, str] | None = None, console: Console | None = None,
                  history_index: Path | None = None) -> None:
    """Write results.json and the reports of ``formats`` (html, junit, pdf) into ``run_dir``,
    then log the run as finished, add it to the audit history at ``history_index`` (when
    given) and call the ``audit_finished`` hook. A history that cannot be written is a
    warning: the run directory is the record, and ``medaudit history --rebuild`` indexes it.

    With ``sensitive_values`` (the data set's identifying values), nothing is written if
    any output, or any text file already in the run directory, holds one of them. A PDF
    that fails is a warning: the verdict stands and ``medaudit report --pdf`` redoes it."""
    formats = set(formats)
    console = console or Console(stderr=True)
    try:
        outputs = {"results.json": rundir.json_text(results)}
        if formats & {"html", "pdf"}:
            from medaudit.reports.html import render_report

            outputs["report.html"] = render_report(results, host, run_dir, outputs["results.json"])
        if "junit" in formats:
            from medaudit.reports.junit import render_junit

            outputs["junit.xml"] = render_junit(results)
        if sensitive_values:
            refuse_leaks(final_texts(run_dir, outputs, results), sensitive_values, "write results.json and the reports")
        for name, text in outputs.items():
            rundir.write_atomic(run_dir / name, text)
        if "pdf" in formats:
            from medaudit.reports.pdf import write_pdf

            try:
                write_pdf(run_dir)
            except MedauditError as exc:  # the verdict stands; the PDF can be redone with `medaudit report --pdf`
                console.print(printable(f"warning: {exc}; retry with: medaudit report {run_dir} --pdf"),
                              style="yellow", markup=False, highlight=False)
                rundir.log_event(run_dir, event="pdf_failed", error=str(exc))
        rundir.log_event(run_dir, event="finished", verdict=results["acceptance"]["verdict"])
    except OSError as exc:
        if exc.errno not in rundir.NOT_WRITABLE:
            raise
        raise rundir.output_error(exc, run_dir) from None
    if history_index is not None:
        try:
            history.record(results, run_dir, history_index)
        except (MedauditError, OSError) as exc:
            console.print(printable(f"warning: the run is not in the audit history ({exc}); add it later with: "
                                    f"medaudit history --rebuild {run_dir.parent} --index {history_index}"),
                          style="yellow", markup=False, highlight=False)
    host.pm.hook.audit_finished(results=results, run_dir=run_dir)


def final_texts(run_dir: Path, outputs: dict[str, str], results: dict) -> dict[str, str]:
    """The outputs as a reader would see them, plus every text file already in the run dir."""
    texts = dict(outputs)
    texts["results.json"] = json.dumps(results, ensure_ascii=False, default=str)  # no \u escapes
    if "report.html" in texts:  # figures are PNG bytes in base64, not text
        texts["report.html"] = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", texts["report.html"])
    for path in sorted(run_dir.rglob("*")):
        if path.suffix in TEXT_SUFFIXES and path.name not in outputs:
            texts[str(path.relative_to(run_dir))] = path.read_text(encoding="utf-8")
    return texts
