"""The audit spec: a YAML file validated in full before anything heavy happens.

Validation runs in two passes over the parsed YAML and reports every error of both at
once, each with file, line and field path: the spec's own structure (pydantic), then every
component reference (known name, params valid against the component's own ``Params``,
task and norm supported).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator,
    model_validator,
)

from medaudit.core.components import Budget, InputPath, Metric, Norm, Task, missing_inputs
from medaudit.core.errors import SpecError
from medaudit.core.host import Host, unknown_name_message
from medaudit.core.yamlsource import Loc, Source, format_loc, parse_yaml, read_yaml

WORST_CASE = "worst_case"
NO_DEFENSE = "none"


def parse_epsilon(value: Any) -> Any:
    """Accept numbers and fractions written as strings, such as ``1/255``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                numerator, denominator = text.split("/")
                return float(numerator) / float(denominator)
            return float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction such as 1/255") from None
    return value


#: What :func:`parse_epsilon` reads: a number, or a fraction such as ``1/255``, written as a string.
_NUMBER = r"\s*(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*"
EPSILON_JSON_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": f"^{_NUMBER}(/{_NUMBER})?$"}]
}

#: A perturbation budget in pixel units of [0, 1] images: finite and >= 0; the threat
#: model bounds it by its norm (see :data:`UNIT_NORMS`).
Epsilon = Annotated[
    float, BeforeValidator(parse_epsilon), Field(ge=0.0, allow_inf_nan=False), WithJsonSchema(EPSILON_JSON_SCHEMA)
]

#: Norms whose budgets are at most 1, and why; L2 and L1 budgets grow with the image's size.
UNIT_NORMS = {
    Norm.LINF: "an L-inf budget is a change of pixel value, and pixels lie in [0, 1]",
    Norm.L0: "an L0 budget is the fraction of pixels that may change",
}


def epsilon_label(eps: float, norm: Norm | str) -> str:
    """A budget as people write it: L-inf in grey levels (``0.00392...`` -> ``1/255``), any
    other norm as a plain number (an L2 budget of 2.0 is no number of grey levels)."""
    if eps == 0:
        return "0"
    if Norm(norm) is Norm.LINF:
        grey = eps * 255
        for digits in (0, 1, 2):
            if abs(grey - round(grey, digits)) < 1e-6:
                return f"{round(grey, digits):g}/255"
    return f"{eps:.4g}"


def level_label(level: float, budget: str) -> str:
    """A level of an attack's own budget (:class:`Budget`) as tables write it: ``severity 3``."""
    return f"{budget} {level:g}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuditInfo(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Identifier of the audit; used in the run directory's path.",
    )
    title: str | None = Field(None, description="Human-readable title for the report.")
    description: str = Field("", description="What is audited and why.")


class IntendedUse(_Section):
    """What the audited device is for: the scope every robustness claim is made in.

    All free text, shown verbatim (escaped) in the report; a field left out is printed as
    "not stated" so that a reviewer sees the gap.
    """

    device: str | None = Field(None, description="Device or model name and version.")
    clinical_task: str | None = Field(None, description="What the model decides, for whom, from which images.")
    population: str | None = Field(None, description="Target patient population.")
    modality: str | None = Field(None, description="Modality and acquisition constraints (scanner, protocol, window).")
    users: str | None = Field(None, description="Intended users and how they act on the output.")
    outputs: str | None = Field(None, description="Outputs and decision thresholds.")
    out_of_scope: list[str] = Field(default_factory=list, description="Uses and inputs the audit makes no claim about.")


class ModelRef(_Section):
    loader: str = Field(description="Name of a registered model loader (see `medaudit plugins`).")
    params: dict[str, Any] = Field(default_factory=dict, description="The loader's parameters.")
    randomized: bool = Field(
        False,
        description="The model is randomised on purpose (e.g. random input transforms): two identical forward passes "
        "may differ. Such a model needs attacks that average over its randomness (EOT); without this key a "
        "non-deterministic model stops the run as INVALID.",
    )


class DataRef(_Section):
    dataset: str = Field(description="Name of a registered dataset.")
    params: dict[str, Any] = Field(default_factory=dict, description="The dataset's parameters.")


