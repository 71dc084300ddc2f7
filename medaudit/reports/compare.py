"""Writing a comparison of two runs (``medaudit compare``): comparison.json and a
self-contained comparison.html, rendered through the report's environment. The numbers
come from :func:`medaudit.audits.compare.compare_runs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import medaudit
from medaudit.audits.compare import compare_runs
from medaudit.audits.rundir import json_text, write_atomic
from medaudit.core.host import Host
from medaudit.reports.html import make_environment


def write_comparison(run_a: Path, run_b: Path, out_dir: Path, host: Host | None,
                     confidence: float = 0.95) -> tuple[Path, Path]:
    """comparison.json and comparison.html (self-contained) in ``out_dir``."""
    result = compare_runs(run_a, run_b, host=host, confidence=confidence)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "comparison.json", out_dir / "comparison.html"
    write_atomic(json_path, json_text(result))
    write_atomic(html_path, render_comparison(result))
    return json_path, html_path


def render_comparison(result: dict[str, Any]) -> str:
    """The comparison as one HTML page, through the report's environment (autoescaping,
    printable text, StrictUndefined)."""
    tables: dict[str, list[dict]] = {}
    for entry in result["entries"]:
        tables.setdefault(entry["metric"], []).append(entry)
    return make_environment().get_template("compare.html.j2").render(
        comparison=result, tables=tables, version=medaudit.__version__)
