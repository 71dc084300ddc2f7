"""Built-in report sections, registered through the same hook a vendor plugin uses."""

from __future__ import annotations

from medaudit import hookimpl
from medaudit.core.components import ReportSection


class Overview(ReportSection):
    """Audit identity, verdict, fingerprints and the sign-off block."""

    name, title, order, template = "overview", "Cover and document control", 10, "sections/overview.html.j2"


class Acceptance(ReportSection):
    """Each acceptance criterion: threshold, estimate, interval, verdict."""

    name, title, order, template = "acceptance", "Executive summary: acceptance criteria", 20, "sections/acceptance.html.j2"


class ThreatModelSection(ReportSection):
    """Attacker knowledge and budget, and every attack's parameters."""

    name, title, order, template = "threat_model", "Threat model and methods", 30, "sections/threat_model.html.j2"


class Results(ReportSection):
    """Metrics per attack and budget, with the worst case over attacks."""

    name, title, order, template = "results", "Results", 40, "sections/results.html.j2"


class Validity(ReportSection):
    """Checks that the evaluation itself is sound."""

    name, title, order, template = "validity", "Evaluation validity checks", 50, "sections/validity.html.j2"


class Reproducibility(ReportSection):
    """Environment, seeds, timeline and the resolved spec."""

    name, title, order, template = "reproducibility", "Reproducibility and provenance", 90, "sections/reproducibility.html.j2"


@hookimpl
def register_report_sections(register):
    for cls in (Overview, Acceptance, ThreatModelSection, Results, Validity, Reproducibility):
        register(cls)