class AttackRef(_Section):
    name: str = Field(description="Name of a registered attack.")
    id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Label of this attack configuration (defaults to its name); needed when one attack is listed twice.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The attack's parameters.")
    levels: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        None,
        min_length=1,
        description="Levels of an attack sized by its own budget instead of a norm (a corruption's severity): its "
        "jobs run at these instead of threat_model.epsilons. Default: the levels the attack declares.",
    )

    @field_validator("levels")
    @classmethod
    def _sorted_levels(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else sorted(set(value))

    @property
    def label(self) -> str:
        return self.id or self.name


class DefenseRef(_Section):
    name: str = Field(description="Name of a registered defense.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.id or self.name


class ThreatModel(_Section):
    # The JSON Schema's share of _within_norm: numbers above 1 only for L2 and L1.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"norm": {"enum": [n.value for n in Norm if n not in UNIT_NORMS]}}, "required": ["norm"]},
        "else": {"properties": {"epsilons": {"items": {"maximum": 1}}}},
    })

    norm: Norm = Field(Norm.LINF, description="Norm bounding the perturbation.")
    epsilons: list[Epsilon] = Field(
        min_length=1,
        description="Budgets in pixel units of [0, 1] images; '1/255' style strings are allowed. L-inf: at most 1 "
        "(1/255 is one grey level); L2 and L1: the norm of the whole perturbation, above 1 for large images; "
        "L0: the fraction of pixels that may change.",
    )

    @field_validator("epsilons")
    @classmethod
    def _within_norm(cls, value: list[float], info: ValidationInfo) -> list[float]:
        """Sorted, without repeats, and at most 1 for the norms in :data:`UNIT_NORMS`."""
        norm = info.data.get("norm")
        if norm in UNIT_NORMS and max(value) > 1:
            raise ValueError(f"{max(value):g} is not at most 1: {UNIT_NORMS[norm]}")
        return sorted(set(value))


class SubgroupRef(_Section):
    """The cases of a criterion's subgroup: those whose covariate has this value."""

    covariate: str = Field(description="A per-case covariate of the data set (site, scanner, sex, lesion size...).")
    value: str | int | float | bool | None = Field(description="The covariate's value; null: the cases without it.")


