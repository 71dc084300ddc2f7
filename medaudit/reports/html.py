"""report.html: one self-contained file rendered from results.json alone.

Autoescaping is on for every template, and every printed value first goes through
:func:`medaudit.core.text.printable` (the environment's ``finalize``), so no control or bidi
character from a spec, data set or plugin reaches the page; the ``label`` filter also caps a
class name or attack label in a table cell (the data section lists class names in full).
Sections are plugins (``register_report_sections``) rendered in ``order``. No external requests: inline CSS, data-URI images only, and a
Content-Security-Policy that forbids everything else.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

import medaudit
from medaudit.audits.figures import data_uri
from medaudit.audits.rundir import write_atomic
from medaudit.audits.statistics import MEAN_INTERVALS
from medaudit.core.host import Host
from medaudit.core.text import label, printable

TEMPLATES = Path(__file__).parent / "templates"


def _pct(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}%"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def metric_text(value: dict | None) -> str:
    """``87.5% [80.1%, 92.4%]`` for proportions, a plain number otherwise."""
    if not value:
        return "–"
    if value.get("interval") in MEAN_INTERVALS:
        return f"{_num(value['value'], 3)} [{_num(value['ci_low'], 3)}, {_num(value['ci_high'], 3)}]"
    if value.get("interval") is not None:
        return f"{_pct(value['value'])} [{_pct(value['ci_low'])}, {_pct(value['ci_high'])}]"
    return _num(value["value"])


def _printable(value: Any) -> Any:
    """Every ``{{ }}`` value, before autoescaping: text made printable, markup kept markup."""
    if isinstance(value, Markup):
        return Markup(printable(value))
    return printable(value) if isinstance(value, str) else value


def make_environment(extra_dirs: list[Path] = ()) -> jinja2.Environment:
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader([str(d) for d in extra_dirs]), jinja2.FileSystemLoader(str(TEMPLATES))])
    env = jinja2.Environment(
        loader=loader, autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        finalize=_printable,
    )
    env.filters.update(pct=_pct, num=_num, metric=metric_text, label=label,
                       tojson_pretty=lambda v: json.dumps(v, indent=2, default=str))
    return env


def render_report(results: dict, host: Host, run_dir: Path | None = None, results_text: str | None = None) -> str:
    """Render the report; figures listed in results.json are read from ``run_dir`` and
    embedded as data URIs (a missing figure file is left out). The cover pins the sha256 of
    ``results_text``, the results.json about to be written, else of the one in ``run_dir``."""
    task = results["audit"]["task"]
    section_classes = sorted(
        (cls for cls in host.components["report_section"].values() if task in {t.value for t in cls.tasks}),
        key=lambda cls: (cls.order, cls.name),
    )
    env = make_environment([cls.template_dir for cls in section_classes if cls.template_dir])
    results_file = Path(run_dir) / "results.json" if run_dir is not None else None
    if results_text is not None:
        env.globals["results_sha256"] = hashlib.sha256(results_text.encode("utf-8")).hexdigest()
    elif results_file is not None and results_file.is_file():
        env.globals["results_sha256"] = hashlib.sha256(results_file.read_bytes()).hexdigest()
    else:
        env.globals["results_sha256"] = None
    shown = [f for f in results.get("figures", []) if run_dir is not None and (Path(run_dir) / f["path"]).is_file()]
    order = {cls.name: cls.order for cls in section_classes}
    shown.sort(key=lambda f: order.get(f.get("section", "results"), 0))  # numbered in the order the sections show them
    env.globals["figures"] = [{**f, "uri": data_uri(run_dir, f["path"]), "number": i} for i, f in enumerate(shown, 1)]
    sections = []
    for cls in section_classes:
        html = cls().render(results, env)
        if html and html.strip():
            # Rendered through the autoescaping environment above, so it is already safe.
            sections.append({"id": cls.name, "title": cls.title, "html": Markup(html)})
    return env.get_template("report.html.j2").render(results=results, sections=sections, version=medaudit.__version__)


def write_report(results: dict, run_dir: Path, host: Host) -> Path:
    path = Path(run_dir) / "report.html"
    write_atomic(path, render_report(results, host, run_dir))
    return path
