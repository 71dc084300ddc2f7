"""Report sections: cover, summary, scope, system, data, methods, results, subgroups, shift, defenses, certified, validity, limitations, reproducibility, standards.

The built-in sections, registered through the same hook a vendor plugin uses; their
templates are in ``medaudit/reports/templates/sections``.

The outline follows the report guide: document control, executive summary, scope and
threat model, system under test, data, methods, results (and by subgroup), defenses, validity,
limitations, reproducibility and a cross-reference to the standards each section serves.
Everything a section shows is derived from results.json, so ``medaudit report`` can
re-render a run without the model or data.
"""

from __future__ import annotations

import hashlib
from typing import Any

from medaudit import hookimpl
from medaudit.core.components import ReportSection
from medaudit.core.jobs import NAIVE
from medaudit.core.spec import ReportOptions

#: The MITRE ATLAS release the identifiers below were taken from (names change between releases).
ATLAS_VERSION = "5.6.0"

#: Attacker knowledge implied by what an attack needs from the model, and its ATLAS technique.
KNOWLEDGE = {
    "gradients": ("white box", "the model, its weights and input gradients", "AML.T0043.000 White-Box Optimization"),
    "scores": ("grey box, score-based", "output scores from queries", "AML.T0043.001 Black-Box Optimization"),
    "decisions": ("black box, decision-based", "predicted labels from queries", "AML.T0043.001 Black-Box Optimization"),
}

#: Subgroups smaller than this show no metric in the report (``report.subgroup_min_n``).
DEFAULT_SUBGROUP_MIN_N = ReportOptions.model_fields["subgroup_min_n"].default
#: Assessed once a corruption runs (the shift section).
NATURAL_SHIFT = "Natural and acquisition shift (noise, artefacts, blur, contrast, dose, resolution)"
#: Threats a run-time evasion audit does not assess, with their ATLAS identifiers.
NOT_ASSESSED = [
    ("Poisoning of the training data or the model", "AML.T0020, AML.T0018.000"),
    ("Membership inference, model inversion and model extraction through the inference API", "AML.T0024.000-.002"),
    ("Tampered or unsafe model files (checked only by the model fingerprint on the cover)", "AML.T0011.000, AML.T0010.003"),
    ("Physical-world attacks (printed or acquired perturbations)", "-"),
    (NATURAL_SHIFT, "-"),
    ("The clinician and AI acting together (the audit scores the model's output alone)", "-"),
]


def not_assessed(results: dict) -> list[tuple[str, str]]:
    """The threats this run did not assess: natural shift counts as assessed once a corruption ran."""
    shifted = any(r.get("corruption") for r in results["rows"])
    return [(threat, atlas) for threat, atlas in NOT_ASSESSED if not (shifted and threat == NATURAL_SHIFT)]


def headline_metric(results: dict) -> str | None:
    """The robust metric the summary and limitations quote (accuracy or mean Dice)."""
    names = [m["name"] for m in results["metrics"] if not m["clean"]]
    return next((n for n in ("robust_accuracy", "robust_dice") if n in names), names[0] if names else None)


def worst_case_rows(results: dict, defense: str = "none") -> list[dict]:
    return [r for r in results["rows"] if r["attack"] == "worst_case" and r["defense"] == defense]


def worst_direction(results: dict, row: dict | None) -> dict | None:
    """The class whose sensitivity an attack lowers most (the missed findings), clean against
    the worst case at the largest budget, for the executive summary (classification only)."""
    clean = (results.get("clean_class_rates") or {}).get("none")
    if not clean or row is None or not row.get("class_rates"):
        return None
    pairs = [(c, a) for c, a in zip(clean["rates"], row["class_rates"]["rates"])
             if (c.get("sensitivity") or {}).get("value") is not None and (a.get("sensitivity") or {}).get("value") is not None]
    if not pairs:
        return None
    c, a = min(pairs, key=lambda p: (p[1]["sensitivity"]["value"], -p[0]["sensitivity"]["value"]))
    missed = a["sensitivity"]["n"] - a["sensitivity"]["successes"]
    return {"class": c["class"], "text": (
        f"sensitivity for {c['class']!r} falls from {c['sensitivity']['value']:.1%} clean to "
        f"{a['sensitivity']['value']:.1%} [{a['sensitivity']['ci_low']:.1%}, {a['sensitivity']['ci_high']:.1%}] under "
        f"the worst case at eps {row['epsilon_label']}: {missed} of its {a['sensitivity']['n']} cases missed")}