class Criterion(_Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(description="Identifier shown in the report and junit.xml, e.g. AC-01.")
    description: str = ""
    metric: str = Field(description="Name of a registered metric.")
    attack: str = Field(WORST_CASE, description="An attack label, or 'worst_case' over the attacks bounded by threat_model's norm.")
    defense: str = Field(NO_DEFENSE, description="A defense label, or 'none' for the undefended model.")
    epsilon: Epsilon | None = Field(
        None, description="Budget the criterion applies to (not needed for clean metrics): one of threat_model.epsilons, "
        "or for an attack sized by its own budget (a corruption), one of its levels.")
    op: Literal[">=", ">", "<=", "<"]
    threshold: float = Field(
        allow_inf_nan=False, description="Compared with the metric; inside the metric's range, so that it can pass and fail."
    )
    statistic: Literal["auto", "point", "lower_bound", "upper_bound"] = Field(
        "auto",
        description="Which estimate is compared: 'auto' takes the confidence bound on the side that "
        "protects the patient (lower bound for >=, upper bound for <=).",
    )
    min_n: int = Field(1, ge=1, description="Fewer evaluated cases than this gives INCONCLUSIVE.")
    class_name: str | None = Field(
        None, alias="class", description="For a per-class rate (sensitivity, specificity, false_negative_rate and "
        "their clean_ forms): the class it is judged on, by name; without it, the class where the rate is worst.")
    subgroup: SubgroupRef | None = Field(
        None, description="Judge the metric on one subgroup of cases only (a clean metric, or the worst case).")
    severity: Literal["blocking", "advisory"] = "blocking"
    risk_ref: str | None = Field(None, description="Reference into the manufacturer's risk file.")


def is_run_reference(text: str) -> bool:
    """Does a regression baseline name a run by report id (``MA-`` and hex digits, as
    `medaudit history` lists them) or as ``latest:<audit>``, rather than by its folder?"""
    ident = text.removeprefix("MA-")
    return text.startswith("latest:") or (text.startswith("MA-") and len(ident) >= 8
                                           and all(ch in "0123456789abcdefABCDEF" for ch in ident))


class Regression(_Section):
    """A regression gate: the metric must not drop significantly, by more than ``max_drop``,
    from its value in an earlier run (the baseline) of the same audit.

    The drop is the baseline's value minus this run's for a metric where higher is better
    (the other way round where lower is). FAIL when the drop exceeds ``max_drop`` and the
    change is significant at ``acceptance.confidence`` (exact McNemar or paired bootstrap
    when both runs evaluated the same data, else an unpaired test); PASS otherwise;
    INCONCLUSIVE when the baseline or its value cannot be found at run time.
    """

    id: str | None = Field(
        None, description="Identifier in the report and junit.xml; default REG-01, REG-02... in order.")
    description: str = ""
    baseline: str = Field(
        min_length=1,
        description="The earlier run: its run directory (relative to the spec's folder), a report id as `medaudit "
        "history` lists it (MA-...), or latest:<audit name> for that audit's newest run in the history index.",
    )
    metric: str = Field(description="Name of a registered metric, in the spec's 'metrics' list.")
    attack: str = Field(
        WORST_CASE, description="An attack label, or 'worst_case' over the attacks bounded by the norm.")
    defense: str = Field(NO_DEFENSE, description="A defense label, or 'none' for the undefended model.")
    epsilon: Epsilon | None = Field(
        None, description="The budget judged; default: every budget of the attack (one verdict each, ids "
        "<id>@<budget>). Not for clean metrics.")
    max_drop: float = Field(
        ge=0, allow_inf_nan=False,
        description="The largest drop tolerated, in the metric's unit (0.02: two points of accuracy).")
    severity: Literal["blocking", "advisory"] = "blocking"
    risk_ref: str | None = Field(None, description="Reference into the manufacturer's risk file.")

    @field_validator("baseline")
    @classmethod
    def _finished_run(cls, value: str, info: ValidationInfo) -> str:
        """A folder must hold a finished run (results.json); found relative to the spec's folder."""
        if is_run_reference(value):
            return value
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not (path / "results.json").is_file():
            raise ValueError(f"no results.json in {path}: name a finished run directory, a report id (MA-...) "
                             "or latest:<audit name>")
        return str(path)

    @model_validator(mode="after")
    def _baseline_has_metric(self) -> "Regression":
        """A baseline run directory must report the metric, for the defense."""
        if is_run_reference(self.baseline):
            return self
        try:
            results = json.loads((Path(self.baseline) / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {Path(self.baseline) / 'results.json'}: {exc}") from None
        names = [m.get("name") for m in results.get("metrics") or []]
        if self.metric not in names:
            raise ValueError(f"the baseline run {self.baseline} has no metric {self.metric!r} (it has "
                             f"{', '.join(map(str, names)) or 'none'})")
        if self.defense not in (results.get("clean") or {}):
            raise ValueError(f"the baseline run {self.baseline} has no defense {self.defense!r}")
        return self


def _as_list(value: Any) -> Any:
    """One regression gate may be written without the list around it."""
    return [value] if isinstance(value, dict) else value


class Acceptance(_Section):
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")
    proportion_interval: Literal["wilson", "clopper-pearson"] = Field(
        "wilson", description="Interval on proportions (accuracies, rates): Wilson score, or Clopper-Pearson "
        "(exact: coverage never below the confidence level, wider).",
    )
    mean_interval: Literal["bootstrap", "bca"] = Field(
        "bootstrap", description="Interval on means over cases (Dice...): percentile bootstrap, or BCa "
        "(bias-corrected and accelerated: better coverage when per-case values are skewed).",
    )
    criteria: list[Criterion] = Field(default_factory=list)
    regression: Annotated[list[Regression], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="Regression gates against earlier runs: one entry or a list. Each FAILs when its metric dropped "
        "by more than max_drop since the baseline run and the drop is significant (a paired test when both runs "
        "share their data); they appear among the criteria of the results and junit.xml and drive the verdict "
        "like criteria.",
    )

    @model_validator(mode="after")
    def _regression_ids(self) -> "Acceptance":
        """Default ids REG-01, REG-02... in order; no id shared with a criterion or another gate."""
        for i, gate in enumerate(self.regression, 1):
            if gate.id is None:
                gate.id = f"REG-{i:02d}"
        ids = [c.id for c in self.criteria]
        for gate in self.regression:
            if gate.id in ids:
                raise ValueError(f"regression: id {gate.id!r} is already used by a criterion or another gate")
            ids.append(gate.id)
        return self


def check_regressions(spec: "Spec", host: Host) -> list[tuple[tuple, str]]:
    """The regression gates' references to the rest of the spec (metric, attack, defense,
    epsilon) as (location, problem) pairs, for :func:`_check_references`."""
    problems: list[tuple[tuple, str]] = []
    attack_labels = [a.label for a in spec.attacks] + [WORST_CASE]
    defense_labels = [NO_DEFENSE] + [d.label for d in spec.defenses]
    for i, gate in enumerate(spec.acceptance.regression):
        loc = ("acceptance", "regression", i)
        metric = host.components["metric"].get(gate.metric)
        if metric is None:
            problems.append((loc + ("metric",), unknown_name_message("metric", gate.metric, host.components["metric"])))
        elif gate.metric not in spec.metrics:
            problems.append((loc + ("metric",), f"metric {gate.metric!r} is not in the spec's 'metrics' list"))
        if gate.attack not in attack_labels:
            problems.append((loc + ("attack",), unknown_name_message("attack", gate.attack, attack_labels)))
        if gate.defense not in defense_labels:
            problems.append((loc + ("defense",), unknown_name_message("defense", gate.defense, defense_labels)))
        budget, levels = attack_levels(spec, host, gate.attack)
        if gate.epsilon is not None and not any(abs(gate.epsilon - e) < 1e-12 for e in levels):
            shown = f"{gate.epsilon:g}" if budget else epsilon_label(gate.epsilon, spec.threat_model.norm)
            problems.append((loc + ("epsilon",), f"epsilon {shown} is not one of the budgets the attack runs at"))
        if gate.epsilon is not None and metric is not None and metric.clean:
            problems.append((loc + ("epsilon",), f"metric {gate.metric!r} is measured clean: drop 'epsilon'"))
    return problems


class ReportOptions(_Section):
    title: str | None = None
    subgroup_min_n: int = Field(
        5, ge=1, description="The subgroup tables show no metric for a subgroup of fewer cases (its n only): "
        "an estimate on a handful of cases says little and may point at individuals. results.json keeps every value.")
    formats: list[Literal["html", "json", "junit", "pdf"]] = Field(
        default_factory=lambda: ["html", "json", "junit"],
        description="Outputs besides results.json: report.html, junit.xml (criteria as test cases for CI), "
        "and report.pdf (report.html printed by a headless Chromium; not a default, needs Chromium installed).",
    )
    figures: list[Literal["grad_cam", "embedding"]] = Field(
        default_factory=lambda: ["grad_cam", "embedding"],
        description="The model-explaining figures drawn at the end of a run (classification): Grad-CAM on the example "
        "cases and the feature embedding (t-SNE of at most 256 cases): about 2 s of the demo's 25, scikit-learn's import "
        "included; "
        "[] leaves them out, and `medaudit report RUN_DIR --figures grad_cam,embedding` draws them later.",
    )


#: How to install what ``runtime.executor: ray`` needs.
RAY_INSTALL = "pip install -e '.[ray]'"


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class RayOptions(_Section):
    """Where and how wide the Ray executor runs (``runtime.executor: ray``)."""

    address: str | None = Field(
        None, description="The Ray cluster: null starts a local one on this machine, auto joins the cluster started here "
        "with `ray start`, ray://host:port joins a remote one.",
    )
    num_workers: int | None = Field(
        None, ge=1, description="Worker processes (actors), each loading the model once; default: one per GPU, else "
        "one per CPU Ray offers, at most one per shard.",
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs each worker holds; default: 1 when the cluster has GPUs, else 0.",
    )
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs each worker holds.")
    shard_cases: int | None = Field(
        None, ge=1, description="Cases per shard, the unit of work a worker runs (rounded up to a multiple of "
        "runtime.batch_size); default: enough for two shards of each job per worker.",
    )


class Runtime(_Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto picks CUDA when present.")
    batch_size: int = Field(64, ge=1, le=65536)
    seed: int = Field(0, ge=0, description="Seeds every random choice together with each job's id.")
    output_dir: Path = Field(Path("runs"), description="Run directories go under <output_dir>/<audit name>/.")
    history: str = Field(
        "history.sqlite", min_length=1,
        description="The audit history index every finished run is added to (SQLite; relative to output_dir); "
        "'off' keeps the run out of it. `medaudit history` lists it; it can be rebuilt from the run directories.",
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    workers: int = Field(
        0, ge=0, le=64,
        description="DataLoader worker processes that read cases from disk while the model works (0: read in the "
        "main process). On a GPU, 2 to 8 keep it fed; results do not depend on it.",
    )
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off",
        description="Run the model's forward pass in reduced precision (torch.autocast); logits, and so "
        "every attack loss, stay in fp32. Faster on GPUs with tensor cores; results can differ slightly "
        "from fp32. fp16 needs CUDA.",
    )
    channels_last: bool = Field(
        False, description="Channels-last memory format for 2D models and inputs: often faster for CNNs on GPUs."
    )
    deterministic: bool = Field(
        False,
        description="Deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS workspace :4096:8, no cuDNN "
        "autotuning): a rerun on the same machine, device and versions gives bit-identical records, also on a GPU; "
        "slower, and an operation without a deterministic version stops the run. CPU runs are deterministic anyway.",
    )

    strategy: Literal["full", "verdict"] = Field(
        "full",
        description="full runs every job on every case. verdict spends compute only where it can still change the "
        "verdict: attacks run cheapest first, each attack and each larger epsilon only on the cases still robust "
        "(an adversarial found at a smaller epsilon counts at every larger one: carried over), and the run stops "
        "once the blocking criteria are decided. The worst case and the verdict are full's; per-attack figures "
        "become cumulative. Needs a blocking criterion.",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local runs every job in this process; ray shards the jobs over worker processes on "
        "the GPUs of this machine or a Ray cluster (runtime.ray). Results do not depend on it.",
    )
    ray: RayOptions = Field(default_factory=RayOptions)

    @model_validator(mode="after")
    def _ray_installed(self) -> "Runtime":
        if self.executor == "ray" and not ray_installed():
            raise ValueError(f"executor ray needs Ray, which is not installed: {RAY_INSTALL}")
        return self

    @model_validator(mode="after")
    def _fp16_needs_cuda(self) -> "Runtime":
        if self.autocast == "fp16" and self.device == "cpu":
            raise ValueError("autocast fp16 needs a CUDA device; use bf16 on the CPU")
        return self


_PERTURBATION_METRICS = ["perturbation_linf_mean", "perturbation_linf_max", "perturbation_l2_mean", "perturbation_l2_max"]
#: Metrics computed when a spec lists none, per task.
DEFAULT_METRICS = {
    Task.CLASSIFICATION: ["clean_accuracy", "robust_accuracy", "attack_success_rate", *_PERTURBATION_METRICS],
    Task.SEGMENTATION: [
        "clean_dice", "robust_dice", "clean_iou", "robust_iou", "clean_hd95", "robust_hd95", "clean_pixel_accuracy",
        "robust_pixel_accuracy", "broken_case_rate", "target_dice", "target_success_rate", *_PERTURBATION_METRICS,
    ],
}


class Baseline(_Section):
    """A reference model's finished run on the same corruptions: each corruption's error is
    normalised to the reference's (the corruption error and its mean, mCE, of Hendrycks &
    Dietterich 2019), so models audited on other days can be compared."""

    run_dir: InputPath = Field(description="The reference's run directory (its results.json), relative to the spec.")
    name: str = Field(description="What the reference is, for the report, e.g. 'ResNet-50, release 2.1'.")


class ValidityOptions(_Section):
    """How hard the validity checks that run the model again look (Carlini et al. 2019):
    the strongest attack re-run longer with restarts (convergence, C6) and random noise of
    the threat model's norm (the noise baseline, C7), each on the first cases."""

    convergence_cases: int = Field(
        32, ge=0, description="Cases the strongest attack is re-run on, per model (0: no convergence check).")
    convergence_factor: int = Field(2, ge=1, le=20, description="Times the attack's iterations (or queries) in the re-run.")
    convergence_restarts: int = Field(3, ge=1, le=20, description="Independent restarts of the re-run (fresh seeds).")
    trace_cases: int = Field(3, ge=0, le=16, description="Cases whose loss the report plots at every model call.")
    noise_cases: int = Field(64, ge=0, description="Cases the noise baseline runs on, per model (0: no noise baseline).")
    noise_draws: int = Field(20, ge=1, le=1000, description="Random perturbations drawn per case and budget.")


class Spec(_Section):
    """A whole audit."""

    audit: AuditInfo
    intended_use: IntendedUse = Field(default_factory=IntendedUse)
    task: Task = Task.CLASSIFICATION
    model: ModelRef
    data: DataRef
    threat_model: ThreatModel
    attacks: list[AttackRef] = Field(min_length=1)
    defenses: list[DefenseRef] = Field(default_factory=list)
    metrics: list[str] = Field(default_factory=list, description="Metrics to compute; default: the task's defaults.")
    acceptance: Acceptance = Field(default_factory=Acceptance)
    report: ReportOptions = Field(default_factory=ReportOptions)
    runtime: Runtime = Field(default_factory=Runtime)
    validity: ValidityOptions = Field(default_factory=ValidityOptions)
    baseline: Baseline | None = Field(
        None, description="A reference run to normalise the corruption errors to (mCE); none: errors unnormalised.")

    @model_validator(mode="before")
    @classmethod
    def _default_metrics(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("metrics"):
            task = data.get("task", Task.CLASSIFICATION)
            if task in {t.value for t in Task} or isinstance(task, Task):
                data = {**data, "metrics": list(DEFAULT_METRICS[Task(task)])}
        return data

    @model_validator(mode="after")
    def _verdict_needs_criteria(self) -> "Spec":
        if self.runtime.strategy == "verdict" and not any(
                c.severity == "blocking" for c in [*self.acceptance.criteria, *self.acceptance.regression]):
            raise ValueError("runtime.strategy verdict runs only what the verdict needs, and without a blocking "
                             "criterion (acceptance.criteria or acceptance.regression) nothing decides it: add one, "
                             "or use strategy full")
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> "Spec":
        for section, refs in (("attacks", self.attacks), ("defenses", self.defenses)):
            seen: set[str] = set()
            for ref in refs:
                if ref.label in seen:
                    raise ValueError(f"{section}: {ref.label!r} is listed twice; give one an 'id'")
                seen.add(ref.label)
        if any(ref.label == NO_DEFENSE for ref in self.defenses):
            raise ValueError(f"defenses: {NO_DEFENSE!r} is reserved for the undefended model")
        if any(ref.label == WORST_CASE for ref in self.attacks):
            raise ValueError(f"attacks: {WORST_CASE!r} is reserved")
        return self

    def digest(self) -> str:
        """sha256 of the resolved spec, ignoring where results are written and which executor runs the jobs
        (a run started locally may be resumed on Ray)."""
        data = self.model_dump(mode="json")
        for where in ("output_dir", "history", "executor", "ray"):  # where a run goes and runs, not what it computes
            data["runtime"].pop(where, None)
        data["report"].pop("figures", None)  # figures can be drawn later (medaudit report --figures)
        if data["runtime"].get("strategy") == "full":  # the default keeps the digests of specs written before it
            data["runtime"].pop("strategy")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def title(self) -> str:
        return self.report.title or self.audit.title or self.audit.name


# -- loading --------------------------------------------------------------------------


def load_spec(path: str | Path, host: Host) -> Spec:
    """Read, validate and resolve a spec file; raise :class:`SpecError` listing every problem."""
    path = Path(path)
    source = read_yaml(path)
    return validate_source(source, host, base_dir=path.resolve().parent)


def load_spec_text(text: str, host: Host, base_dir: Path, name: str = "spec") -> Spec:
    return validate_source(parse_yaml(text, name), host, base_dir=base_dir)


def validate_source(source: Source, host: Host, base_dir: Path) -> Spec:
    problems: list[str] = []
    if not isinstance(source.data, dict):
        raise SpecError([f"{source.where(())}: the spec must be a mapping of sections"], source=source.name)
    resolved = copy.deepcopy(source.data)
    _check_components(source, resolved, host, base_dir, problems)

    spec = None
    try:
        spec = Spec.model_validate(resolved, context={"base_dir": base_dir})
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            problems.append(f"{source.where(loc)}: {format_loc(loc)}: {_message(err)}")
    if spec is not None:
        _check_references(source, spec, host, problems)
    if problems:
        raise SpecError(problems, source=source.name)
    assert spec is not None
    return spec


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _check_components(source: Source, data: dict, host: Host, base_dir: Path, problems: list[str]) -> None:
    """Validate each component reference in place; replace params by their resolved values."""
    task = data.get("task", Task.CLASSIFICATION.value)
    threat_model = data.get("threat_model")
    norm = threat_model.get("norm", Norm.LINF.value) if isinstance(threat_model, dict) else None

    def check(kind: str, ref: Any, loc: Loc, name_key: str) -> None:
        if not isinstance(ref, dict) or not isinstance(ref.get(name_key), str):
            return  # structural errors are reported by the pydantic pass
        name = ref[name_key]
        try:
            cls = host.get(kind, name)
        except KeyError as exc:
            problems.append(f"{source.where(loc + (name_key,))}: {format_loc(loc + (name_key,))}: {exc.args[0]}")
            return
        params = ref.get("params", {}) or {}
        if not isinstance(params, dict):
            return
        try:
            validated = cls.Params.model_validate(params, context={"base_dir": base_dir})
        except ValidationError as exc:
            for err in exc.errors():
                full = loc + ("params",) + tuple(err["loc"])
                problems.append(f"{source.where(full)}: {format_loc(full)}: {_message(err)}")
            return
        ref["params"] = validated.model_dump(mode="json", exclude_none=False)
        for field, path in missing_inputs(validated):
            full = loc + ("params", field)
            problems.append(f"{source.where(full)}: {format_loc(full)}: not found: {path}")
        if task in {t.value for t in Task} and Task(task) not in cls.tasks:
            problems.append(
                f"{source.where(loc + (name_key,))}: {format_loc(loc + (name_key,))}: {kind} {name!r} does not "
                f"support task {task!r} (it supports {', '.join(sorted(t.value for t in cls.tasks))})"
            )
        if kind == "attack" and cls.budget is None and ref.get("levels") is not None:
            problems.append(
                f"{source.where(loc + ('levels',))}: {format_loc(loc + ('levels',))}: attack {name!r} is bounded by "
                "threat_model's norm and runs at its epsilons; 'levels' is for attacks sized by their own budget"
            )
        levels = ref.get("levels")
        if kind == "attack" and cls.budget is not None and cls.budget.table is not None and isinstance(levels, list):
            allowed = cls.budget.levels
            if unknown := [v for v in levels if not isinstance(v, (int, float)) or float(v) not in allowed]:
                problems.append(
                    f"{source.where(loc + ('levels',))}: {format_loc(loc + ('levels',))}: attack {name!r} has "
                    f"{cls.budget.name} levels {', '.join(f'{v:g}' for v in allowed)} only (not "
                    f"{', '.join(str(v) for v in unknown)})"
                )
        if kind == "attack" and cls.budget is None and norm in {n.value for n in Norm} and Norm(norm) not in cls.norms:
            problems.append(
                f"{source.where(loc + (name_key,))}: {format_loc(loc + (name_key,))}: attack {name!r} does not "
                f"bound the {norm} norm of threat_model (it supports {', '.join(sorted(n.value for n in cls.norms))})"
            )

    check("model", data.get("model"), ("model",), "loader")
    check("dataset", data.get("data"), ("data",), "dataset")
    for section, kind in (("attacks", "attack"), ("defenses", "defense")):
        refs = data.get(section)
        if isinstance(refs, list):
            for i, ref in enumerate(refs):
                check(kind, ref, (section, i), "name")


def _check_references(source: Source, spec: Spec, host: Host, problems: list[str]) -> None:
    """Names that refer to other parts of the spec or to registered metrics."""
    for i, name in enumerate(spec.metrics):
        loc = ("metrics", i)
        if name not in host.components["metric"]:
            problems.append(f"{source.where(loc)}: {format_loc(loc)}: {unknown_name_message('metric', name, host.components['metric'])}")
        elif spec.task not in host.components["metric"][name].tasks:
            problems.append(f"{source.where(loc)}: {format_loc(loc)}: metric {name!r} does not support task {spec.task.value!r}")
    attack_labels = [a.label for a in spec.attacks]
    defense_labels = [NO_DEFENSE] + [d.label for d in spec.defenses]
    for i, crit in enumerate(spec.acceptance.criteria):
        loc = ("acceptance", "criteria", i)
        metric_cls = host.components["metric"].get(crit.metric)
        if metric_cls is None:
            problems.append(f"{source.where(loc + ('metric',))}: {format_loc(loc + ('metric',))}: {unknown_name_message('metric', crit.metric, host.components['metric'])}")
        elif crit.metric not in spec.metrics:
            problems.append(f"{source.where(loc + ('metric',))}: {format_loc(loc + ('metric',))}: metric {crit.metric!r} is not in the spec's 'metrics' list")
        if crit.attack == WORST_CASE and not (metric_cls is not None and metric_cls.clean) and all(
                attack_levels(spec, host, a)[0] is not None for a in attack_labels):
            problems.append(f"{source.where(loc + ('attack',))}: {format_loc(loc + ('attack',))}: the worst case is over "
                            "the attacks bounded by threat_model's norm, and every attack here is sized by its own "
                            "budget; name one of them")
        if crit.attack not in attack_labels + [WORST_CASE]:
            problems.append(f"{source.where(loc + ('attack',))}: {format_loc(loc + ('attack',))}: {unknown_name_message('attack', crit.attack, attack_labels + [WORST_CASE])}")
        if crit.defense not in defense_labels:
            problems.append(f"{source.where(loc + ('defense',))}: {format_loc(loc + ('defense',))}: {unknown_name_message('defense', crit.defense, defense_labels)}")
        if metric_cls is not None and (why := _undecidable(crit, metric_cls)):
            problems.append(f"{source.where(loc + ('threshold',))}: {format_loc(loc + ('threshold',))}: {why}")
        if crit.class_name is not None and metric_cls is not None and not metric_cls.per_class:
            problems.append(f"{source.where(loc + ('class',))}: {format_loc(loc + ('class',))}: metric {crit.metric!r} is "
                            "not a per-class rate; 'class' is for sensitivity, specificity and false_negative_rate "
                            "(and their clean_ forms)")
        if crit.subgroup is not None and not (metric_cls is not None and metric_cls.clean) and crit.attack != WORST_CASE:
            problems.append(f"{source.where(loc + ('subgroup',))}: {format_loc(loc + ('subgroup',))}: subgroups are "
                            "measured clean and under the worst case: name a clean metric or attack: worst_case")
        if crit.subgroup is not None and crit.class_name is not None:
            problems.append(f"{source.where(loc + ('subgroup',))}: {format_loc(loc + ('subgroup',))}: a per-class rate "
                            "is not computed per subgroup: drop 'class' or 'subgroup'")
        needs_eps = metric_cls is not None and not metric_cls.clean
        if needs_eps and crit.epsilon is None:
            problems.append(f"{source.where(loc)}: {format_loc(loc)}: metric {crit.metric!r} needs an 'epsilon'")
        budget, levels = attack_levels(spec, host, crit.attack)
        if crit.epsilon is not None and not any(abs(crit.epsilon - e) < 1e-12 for e in levels):
            norm = spec.threat_model.norm
            where = (f"{budget.name} levels of attack {crit.attack!r} ({', '.join(f'{e:g}' for e in levels)})" if budget
                     else f"threat_model.epsilons ({', '.join(epsilon_label(e, norm) for e in levels)})")
            shown = f"{crit.epsilon:g}" if budget else epsilon_label(crit.epsilon, norm)
            problems.append(f"{source.where(loc + ('epsilon',))}: {format_loc(loc + ('epsilon',))}: epsilon {shown} is not in {where}")
    if spec.baseline is not None and not (spec.baseline.run_dir / "results.json").is_file():
        loc = ("baseline", "run_dir")
        problems.append(f"{source.where(loc)}: {format_loc(loc)}: no results.json in {spec.baseline.run_dir}: name a "
                        "finished run directory of the reference model")
    ids = [c.id for c in spec.acceptance.criteria]
    for i, cid in enumerate(ids):
        if cid in ids[:i]:
            loc = ("acceptance", "criteria", i, "id")
            problems.append(f"{source.where(loc)}: {format_loc(loc)}: criterion id {cid!r} is used twice")
    for loc, problem in check_regressions(spec, host):
        problems.append(f"{source.where(loc)}: {format_loc(loc)}: {problem}")


def attack_levels(spec: Spec, host: Host, label: str) -> tuple[Budget | None, list[float]]:
    """Where the jobs of the spec's attack ``label`` run: its own budget and levels for an
    attack sized by a :class:`Budget`, else (None, the threat model's epsilons); the
    worst case, and an unknown label, run at the epsilons."""
    ref = next((a for a in spec.attacks if a.label == label), None)
    cls = host.components["attack"].get(ref.name) if ref is not None else None
    if cls is None or cls.budget is None:
        return None, list(spec.threat_model.epsilons)
    return cls.budget, list(ref.levels or cls.budget.levels)


def _undecidable(crit: Criterion, metric: type[Metric]) -> str | None:
    """Why ``crit`` can never fail or never pass on ``metric``'s range (its ``bounds``), or None."""
    low, high = metric.bounds
    t = crit.threshold
    never_fail = {">=": t <= low, ">": t < low, "<=": t >= high, "<": t > high}[crit.op]
    never_pass = {">=": t > high, ">": t >= high, "<=": t < low, "<": t <= low}[crit.op]
    if not (never_fail or never_pass):
        return None
    span = ("(-inf" if low == -math.inf else f"[{low:g}") + ", " + ("inf)" if high == math.inf else f"{high:g}]")
    return (f"{crit.op} {t:g} can never {'fail' if never_fail else 'pass'}: {metric.name} lies in {span}; "
            "choose a threshold inside that range")


def spec_json_schema(host: Host) -> dict:
    """JSON Schema of the spec with every registered component's params (for editors)."""
    from pydantic import create_model

    def union(kind: str, name_key: str, extra: dict) -> Any:
        variants = []
        for name, cls in sorted(host.components[kind].items()):
            fields = {name_key: (Literal[name], ...), "params": (cls.Params, None), **extra}
            if kind == "attack" and cls.budget is not None:  # levels only where the attack has its own budget
                field = AttackRef.model_fields["levels"]
                fields["levels"] = (field.annotation, Field(None, description=field.description))
            variants.append(create_model(f"{kind}_{name}".replace("-", "_"), __config__=ConfigDict(extra="forbid"), **fields))
        if not variants:
            return dict[str, Any]
        return Annotated[Union[tuple(variants)], Field(discriminator=name_key)]

    label = {"id": (str | None, None)}
    schema_model = create_model(
        "MedauditSpec",
        __base__=Spec,
        model=(union("model", "loader", {}), ...),
        data=(union("dataset", "dataset", {}), ...),
        attacks=(list[union("attack", "name", label)], Field(min_length=1)),
        defenses=(list[union("defense", "name", label)], []),
        metrics=(list[Literal[tuple(sorted(host.components["metric"]))]], []),  # type: ignore[misc]
    )
    schema = schema_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "medaudit audit spec"
    return schema
