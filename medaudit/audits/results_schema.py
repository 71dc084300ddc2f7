"""JSON Schema (draft 2020-12) of results.json, for the tools that read a run without medaudit.

It pins the structure the report and the history index rely on: the top-level keys, the value
object every metric is reported as, the rows, the acceptance criteria, the verdict and its exit
code. Objects stay open (``additionalProperties``) where plugins or later versions add keys: a
defense's detection summary, an attack's extras, the certified results of a new method. The
enums come from the code that writes the values, so the schema cannot drift from it.
"""

from __future__ import annotations

from typing import Any

from medaudit.audits.acceptance import VERDICT_EXIT_CODES
from medaudit.audits.statistics import MEAN_INTERVALS, PROPORTION_INTERVALS
from medaudit.audits.validity import FAIL, NOT_APPLICABLE, PASS, WARN
from medaudit.core.components import Access, Norm, Task

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
STRING = {"type": "string"}
NUMBER = {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_NUMBER = {"type": ["number", "null"]}

#: The version of results.json's layout: bump it when a reader of the old layout would misread the new one.
SCHEMA_VERSION = 1


def _with(schema: dict, description: str) -> dict:
    return {**schema, "description": description}


def _object(description: str, properties: dict[str, dict], required: tuple[str, ...] = (), *,
            closed: bool = False) -> dict[str, Any]:
    """An object whose listed keys are described; ``closed`` only where medaudit alone writes it."""
    schema: dict[str, Any] = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _list(description: str, items: dict) -> dict:
    return {"type": "array", "description": description, "items": items}


def _ref(name: str, description: str, *, nullable: bool = False) -> dict:
    ref = {"$ref": f"#/$defs/{name}"}
    return {"description": description, **({"anyOf": [ref, {"type": "null"}]} if nullable else ref)}


def _provenance() -> dict[str, dict]:
    """Which plugin provided a component: the keys ``Runner._provenance`` adds."""
    return {
        "plugin": _with(STRING, "The module that registered the component."),
        "distribution": _with(NULLABLE_STRING, "The installed distribution of that module (null if not installed)."),
        "version": _with(NULLABLE_STRING, "That distribution's version."),
    }


def _definitions() -> dict[str, dict]:
    intervals = list(PROPORTION_INTERVALS) + list(MEAN_INTERVALS)
    value = _object(
        "A metric's estimate as results.json keeps it. Proportions carry `successes` and a binomial interval, "
        "means over at least two cases a bootstrap interval; other metrics (a maximum) only `value` and `n`.",
        {
            "value": _with(NUMBER, "The estimate over the group's cases."),
            "n": _with(COUNT, "How many cases the estimate is over."),
            "successes": _with(COUNT, "For a proportion: the cases counted (value = successes / n)."),
            "ci_low": _with(NULLABLE_NUMBER, "Lower end of the confidence interval (acceptance.confidence)."),
            "ci_high": _with(NULLABLE_NUMBER, "Upper end of the confidence interval."),
            "interval": {"enum": intervals, "description": "How the interval was computed."},
        },
        ("value", "n"), closed=True,
    )
    value["dependentRequired"] = {"ci_low": ["ci_high", "interval"], "ci_high": ["ci_low", "interval"],
                                  "successes": ["ci_low", "ci_high", "interval"]}
    metric_values = {
        "type": "object",
        "description": "Metric name -> its value object, or null where the metric has no value for this group "
                       "(no case in scope, or the records lack a facet it needs).",
        "additionalProperties": {"anyOf": [{"$ref": "#/$defs/value"}, {"type": "null"}]},
    }
    class_rates = _object(
        "Per-class rates of a classifier: the confusion matrix and, per class, sensitivity, specificity and "
        "false-negative rate as value objects.",
        {
            "classes": _list("The class names, in label order.", STRING),
            "confusion": _list("Rows: true class; columns: predicted class, then one column for rejected or "
                               "non-finite outputs.", _list("Counts for one true class.", COUNT)),
            "rates": _list("One entry per class, in the order of `classes`.", _object(
                "One class's rates.",
                {
                    "class": _with(STRING, "The class name."),
                    "n": _with(COUNT, "Cases of this class."),
                    "sensitivity": _ref("value", "Share of this class's cases predicted as it.", nullable=True),
                    "specificity": _ref("value", "Share of the other cases not predicted as it.", nullable=True),
                    "false_negative_rate": _ref("value", "1 - sensitivity.", nullable=True),
                },
                ("class", "n"),
            )),
        },
        ("classes", "confusion", "rates"),
    )
    row = _object(
        "One (defense, attack, epsilon) group: its metrics and the tables its records allow. Plugins' facets may add "
        "keys (a detector's `detection`, a corruption's `corruption`).",
        {
            "defense": _with(STRING, "The defense label, or 'none' for the undefended model."),
            "attack": _with(STRING, "The display label of the attack (with its view), or 'worst_case' over the "
                                    "norm-bounded attacks, per case."),
            "epsilon": _with(NUMBER, "The budget in pixel units ([0, 1] images), or the level of the attack's own "
                                     "budget when `budget` is present."),
            "epsilon_label": _with(STRING, "The budget as the report writes it (e.g. '1/255')."),
            "view": _with(NULLABLE_STRING, "The defense view the attack ran against ('naive', 'eot', ...); null for "
                                           "the worst case."),
            "spec_attack": _with(STRING, "The attack's label in the spec ('worst_case' for the worst case): "
                                         "read this instead of parsing `attack`."),
            "metrics": _ref("metric_values", "The attack metrics of the group."),
            "budget": _with(STRING, "The name of the attack's own budget (a corruption's severity), when no norm "
                                    "bounds it."),
            "corruption": _with({"type": "object"}, "A corruption's effect on the clean predictions."),
            "skipped_attacks": _list("A worst case the verdict strategy decided before every attack at its budget ran "
                                     "(a blocking criterion had failed): the attacks that did not run; the true worst "
                                     "case is at most this row's value.", STRING),
            "perceptibility": _object("How visible the perturbations are (attacked cases only).", {
                "n": _with(COUNT, "Attacked cases."),
                "ssim_mean": _with(NULLABLE_NUMBER, "Mean SSIM between clean and adversarial images."),
                "psnr_mean": _with(NULLABLE_NUMBER, "Mean PSNR in dB (null when a perturbation is zero)."),
            }),
            "per_class": _list("Segmentation: Dice per class, clean and under attack.", {
                **_object("One class: its name, then its per-class values by metric (clean_dice, dice...).",
                          {"class": _with(STRING, "The class name.")}, ("class",)),
                "additionalProperties": NULLABLE_NUMBER,
            }),
            "class_rates": _ref("class_rates", "Classification: per-class rates under attack."),
            "detection": _with({"type": "object"}, "A detector defense's separation of clean from adversarial "
                                                   "inputs (AUROC, TPR at 5 % FPR, rejected share)."),
        },
        ("defense", "attack", "epsilon", "epsilon_label", "view", "spec_attack", "metrics"),
    )
    criterion = _object(
        "One acceptance criterion or regression gate of the spec with its judgement: the spec's fields, then the "
        "estimate compared and the verdict.",
        {
            "id": _with(STRING, "The criterion's identifier (e.g. AC-01; a regression gate judged at several budgets: "
                                "<id>@<budget>)."),
            "kind": _with(STRING, "'regression' for a regression gate against a baseline run; absent or 'criterion' "
                                  "for a threshold criterion."),
            "description": _with(STRING, "The spec's description of the criterion."),
            "metric": _with(STRING, "The metric judged."),
            "attack": _with(STRING, "An attack label, or 'worst_case'."),
            "defense": _with(STRING, "A defense label, or 'none'."),
            "epsilon": _with(NULLABLE_NUMBER, "The budget judged; null for a clean metric."),
            "epsilon_label": _with(STRING, "The budget as the report writes it (only with an epsilon)."),
            "op": {"enum": [">=", ">", "<=", "<"], "description": "How `compared` is held to `threshold`."},
            "threshold": _with(NUMBER, "The value the criterion requires."),
            "statistic": {"enum": ["point", "lower_bound", "upper_bound", "drop"],
                          "description": "Which estimate was compared ('auto' in the spec resolved to a bound; "
                                         "'point' where the metric has no interval; 'drop' for a regression gate: "
                                         "the drop from the baseline)."},
            "min_n": _with(COUNT, "Fewer cases than this gives INCONCLUSIVE."),
            "class_name": _with(NULLABLE_STRING, "The class a per-class rate is judged on."),
            "subgroup": _with({"type": ["object", "null"]}, "The subgroup of cases the metric is judged on."),
            "severity": {"enum": ["blocking", "advisory"],
                         "description": "Only blocking criteria decide the verdict."},
            "risk_ref": _with(NULLABLE_STRING, "Reference into the manufacturer's risk file."),
            "estimate": _with(NULLABLE_NUMBER, "The metric's estimate; null when no case was in scope."),
            "ci_low": _with(NULLABLE_NUMBER, "Lower end of the estimate's interval."),
            "ci_high": _with(NULLABLE_NUMBER, "Upper end of the estimate's interval."),
            "n": _with({"type": ["integer", "null"], "minimum": 0}, "Cases in scope (regression gate: the cases "
                                                                     "compared; null when it was not judged)."),
            "compared": _with(NULLABLE_NUMBER, "The number held to the threshold (the estimate or a bound)."),
            "baseline": _with(STRING, "Regression gate: the baseline as the spec names it (a run directory or a "
                                      "report id)."),
            "baseline_run": _with(NULLABLE_STRING, "Regression gate: the baseline's run directory."),
            "baseline_report_id": _with(NULLABLE_STRING, "Regression gate: the baseline's report id."),
            "baseline_value": _with(NULLABLE_NUMBER, "Regression gate: the metric in the baseline run."),
            "current_value": _with(NULLABLE_NUMBER, "Regression gate: the metric in this run."),
            "max_drop": _with(NUMBER, "Regression gate: the largest drop tolerated, in the metric's unit."),
            "p_value": _with(NULLABLE_NUMBER, "Regression gate: p-value of the test of a change."),
            "paired": _with({"type": ["boolean", "null"]}, "Regression gate: whether both runs evaluated the same "
                                                           "cases (a paired test)."),
            "test": _with(NULLABLE_STRING, "Regression gate: the test used."),
            "verdict": {"enum": ["PASS", "FAIL", "INCONCLUSIVE"], "description": "The criterion's verdict."},
            "reason": _with(STRING, "Why a criterion is INCONCLUSIVE; empty otherwise."),
        },
        ("id", "metric", "attack", "defense", "epsilon", "op", "threshold", "statistic", "severity", "estimate",
         "verdict", "reason"),
    )
    return {"value": value, "metric_values": metric_values, "class_rates": class_rates, "row": row,
            "criterion": criterion}


def _verdict_rules() -> list[dict]:
    """Each verdict implies its exit code (``acceptance.VERDICT_EXIT_CODES``)."""
    return [
        {"if": {"properties": {"verdict": {"const": verdict}}, "required": ["verdict"]},
         "then": {"properties": {"exit_code": {"const": int(code)}}}}
        for verdict, code in VERDICT_EXIT_CODES.items()
    ]


def results_json_schema() -> dict[str, Any]:
    """The JSON Schema of results.json (``medaudit schema --results``)."""
    verdicts = list(VERDICT_EXIT_CODES)
    exit_codes = sorted({int(code) for code in VERDICT_EXIT_CODES.values()})
    code_names = ", ".join(f"{int(code)} {code.name}" for code in sorted(set(VERDICT_EXIT_CODES.values())))
    audit = _object("The audit as the spec names it, and when it ran.", {
        "name": _with(STRING, "The spec's audit.name (the run directory's parent folder)."),
        "title": _with(STRING, "The report's title."),
        "description": _with(STRING, "The spec's audit.description."),
        "task": {"enum": [t.value for t in Task], "description": "The task audited."},
        "started": _with(NULLABLE_STRING, "UTC time the run started (ISO 8601, from the timeline)."),
        "finished": _with(STRING, "UTC time results.json was built (ISO 8601)."),
        "report_id": _with(STRING, "A short identifier of this report, stable for the run (the history index's key)."),
    }, ("name", "title", "task", "started", "finished"))
    model = _object("The audited model: its loader, what it gave the load-time probe, and its weights' hash.", {
        "loader": _with(STRING, "The model loader's name."),
        **_provenance(),
        "description": _with(STRING, "The loader's one-line description of the model."),
        "num_classes": _with(COUNT, "Output classes (segmentation: classes per pixel)."),
        "in_channels": _with(COUNT, "Input channels."),
        "access": _list("What the model gives an attacker.", {"enum": [a.value for a in Access]}),
        "sha256": _with(SHA256, "sha256 of the model's weights."),
        "probe": _with({"type": "object"}, "The load-time probe: outputs are logits, finite and deterministic, and "
                                           "the jobs left the weights unchanged."),
    }, ("loader", "num_classes", "in_channels", "access", "sha256"))
    data = _object("The evaluated data set: size, shape, intensities and classes (never a patient attribute).", {
        "dataset": _with(STRING, "The dataset plugin's name."),
        **_provenance(),
        "description": _with(STRING, "The dataset's one-line description."),
        "n": _with(COUNT, "Cases evaluated."),
        "image_shape": _list("Shape of one image (channels first).", COUNT),
        "intensity": _with({"type": "object"}, "Per-channel min, max, mean and std of the images in [0, 1]."),
        "class_names": _list("Class names in label order.", STRING),
        "class_counts": _with({"type": "object", "additionalProperties": COUNT},
                              "Cases per class (segmentation: cases containing the class)."),
        "spacing": _with({"type": ["array", "null"], "items": NUMBER},
                         "Voxel spacing in mm (volumes), where the dataset knows it."),
        "sha256": _with(SHA256, "sha256 of the data list (the fingerprint of the cases)."),
        "intensity_window": _with({"type": ["array", "null"], "items": NUMBER},
                                  "The window mapped to [0, 1] (CT/MRI), if the dataset declares one."),
        "intensity_unit": _with(NULLABLE_STRING, "The unit of the window (e.g. HU)."),
    }, ("dataset", "n", "image_shape", "sha256"))
    threat_model = _object("The attacker's budget.", {
        "norm": {"enum": [n.value for n in Norm], "description": "The norm bounding the perturbations."},
        "epsilons": _list("The budgets in pixel units ([0, 1] images).", NUMBER),
        "epsilon_labels": _list("The budgets as the report writes them.", STRING),
        "epsilons_physical": _with({"type": ["array", "null"], "items": NUMBER},
                                   "The budgets in the data's own intensity units, where it declares a window."),
    }, ("norm", "epsilons", "epsilon_labels"))
    attack = _object("One attack of the spec.", {
        "label": _with(STRING, "The attack's label (its id in the spec, else its name)."),
        "name": _with(STRING, "The registered attack's name."),
        "params": _with({"type": "object"}, "Its params as resolved."),
        **_provenance(),
        "summary": _with(STRING, "The attack's one-line summary."),
        "norms": _list("The norms it supports.", {"enum": [n.value for n in Norm]}),
        "needs": {"enum": [a.value for a in Access], "description": "What it needs from the model."},
        "targeted": _with({"type": "boolean"}, "Whether it steers towards a target."),
        "budget": _with({"type": ["object", "null"]}, "Its own budget (a corruption's severity levels); null when "
                                                      "the threat model's norm bounds it."),
    }, ("label", "name", "params"))
    defense = _object("One defense of the spec and the model it deploys.", {
        "label": _with(STRING, "The defense's label."),
        "name": _with(STRING, "The registered defense's name."),
        "params": _with({"type": "object"}, "Its params as resolved."),
        "summary": _with(STRING, "The defense's one-line summary."),
        "adaptive": _with(STRING, "How it is attacked adaptively (empty if no adaptive view)."),
        "sha256": _with(SHA256, "sha256 of the defended model's weights."),
        "training": _with({"type": ["object", "null"]}, "How the defense trained the model, if it did."),
        **_provenance(),
    }, ("label", "name", "params"))
    metric = _object("One metric computed.", {
        "name": _with(STRING, "The metric's name."),
        "summary": _with(STRING, "The metric's one-line summary."),
        "better": {"enum": ["higher", "lower"], "description": "Which direction is better."},
        "clean": _with({"type": "boolean"}, "True for a metric of the unperturbed inputs."),
    }, ("name", "summary", "better", "clean"))
    check = _object("One validity check (Carlini et al. 2019): a gating failure makes the audit INVALID.", {
        "id": _with(STRING, "The check's identifier."),
        "ref": _with(STRING, "The item of the methods' checklist it automates (e.g. C4)."),
        "title": _with(STRING, "What the check asserts."),
        "status": {"enum": [PASS, FAIL, WARN, NOT_APPLICABLE], "description": "The check's outcome."},
        "gating": _with({"type": "boolean"}, "Whether a FAIL invalidates the audit."),
        "evidence": _with(STRING, "The numbers behind the status."),
    }, ("id", "title", "status", "gating"))
    figure = _object("A figure of the report, kept in the run directory.", {
        "id": _with(STRING, "The figure's identifier."),
        "title": _with(STRING, "Its title."),
        "caption": _with(STRING, "Its caption: what it shows and which data."),
        "path": _with(STRING, "Its PNG, relative to the run directory."),
        "section": _with(STRING, "The report section that shows it, where not the figures section."),
    }, ("id", "path"))
    job = _object("One job: a defense's view, one attack, one budget.", {
        "id": _with(STRING, "The job's stable id (its records file is records/<id>.jsonl)."),
        "title": _with(STRING, "Its title for people."),
        "defense": _with(STRING, "The defense label."),
        "attack": _with(STRING, "The attack label ('clean' for the clean pass)."),
        "view": _with(STRING, "The defense view attacked."),
        "spec_attack": _with(STRING, "The attack's label in the spec."),
        "epsilon": _with(NUMBER, "The budget (or level of the attack's own budget)."),
        "budget": _with(STRING, "The name of the attack's own budget, if it has one."),
        "seconds": _with(NULLABLE_NUMBER, "Wall-clock time of the job."),
        "batch_size": _with(COUNT, "The batch size it ran at."),
        "skipped": _with(STRING, "Why it did not run (runtime.strategy verdict stopped once the verdict was decided)."),
    }, ("id", "defense", "attack", "epsilon"))
    strategy = _object("How the jobs ran (runtime.strategy): full runs every job on every case; verdict runs attacks "
                       "cheapest first, each on the cases still robust, and stops once the blocking criteria are "
                       "decided.", {
        "name": {"enum": ["full", "verdict"], "description": "The strategy."},
        "order": _list("The ids of the jobs that ran, in the order they ran.", STRING),
        "carried": _with({"type": "object", "additionalProperties": COUNT},
                         "verdict: per job, the cases it did not attack because an earlier job's adversarial (at "
                         "this budget or a smaller one) already broke them; their records carry it over."),
        "exact": _list("verdict: the jobs run on every case because a criterion or gate reads their own figure.", STRING),
        "stopped": _with({"type": ["object", "null"]}, "verdict: after which job the run stopped, why, and how many "
                                                      "jobs it skipped; null when every job ran."),
        "skipped": _list("verdict: the jobs that did not run, with the reason.", _object("A skipped job.", {
            "job": _with(STRING, "Its id."), "title": _with(STRING, "Its title."),
            "reason": _with(STRING, "Why it did not run.")}, ("job", "reason"))),
    }, ("name", "order"))
    curve = _object("Robust accuracy against epsilon from a minimum-norm attack.", {
        "defense": _with(STRING, "The defense label."),
        "attack": _with(STRING, "The minimum-norm attack's label."),
        "points": _list("[epsilon, robust accuracy] pairs.", {"type": "array", "items": NUMBER,
                                                              "minItems": 2, "maxItems": 2}),
    }, ("defense", "attack", "points"))
    subgroup = _object("The metrics on the cases sharing one covariate value.", {
        "covariate": _with(STRING, "The covariate's name."),
        "value": _with({}, "The covariate's value."),
        "defense": _with(STRING, "The defense label."),
        "attack": _with(STRING, "'clean' or 'worst_case'."),
        "epsilon": _with(NUMBER, "The budget (0 for clean)."),
        "epsilon_label": _with(STRING, "The budget as the report writes it."),
        "n": _with(COUNT, "Cases in the subgroup."),
        "metrics": _ref("metric_values", "The subgroup's metrics."),
    }, ("covariate", "value", "defense", "attack", "epsilon", "n", "metrics"))
    acceptance = _object("The criteria judged and the audit's verdict.", {
        "criteria": _list("Every criterion of the spec, judged.", {"$ref": "#/$defs/criterion"}),
        "verdict": {"enum": verdicts, "description": "The same as the top-level verdict."},
        "exit_code": {"enum": exit_codes, "description": "The same as the top-level exit code."},
    }, ("criteria", "verdict", "exit_code"))
    properties = {
        "schema_version": {"const": SCHEMA_VERSION, "description": "The version of this layout; readers refuse "
                                                                    "one they do not know."},
        "medaudit_version": _with(STRING, "The medaudit version that wrote the file."),
        "audit": audit,
        "intended_use": _with({"type": "object"}, "The spec's intended-use statement (device, clinical task, "
                                                  "population, out of scope)."),
        "verdict": {"enum": verdicts, "description": "PASS: every blocking criterion held; FAIL: one failed; "
                    "INCONCLUSIVE: one could not be decided; INVALID: a gating validity check failed; "
                    "NOT ASSESSED: the spec has no criteria."},
        "exit_code": {"enum": exit_codes, "description": f"The exit code of `medaudit run` for this verdict "
                                                         f"({code_names})."},
        "fingerprints": _object("Hashes that identify what was audited.", {
            "spec_sha256": _with(SHA256, "sha256 of the resolved spec (without where it ran)."),
            "model_sha256": _with(SHA256, "sha256 of the model's weights."),
            "data_sha256": _with(SHA256, "sha256 of the data list."),
        }, ("spec_sha256", "model_sha256", "data_sha256")),
        "model": model,
        "data": data,
        "threat_model": threat_model,
        "attacks": _list("The spec's attacks.", attack),
        "defenses": _list("The spec's defenses (empty: only the undefended model).", defense),
        "metrics": _list("The metrics computed, clean and under attack.", metric),
        "clean": _with({"type": "object", "additionalProperties": {"$ref": "#/$defs/metric_values"}},
                       "Defense label ('none' for the undefended model) -> its clean metrics."),
        "clean_class_rates": _with({"type": "object", "additionalProperties": {"$ref": "#/$defs/class_rates"}},
                                   "Classification: defense label -> per-class rates on the clean inputs."),
        "corruption_errors": _with({"type": "object"}, "Corruption errors normalised to the spec's baseline run "
                                                       "(mCE), when the spec names one."),
        "rows": _list("One row per (defense, attack, epsilon), worst case included.", {"$ref": "#/$defs/row"}),
        "curves": _list("Robustness curves from the minimum-norm attacks.", curve),
        "subgroups": _list("Metrics per covariate value (empty without covariates).", subgroup),
        "validity": _list("The validity checks.", check),
        "soundness": _with({"type": "object"}, "What the validity checks measured by running the model again: "
                                               "behaviour, noise baseline, convergence re-run."),
        "certified": _with({"type": "object", "additionalProperties": {"type": "object"}},
                           "Defense label -> its certified results (method, radii, curve), for defenses that "
                           "certify."),
        "acceptance": acceptance,
        "figures": _list("The report's figures.", figure),
        "conventions": _list("The conventions behind the numbers, as the report states them.", STRING),
        "jobs": _list("Every job of the plan.", job),
        "strategy": strategy,
        "timeline": _list("The run's events (start, job, resume...), from timeline.jsonl.", {
            **_object("One event; the other keys depend on the event (a job's id, seconds and batch size; the "
                      "command that started or resumed the run; the signal that stopped it).",
                      {"at": _with(STRING, "UTC time (ISO 8601)."), "event": _with(STRING, "What happened.")},
                      ("at", "event")),
            "additionalProperties": True,
        }),
        "environment": _with({"type": "object", "required": ["python", "packages"]},
                             "Python, platform, package versions, device and plugins of the run."),
        "seed": _with(COUNT, "The spec's runtime.seed."),
        "spec": _with({"type": "object"}, "The resolved spec (its schema: `medaudit schema`)."),
    }
    required = [
        "schema_version", "medaudit_version", "audit", "intended_use", "verdict", "exit_code", "fingerprints", "model",
        "data", "threat_model", "attacks", "defenses", "metrics", "clean", "rows", "curves", "subgroups", "validity",
        "soundness", "acceptance", "figures", "conventions", "jobs", "timeline", "environment", "seed", "spec",
    ]
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "medaudit results.json",
        "description": "Everything an audit found, in one file: the report is rendered from it alone.",
        "type": "object",
        "properties": properties,
        "required": required,
        "allOf": _verdict_rules(),
        "$defs": _definitions(),
    }