class Cover(ReportSection):
    """Verdict, identity, fingerprints of every input and output, and the sign-off block."""

    name, title, order, template = "cover", "Cover and document control", 10, "sections/cover.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        fp = results["fingerprints"]
        digest = hashlib.sha256(f"{fp['spec_sha256']}:{fp['model_sha256']}:{fp['data_sha256']}".encode()).hexdigest()
        return {"report_id": f"MA-{digest[:16].upper()}"}


class Summary(ReportSection):
    """Each acceptance criterion with its estimate and interval, the validity gate, key numbers."""

    name, title, order, template = "summary", "Executive summary", 20, "sections/summary.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        counts = {s: sum(c["status"] == s for c in results["validity"]) for s in ("PASS", "WARN", "FAIL", "N/A")}
        metric = headline_metric(results)
        worst = worst_case_rows(results)
        largest = max(worst, key=lambda r: r["epsilon"]) if worst and metric else None
        return {"validity_counts": counts, "headline": metric, "largest": largest,
                "worst_direction": worst_direction(results, largest)}


class Scope(ReportSection):
    """Intended use, the robustness domain, the attacker, and what is not covered."""

    name, title, order, template = "scope", "Intended use and threat model", 30, "sections/scope.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        attackers = []
        for at in results["attacks"]:
            knowledge, access, atlas = KNOWLEDGE.get(at.get("needs"), ("unknown", "unknown", "-"))
            goal = "targeted" if at.get("targeted") else "untargeted (any error)"
            attackers.append({"label": at["label"], "goal": goal, "knowledge": knowledge, "access": access, "atlas": atlas})
        return {"attackers": attackers, "atlas_version": ATLAS_VERSION, "not_assessed": not_assessed(results)}


class SystemUnderTest(ReportSection):
    """The model artifact, how it was loaded, and the defenses in the pipeline."""

    name, title, order, template = "system", "System under test", 40, "sections/system.html.j2"


class EvaluationData(ReportSection):
    """Counts, class balance, image geometry and how patient identity is kept out."""

    name, title, order, template = "data", "Evaluation data", 50, "sections/data.html.j2"


class Methods(ReportSection):
    """Every attack's parameters, the metric definitions and the statistics."""

    name, title, order, template = "methods", "Methods", 60, "sections/methods.html.j2"


class Results(ReportSection):
    """Metrics per attack and budget, with the worst case over attacks, and the figures."""

    name, title, order, template = "results", "Results", 70, "sections/results.html.j2"


class Subgroups(ReportSection):
    """The headline metrics per value of each covariate the data set gives (site, sex,
    lesion size...): a table per covariate, clean and worst case at every budget. Shown only
    when results have subgroups."""

    name, title, order, template = "subgroups", "Results by subgroup", 72, "sections/subgroups.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        metric, clean_metric = headline_metric(results), clean_headline_metric(results)
        subgroups = results.get("subgroups") or []
        epsilons = sorted({s["epsilon"] for s in subgroups if s["attack"] == "worst_case"})
        labels = {s["epsilon"]: s["epsilon_label"] for s in subgroups}
        tables: dict[tuple[str, str], dict] = {}
        for s in subgroups:
            table = tables.setdefault((s["covariate"], s["defense"]), {
                "covariate": s["covariate"], "defense": s["defense"], "rows": {}})
            row = table["rows"].setdefault(repr(s["value"]), {"value": s["value"], "n": s["n"], "clean": None,
                                                               "worst": {}})
            if s["attack"] == "clean":
                row["clean"] = s["metrics"].get(clean_metric)
            elif s["attack"] == "worst_case":
                row["worst"][s["epsilon"]] = s["metrics"].get(metric)
        min_n = (results["spec"].get("report") or {}).get("subgroup_min_n", DEFAULT_SUBGROUP_MIN_N)
        for table in tables.values():
            table["rows"] = [{**row, "suppressed": row["n"] < min_n} for row in table["rows"].values()]
        return {"headline": metric, "clean_metric": clean_metric, "tables": list(tables.values()),
                "epsilons": [(e, labels[e]) for e in epsilons], "min_n": min_n}


def clean_headline_metric(results: dict) -> str | None:
    """The clean metric quoted next to the headline (clean accuracy or clean Dice)."""
    names = [m["name"] for m in results["metrics"] if m["clean"]]
    return next((n for n in ("clean_accuracy", "clean_dice") if n in names), names[0] if names else None)


class Shift(ReportSection):
    """Natural perturbation and acquisition shift (the guide's section 9): the headline
    metric under each corruption and severity, worst of the draws beside their mean, the
    drop from clean, the SSIM and PSNR the images got and the class most often missed; the
    heat map and the severity curves. Shown only when a corruption ran."""

    name, title, order, template = "shift", "Natural perturbation and acquisition shift", 74, "sections/shift.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        metric, clean_metric = headline_metric(results), clean_headline_metric(results)
        draws = {a["label"]: (a.get("params") or {}).get("draws", 1) for a in results["attacks"]}
        tables: dict[str, list] = {}
        for r in results["rows"]:
            if not r.get("corruption"):
                continue
            value = r["metrics"].get(metric) or {}
            clean = (results["clean"].get(r["defense"]) or {}).get(clean_metric) or {}
            drop = None
            if value.get("value") is not None and clean.get("value"):
                drop = (clean["value"] - value["value"]) / clean["value"]
            rates = (r.get("class_rates") or {}).get("rates") or []
            missed = min((c for c in rates if (c.get("sensitivity") or {}).get("value") is not None),
                         key=lambda c: c["sensitivity"]["value"], default=None)
            tables.setdefault(r["defense"], []).append({
                "attack": r["attack"], "level": r["epsilon"], "effect": r["corruption"], "value": value or None,
                "seen": r.get("perceptibility") or {},
                "drop": drop, "draws": draws.get(r.get("spec_attack", r["attack"]), 1), "missed": missed})
        return {"headline": metric, "tables": tables, "errors": results.get("corruption_errors")}


class Defenses(ReportSection):
    """Each defense next to the undefended model: naive and adaptive attacks, and the
    trade-off between clean performance and robustness."""

    name, title, order, template = "defenses", "Defenses", 80, "sections/defenses.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        metric = headline_metric(results)
        clean_metric = next((m["name"] for m in results["metrics"] if m["clean"] and m["name"] in ("clean_accuracy", "clean_dice")), None)
        value = {(r["defense"], r["attack"], r["epsilon"]): r["metrics"].get(metric) for r in results["rows"]}
        defenses = []
        for d in results["defenses"]:
            label = d["label"]
            rows = [r for r in results["rows"] if r["defense"] == label]
            attacks = [a["label"] for a in results["attacks"]] + ["worst_case"]
            table = []
            for a in attacks:
                for r in rows:
                    if r["attack"] != a:
                        continue
                    twin = next((t for t in rows if t["epsilon"] == r["epsilon"] and spec_attack(t) == a
                                 and view(t) not in (NAIVE, None)), None)
                    table.append({
                        "attack": a, "epsilon_label": r["epsilon_label"],
                        "undefended": value.get(("none", a, r["epsilon"])), "naive": r["metrics"].get(metric),
                        "adaptive": twin["metrics"].get(metric) if twin else None, "has_adaptive": twin is not None,
                        "adaptive_view": view(twin) if twin else None,
                        "detection": r.get("detection"), "detection_adaptive": twin.get("detection") if twin else None,
                    })
            trade = [
                {"epsilon_label": r["epsilon_label"], "undefended": value.get(("none", "worst_case", r["epsilon"])),
                 "defended": r["metrics"].get(metric)}
                for r in rows if r["attack"] == "worst_case"
            ]
            clean = {k: (results["clean"].get(k) or {}).get(clean_metric) for k in ("none", label)}
            detects = any(t["detection"] for t in table)
            defenses.append({**d, "table": table, "trade": trade, "clean": clean, "detects": detects})
        return {"headline": metric, "clean_metric": clean_metric, "defenses": defenses}


def view(row: dict) -> str | None:
    """The view of the defense a results row's attack ran against (None: the worst case over
    all of them). Rows of results.json written before rows named their view count as naive."""
    return row.get("view", None if row["attack"] == "worst_case" else NAIVE)


def spec_attack(row: dict) -> str:
    """The attack of the spec a results row comes from (the same for every view)."""
    return row.get("spec_attack", row["attack"])


class Certified(ReportSection):
    """Formal / certified results (the guide's section 11, ISO/IEC 24029-2): each certifying
    defense's method, settings, caveats and certified accuracy by radius. Shown only when a
    defense certified."""

    name, title, order, template = "certified", "Formal / certified results", 85, "sections/certified.html.j2"


class Validity(ReportSection):
    """Checks that the evaluation itself is sound."""

    name, title, order, template = "validity", "Evaluation validity checks", 90, "sections/validity.html.j2"


class Limitations(ReportSection):
    """What the numbers do not show, derived from the run where possible."""

    name, title, order, template = "limitations", "Limitations and threats not assessed", 100, "sections/limitations.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        notes = []
        metric = headline_metric(results)
        widths = [
            (r["metrics"][metric]["ci_high"] - r["metrics"][metric]["ci_low"], r)
            for r in worst_case_rows(results)
            if metric and (r["metrics"].get(metric) or {}).get("ci_low") is not None
        ]
        if widths:
            width, row = max(widths, key=lambda w: w[0])
            notes.append(
                f"{results['data']['n']} cases: the widest interval on a worst-case {metric.replace('_', ' ')} "
                f"(eps {row['epsilon_label']}) spans {width:.3f}. More cases narrow it."
            )
        needs = {a.get("needs") for a in results["attacks"]}
        if not needs & {"scores", "decisions"}:
            notes.append(
                "No score- or decision-based attack was run. Such attacks do not rely on gradients, so a model whose "
                "gradients are masked can look robust to every attack listed here and still be broken by them."
            )
        if not any(a.get("targeted") for a in results["attacks"]):
            notes.append("No targeted attack was run: the results bound untargeted errors only.")
        if results["defenses"]:
            notes.append(
                "Defenses were attacked through the full defended model with the attacks listed. An attack that is "
                "not adapted to a non-differentiable or randomised defense can overestimate its robustness."
            )
        for check in results["validity"]:
            if check["status"] in ("WARN", "FAIL"):
                notes.append(f"Validity check '{check['title']}' gave {check['status']}: {check['evidence']}")
        return {"notes": notes, "not_assessed": not_assessed(results), "atlas_version": ATLAS_VERSION}


class Reproducibility(ReportSection):
    """Environment, plugin versions, seeds, command line, timeline and the resolved spec."""

    name, title, order, template = "reproducibility", "Reproducibility and provenance", 110, "sections/reproducibility.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        components = [("model loader", results["model"]["loader"], results["model"]),
                      ("dataset", results["data"]["dataset"], results["data"])]
        components += [("attack", a["name"], a) for a in results["attacks"]]
        components += [("defense", d["name"], d) for d in results["defenses"]]
        seen, plugins = set(), []
        for kind, name, info in components:
            if (kind, name) not in seen:
                seen.add((kind, name))
                plugins.append({"kind": kind, "name": name, "plugin": info.get("plugin"),
                                "distribution": info.get("distribution"), "version": info.get("version")})
        commands = [e["command"] for e in results["timeline"] if e.get("command")]
        return {"plugins": plugins, "commands": commands}


#: Report section -> the guidance and standards it gives evidence for. Informative only.
CROSS_REFERENCE = [
    ("cover", "Document control and records: FDA Computer Software Assurance (2025); IEC 62304 configuration management"),
    ("summary", "EU AI Act Art. 15(3) declared accuracy metrics; FDA draft guidance on AI-enabled device software "
                "functions (2025), validation; ISO/IEC TR 24029-1 robustness assessment workflow"),
    ("scope", "GMLP principles 1 and 8; ISO/IEC 24029-2 notion of domain; Carlini et al. 2019 items 1 and 19; "
              f"MITRE ATLAS {ATLAS_VERSION} AML.T0015 and AML.T0043; EU AI Act Art. 15(5) adversarial examples"),
    ("system", "FDA draft guidance, model description; Model Cards, model details; ATLAS AML.M0014 Verify AI Artifacts"),
    ("data", "GMLP principles 3 and 4; CLAIM data, partition and de-identification items; DICOM PS3.15 Annex E"),
    ("methods", "Carlini et al. 2019 items 8 and 9; ISO/IEC TR 24029-1 clauses 5 and 7; ISO/IEC DIS 24029-3 (draft)"),
    ("results", "Carlini et al. 2019 items 5-7 and 22; ISO/IEC DIS 24029-3 performance drops and adversarial "
                "robustness; GMLP principles 8 and 9"),
    ("subgroups", "GMLP principle 3 (data representative of the intended population); FDA draft guidance on "
                  "AI-enabled device software functions (2025), performance across subgroups; EU AI Act Art. 10(2)(f) "
                  "examination for possible biases"),
    ("shift", "GMLP principle 8 (clinically relevant conditions); EU AI Act Art. 15(4) errors, faults and "
              "inconsistencies; ISO/IEC TR 24029-1 Annex A (data perturbation); Carlini et al. 2019 item 16"),
    ("defenses", "Carlini et al. 2019 items 2, 12, 13 and 20; ATLAS AML.M0003, AML.M0010, AML.M0015"),
    ("certified", "ISO/IEC 24029-2 (formal methods: property, domain, soundness and completeness of the "
                  "method); Carlini et al. 2019 item 17 (provable lower bounds)"),
    ("validity", "Carlini et al. 2019 evaluation checklist (items C1-C18 automated); AutoAttack flags; RobustBench "
                 "model restrictions"),
    ("limitations", "Model Cards caveats; GMLP principle 9; ISO 14971 and AAMI TIR34971 (findings feed the "
                    "manufacturer's risk file through each criterion's risk reference)"),
    ("reproducibility", "PyTorch reproducibility notes; FDA premarket cybersecurity guidance (software bill of "
                        "materials); ATLAS AML.M0023 and AML.M0025"),
]


class Standards(ReportSection):
    """Which section gives evidence for which guidance or standard."""

    name, title, order, template = "standards", "Cross-reference to standards and guidance", 120, "sections/standards.html.j2"

    def context(self, results: dict) -> dict[str, Any]:
        shifted = any(r.get("corruption") for r in results["rows"])
        shown = [(id, refs) for id, refs in CROSS_REFERENCE
                 if (id != "subgroups" or results.get("subgroups")) and (id != "shift" or shifted)
                 and (id != "certified" or results.get("certified"))]
        return {"cross_reference": shown, "titles": {cls.name: cls.title for cls in BUILT_IN}}


BUILT_IN = (Cover, Summary, Scope, SystemUnderTest, EvaluationData, Methods, Results, Subgroups, Shift, Defenses, Certified,
            Validity, Limitations, Reproducibility, Standards)


@hookimpl
def register_report_sections(register):
    for cls in BUILT_IN:
        register(cls)
