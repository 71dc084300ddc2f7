"""Running a validated spec: load once, run every unfinished job, aggregate, report.

Model and data are loaded and checked before the run directory is created, so bad input
leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import medaudit
from medaudit.audits import rundir
from medaudit.audits.figures import classification_figures, segmentation_figures
from medaudit.audits.plan import check_model_access, plan_jobs
from medaudit.audits.records import (
    EXAMPLE_CASES, FEATURE_CASES, RecordWriter, dense_scores, is_done, read_records, save_examples, save_features,
)
from medaudit.audits.results import acceptance, compute_results, validity_checks
from medaudit.core.adaptive import bind_labels
from medaudit.core.components import Access, Attack, AttackContext, LoadedData, LoadedModel, MinimumNormAttack, Norm, Task, component_info
from medaudit.core.environment import describe_environment, select_device
from medaudit.core.errors import (
    DataError, EnvironmentProblem, ExitCode, MedauditError, ModelRaised, ModelRejected, ModelUnstable, PrivacyError,
    SpecError, Terminated,
)
from medaudit.core.host import Host
from medaudit.core.jobs import ADAPTIVE_SUFFIX, Job
from medaudit.core.models import SpeedWrapper, prepare_for_audit, state_dict_sha256
from medaudit.core.perturbation import input_gradient, project
from medaudit.core.privacy import leaked_values
from medaudit.core.probes import FeatureTap
from medaudit.core.spec import NO_DEFENSE, Spec, epsilon_label
from medaudit.core.text import printable

SCHEMA_VERSION = 1
#: Sources of identifying values a privacy refusal names at most.
MAX_SOURCES_SHOWN = 5
#: Where torch and medaudit live: frames there are never the model's own code.
LIBRARY_DIRS = tuple(os.path.join(os.path.dirname(m.__file__), "") for m in (torch, medaudit))

#: How the numbers are defined, stated in results.json and the report.
CONVENTIONS = {
    Task.CLASSIFICATION: [
        "Only samples classified correctly when clean are attacked; the others count as errors.",
        "Robust accuracy under worst_case: a sample counts only if it survives every attack at that epsilon.",
        "Intervals: Wilson score intervals on proportions.",
    ],
    Task.SEGMENTATION: [
        "Every case is attacked. A case's Dice, IoU and HD95 are means over the foreground classes (class 0 is background).",
        "Empty masks: a class absent from both truth and prediction scores Dice 1, IoU 1, HD95 0; absent from exactly "
        "one of them, Dice 0, IoU 0 and HD95 the image diagonal. So a lesion an attack creates in a healthy case counts.",
        "HD95 is in pixels (voxels), or in mm when the data set gives a spacing.",
        "Robust Dice under worst_case: each case takes its lowest Dice over the attacks at that epsilon.",
        "Broken case (ROG, Daza et al. 2021): Dice under attack below half the mean clean Dice of the data set.",
        "Targeted attacks: target_dice is the Dice between the prediction under attack and the attacker's target; "
        "target_success_rate: over the cases whose target differs from the truth, the share where the prediction "
        "under attack takes the target's label on at least 99% of the pixels the target changes.",
        "Intervals: percentile bootstrap over cases (2000 resamples) on means; Wilson score intervals on proportions.",
    ],
}

DETECTOR_CONVENTION = (
    "Detector defenses: a clean input the detector rejects counts as an error; an input under attack counts as "
    "robust when it is rejected or still classified correctly. Detection AUROC and TPR at 5% FPR compare the clean "
    "cases' scores with those of the adversarial inputs that fool the classifier."
)


class Interrupted(MedauditError):
    exit_code = ExitCode.INTERRUPTED


class NothingToEvaluate(MedauditError):
    exit_code = ExitCode.NO_DATA


@dataclasses.dataclass
class Outcome:
    run_dir: Path
    results: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return self.results["acceptance"]["exit_code"]


def job_seed(seed: int, job_id: str) -> int:
    """Every random choice of a job derives from the spec's seed and the job's id."""
    return int(hashlib.sha256(f"{seed}:{job_id}".encode()).hexdigest()[:15], 16)


def check_data_fits(data: LoadedData, model: LoadedModel, task: Task) -> None:
    if len(data) == 0:
        raise NothingToEvaluate("the dataset is empty: nothing to evaluate")
    channels = data.images.shape[1]
    if channels not in (1, model.in_channels):
        raise DataError(f"images have {channels} channels but the model takes {model.in_channels}")
    if task is Task.SEGMENTATION:
        if data.masks is None:
            raise DataError("segmentation needs masks, and the dataset has none")
        if data.masks.shape[1:] != data.images.shape[2:] or len(data.masks) != len(data):
            raise DataError(f"masks of shape {tuple(data.masks.shape)} do not match images of shape {tuple(data.images.shape)}")
        labels, limit = data.masks.flatten(1), model.num_classes
        bad = ((labels < 0) | (labels >= limit)).any(1)
    else:
        labels, limit = data.labels, model.num_classes
        bad = (labels < 0) | (labels >= limit)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        value = int(labels[i][(labels[i] < 0) | (labels[i] >= limit)][0]) if labels.dim() > 1 else int(labels[i])
        raise DataError(f"case {data.case_ids[i]}: label {value} is outside the model's {limit} classes")


def check_model_runs(model: LoadedModel, data: LoadedData, task: Task, device: torch.device) -> None:
    """Run the model on the first case before any job: an input shape the model cannot take
    (e.g. an ONNX graph with a fixed size) or outputs of the wrong shape fail here, before
    the run directory exists."""
    x = data.images[:1].to(device)
    try:
        with torch.no_grad():
            out = model.module(x)
    except Exception as exc:
        raise DataError(
            f"the model cannot run on the data (case {data.case_ids[0]}, input of shape {tuple(x.shape)}): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    expected = (1, model.num_classes) + (tuple(x.shape[2:]) if task is Task.SEGMENTATION else ())
    if tuple(out.shape) != expected:
        raise DataError(f"the model gives outputs of shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                        f"expected {expected} ({model.num_classes} classes)")


#: Cases (the first of the data set, at most one batch) the load-time probe runs the model on.
PROBE_CASES = 8
#: Two forward passes whose outputs differ by more than this (``torch.allclose``) are non-deterministic.
DETERMINISM_RTOL, DETERMINISM_ATOL = 1e-4, 1e-5


def probe_model(model: LoadedModel, data: LoadedData, device: torch.device, batch_size: int, name: str,
                randomized: bool) -> dict[str, Any]:
    """Run the audited model twice on the first cases before any job and refuse what no
    attack can be scored on: NaN or Inf outputs and probabilities instead of logits
    (ModelRejected), weights the model changes itself or, unless the spec declares a
    randomised model, two passes that differ (ModelUnstable: the audit would be INVALID).
    Returns the findings for results.json."""
    k = min(batch_size, PROBE_CASES, len(data))
    x, cases = data.images[:k].to(device), data.case_ids[:k]
    weights = state_dict_sha256(model.module)
    try:
        with torch.no_grad():
            first, second = model.module(x).float(), model.module(x).float()
    except Exception as exc:
        raise DataError(f"{name} cannot run on a batch of the first {k} cases (input of shape {tuple(x.shape)}): "
                        f"{type(exc).__name__}: {_first_line(exc)}") from None
    if state_dict_sha256(model.module) != weights:
        raise ModelUnstable(f"{name} changed its own weights while running on the first {k} cases: the audited model "
                            "must stay fixed (look for in-place updates of parameters or buffers in forward)")
    nonfinite = [case for case, ok in zip(cases, first.flatten(1).isfinite().all(1).tolist()) if not ok]
    if nonfinite:
        raise ModelRejected(f"{name} gives non-finite outputs (NaN or Inf) for {len(nonfinite)} of the first {k} cases "
                            f"({', '.join(nonfinite)}): they cannot be scored; fix the model (a division by zero, a log "
                            "of 0, an overflow)")
    if first.shape[1] > 1 and bool(((first >= 0) & (first <= 1)).all()) and bool(((first.sum(1) - 1).abs() <= 1e-4).all()):
        raise ModelRejected(f"{name} returns probabilities (every output of the first {k} cases is in [0, 1] and sums "
                            "to 1 over the classes), not logits: attacks on probabilities see vanishing gradients and "
                            "overstate robustness. Return logits: remove the final softmax; log-probabilities are also fine")
    deterministic = torch.allclose(first, second, rtol=DETERMINISM_RTOL, atol=DETERMINISM_ATOL)
    if not deterministic and not randomized:
        raise ModelUnstable(f"{name} is non-deterministic: two forward passes on the same {k} cases differ by up to "
                            f"{float((first - second).abs().max()):.2e} (dropout left on? random transforms?). Make it "
                            "deterministic, or declare model.randomized: true in the spec (the audit then stays "
                            "INVALID until attacks average over the randomness, EOT)")
    return {"cases": k, "outputs": "logits", "finite": True, "deterministic": deterministic}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_dims(spec: Spec, host: Host, data: LoadedData) -> None:
    """Refuse components that do not handle the data's dimensionality (2D images, 3D volumes)."""
    dims = data.images.dim() - 2
    refs = [("model", spec.model.loader, "model"), ("dataset", spec.data.dataset, "data")]
    refs += [("attack", a.name, f"attacks[{i}]") for i, a in enumerate(spec.attacks)]
    refs += [("defense", d.name, f"defenses[{i}]") for i, d in enumerate(spec.defenses)]
    problems = [
        f"{where}: {kind} {name!r} does not handle {dims}D data (it supports {', '.join(f'{d}D' for d in sorted(cls.dims))})"
        for kind, name, where in refs
        if dims not in (cls := host.get(kind, name)).dims
    ]
    if problems:
        raise SpecError(problems, source="plan")


class Runner:
    def __init__(self, spec: Spec, host: Host, *, show_progress: bool = True, command: str = ""):
        self.spec = spec
        self.host = host
        self.show_progress = show_progress
        self.command = command
        self.console = Console(stderr=True)
        #: Minimal adversarials of the current minimum-norm attack, reused for every epsilon.
        self._minimal_key: tuple[str, str] | None = None
        self._minimal: dict[int, torch.Tensor] = {}
        self._minimal_generator: torch.Generator | None = None

    @property
    def model_name(self) -> str:
        """The audited model as messages name it: its loader and what it loaded."""
        return f"model {self.spec.model.loader!r} ({self.model.description})"

    # -- loading ------------------------------------------------------------------------

    def load(self) -> None:
        spec = self.spec
        if "pdf" in spec.report.formats:
            from medaudit.reports.pdf import require_chromium

            require_chromium()  # a missing browser stops the run now, not after the audit
        if spec.runtime.num_threads:
            torch.set_num_threads(spec.runtime.num_threads)
        self.device = select_device(spec.runtime.device)
        torch.manual_seed(spec.runtime.seed)
        self.data = self._component("dataset", spec.data.dataset, spec.data.params).load()
        self.model = self._component("model", spec.model.loader, spec.model.params).load(spec.task)
        check_data_fits(self.data, self.model, spec.task)
        check_dims(spec, self.host, self.data)
        check_model_access(spec, self.host, self.model)
        self.model.module.to(self.device)
        check_model_runs(self.model, self.data, spec.task, self.device)
        self.probe = probe_model(self.model, self.data, self.device, spec.runtime.batch_size, self.model_name,
                                 spec.model.randomized)
        self.weights_sha256 = state_dict_sha256(self.model.module)  # compared after the last job

        self.models = {NO_DEFENSE: self.model}
        self.context = context = AttackContext(
            data=self.data, load_dataset=self._load_dataset, device=self.device, task=spec.task,
            num_classes=self.model.num_classes, load_model=self._load_model, apply_defense=self._apply_defense,
        )
        for i, ref in enumerate(spec.defenses):
            try:
                self.models[ref.label] = self._apply_defense(ref.name, ref.params)
            except ValueError as exc:
                raise SpecError([f"defenses[{i}]: defense {ref.label!r}: {exc}"], source="plan") from None
        self._apply_speed_switches()
        self.attacks: dict[str, Attack] = {}
        for i, ref in enumerate(spec.attacks):
            self.attacks[ref.label] = attack = self._component("attack", ref.name, ref.params)
            try:
                attack.prepare(context)
            except ValueError as exc:
                raise SpecError([f"attacks[{i}]: attack {ref.label!r}: {exc}"], source="plan") from None
        self.jobs = plan_jobs(spec, self.host)
        self.fingerprints = {
            "spec_sha256": spec.digest(),
            "model_sha256": self.model.fingerprint,
            "data_sha256": self.data.fingerprint,
            **{f"defense_{label}_sha256": m.fingerprint for label, m in self.models.items()
               if m.fingerprint != self.model.fingerprint},
        }

    def _apply_speed_switches(self) -> None:
        runtime = self.spec.runtime
        if runtime.autocast == "off" and not runtime.channels_last:
            return
        if runtime.autocast == "fp16" and self.device.type != "cuda":
            raise EnvironmentProblem("runtime.autocast fp16 needs a CUDA device; use bf16 on the CPU")
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.autocast]
        for label, loaded in self.models.items():
            wrapped = SpeedWrapper(loaded.module, dtype, runtime.channels_last)
            adaptive = loaded.adaptive_module
            if adaptive is not None:
                adaptive = prepare_for_audit(SpeedWrapper(adaptive, dtype, runtime.channels_last))
            self.models[label] = dataclasses.replace(loaded, module=prepare_for_audit(wrapped), adaptive_module=adaptive)

    def _component(self, kind: str, name: str, params: dict[str, Any], error: type[Exception] = ValueError):
        """A registered component built from validated params; an unknown name raises ``error``."""
        try:
            cls = self.host.get(kind, name)
        except KeyError as exc:
            raise error(exc.args[0]) from None
        return cls(cls.Params.model_validate(params))

    def _apply_defense(self, name: str, params: dict[str, Any]) -> LoadedModel:
        """The audited model behind a defense, on the run's device (ValueError: bad config)."""
        defense = self._component("defense", name, params)
        defense.prepare(self.context)
        defended = defense.apply(self.model, self.data)
        for module in (defended.module, defended.adaptive_module, defended.detector):
            if module is not None:
                module.to(self.device)
        return defended

    def _load_model(self, loader: str, params: dict[str, Any]) -> LoadedModel:
        """Another model (e.g. an ensemble member), on the run's device."""
        loaded = self._component("model", loader, params).load(self.spec.task)
        loaded.module.to(self.device)
        return loaded

    def _load_dataset(self, name: str, params: dict[str, Any]) -> LoadedData:
        return self._component("dataset", name, params, DataError).load()

    # -- running ------------------------------------------------------------------------

    def run(self, resume_dir: Path | None = None, run_dir: Path | None = None, force: bool = False) -> Outcome:
        """Run (or with ``resume_dir``, finish) the audit; ``run_dir`` names the run directory
        instead of a new stamped one: a non-empty one is refused unless ``force``, and then its
        old contents are removed only once the model and data have loaded.

        A read-only output folder or too little free space (see :meth:`output_bytes`) stops
        the run before the run directory exists; a full disk met later is an ``OutputError``
        too, and the run directory stays resumable."""
        if run_dir is not None:
            rundir.check_run_dir(run_dir, force)
        output = Path(resume_dir or run_dir or self.spec.runtime.output_dir)
        rundir.check_writable(output)  # a read-only folder fails now, not once the model has loaded
        self.load()
        if self.data.sensitive_values:
            self._refuse_identifying_text(self._known_texts(), "start the run")
        if resume_dir is not None:
            rundir.check_resumable(Path(resume_dir), self.fingerprints, self.environment())
        rundir.check_free_space(output, self.output_bytes(resume_dir))
        self.run_dir = None
        try:
            return self._run_in_dir(resume_dir, run_dir, force)
        except OSError as exc:
            if exc.errno not in rundir.NOT_WRITABLE:
                raise
            raise rundir.output_error(exc, self.run_dir) from None

    def environment(self) -> dict[str, Any]:
        """What environment.json records: versions and hardware, plus the plugins that are
        not built in, with their versions (a resume refuses any change of these)."""
        plugins = {info.distribution or name: info.version for name, info in self.host.plugins.items() if not info.builtin}
        return {**describe_environment(self.device), "plugins": plugins}

    def output_bytes(self, resume_dir: Path | None = None) -> int:
        """A rough upper estimate of what the run writes, checked against the free space
        before the first job. Per unfinished job: its records (300 bytes a case, plus 200 per
        class for segmentation's per-class scores), its examples (``EXAMPLE_CASES`` slices:
        two float32 images with all channels and three int64 label maps), its features
        (classification: ``FEATURE_CASES`` cases of up to 2048 float16 values) and 500 kB of
        figures (PNG files and their copies in report.html). Plus, for a new run, the trained
        defenses' checkpoints, and 10 MB for results.json, report.html and junit.xml."""
        dense = self.spec.task is Task.SEGMENTATION
        n, shape = len(self.data), self.data.images.shape
        records = n * (300 + (200 * self.model.num_classes if dense else 0))
        examples = EXAMPLE_CASES * shape[-2] * shape[-1] * (8 * shape[1] + 24)
        features = 0 if dense else min(n, FEATURE_CASES) * 2048 * 2
        todo = [job for job in self.jobs if resume_dir is None or not is_done(Path(resume_dir), job.id)]
        checkpoints = 0 if resume_dir is not None else sum(
            Path(m.source["trained_checkpoint"]).stat().st_size for m in self.models.values() if "trained_checkpoint" in m.source
        )
        return len(todo) * (records + examples + features + 500_000) + checkpoints + 10_000_000

    def _run_in_dir(self, resume_dir: Path | None, run_dir: Path | None, force: bool) -> Outcome:
        """Create (or reopen) the run directory, run the unfinished jobs, write the results."""
        if resume_dir is not None:
            run_dir = Path(resume_dir)
        else:
            run_dir = (rundir.claim_run_dir(run_dir, force) if run_dir is not None
                       else rundir.new_run_dir(self.spec.runtime.output_dir, self.spec.audit.name))
            for label, loaded in self.models.items():  # trained defenses: their weights belong to the record
                if "trained_checkpoint" in loaded.source:
                    with open(loaded.source["trained_checkpoint"], "rb") as src, \
                            rundir.atomic_file(run_dir / "defenses" / f"{label}.pt", "wb") as dst:
                        shutil.copyfileobj(src, dst)
            rundir.init_run_dir(  # last: the fingerprints make the folder resumable
                run_dir, self.spec.model_dump(mode="json"), self.fingerprints, self.environment()
            )
        self.run_dir = run_dir
        rundir.log_event(run_dir, event="resume" if resume_dir else "start", command=self.command)
        self.host.pm.hook.audit_started(spec=self.spec, run_dir=run_dir, jobs=self.jobs)

        todo = [job for job in self.jobs if not is_done(run_dir, job.id)]
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=not self.show_progress, transient=False,
        )
        with progress:
            overall = progress.add_task("jobs", total=len(self.jobs), completed=len(self.jobs) - len(todo))
            for job in todo:
                try:
                    summary = self.run_job(job, progress)
                    progress.advance(overall)
                    self.host.pm.hook.job_finished(job=job, summary=summary, run_dir=run_dir)
                except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP through the CLI's handler
                    done = sum(is_done(run_dir, j.id) for j in self.jobs)
                    name = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
                    rundir.log_event(run_dir, event="interrupted", signal=name, finished_jobs=done)
                    raise Interrupted(
                        f"interrupted by {name}: {done} of {len(self.jobs)} jobs finished in {run_dir}; "
                        f"resume with: medaudit run SPEC --resume {run_dir}"
                    ) from None

        results = self.build_results()
        outputs = {"results.json": rundir.json_text(results)}
        if "html" in self.spec.report.formats or "pdf" in self.spec.report.formats:
            from medaudit.reports.html import render_report

            outputs["report.html"] = render_report(results, self.host, run_dir, outputs["results.json"])
        if "junit" in self.spec.report.formats:
            from medaudit.reports.junit import render_junit

            outputs["junit.xml"] = render_junit(results)
        if self.data.sensitive_values:
            self._refuse_identifying_text(self._final_texts(outputs, results), "write results.json and the reports")
        for name, text in outputs.items():
            rundir.write_atomic(run_dir / name, text)
        if "pdf" in self.spec.report.formats:
            from medaudit.reports.pdf import write_pdf

            try:
                write_pdf(run_dir)
            except MedauditError as exc:  # the verdict stands; the PDF can be redone with `medaudit report --pdf`
                self.console.print(printable(f"warning: {exc}; retry with: medaudit report {run_dir} --pdf"),
                                   style="yellow", markup=False, highlight=False)
                rundir.log_event(run_dir, event="pdf_failed", error=str(exc))
        rundir.log_event(run_dir, event="finished", verdict=results["acceptance"]["verdict"])
        self.host.pm.hook.audit_finished(results=results, run_dir=run_dir)
        return Outcome(run_dir, results)

    def gradient_health(self, cases: int = 32) -> dict[str, dict]:
        """Per model an attack differentiates (each defense's naive and adaptive views): how
        many of the first ``cases`` inputs get an all-zero or non-finite loss gradient."""
        n = min(cases, self.spec.runtime.batch_size, len(self.data))
        x = self.data.images[:n].to(self.device)
        y = (self.data.masks if self.spec.task is Task.SEGMENTATION else self.data.labels)[:n].to(self.device)
        health = {}
        for label, loaded in self.models.items():
            if Access.GRADIENTS not in loaded.access:
                continue
            views = {label: loaded.module}
            if loaded.adaptive_module is not None:
                views[f"{label}{ADAPTIVE_SUFFIX}"] = loaded.adaptive_module
            for name, module in views.items():
                with torch.enable_grad():
                    _, grad = input_gradient(module, x, y)
                flat = grad.flatten(1)
                health[name] = {"n": n, "zero": int((flat == 0).all(1).sum()), "nonfinite": int((~flat.isfinite()).any(1).sum())}
        return health

    def _known_texts(self) -> dict[str, str]:
        """The texts of the outputs that are known once the data has loaded and will certainly
        be written: checked before any job runs, so a conflict costs no compute."""
        data = self.data
        return {
            "spec.resolved.yaml": yaml.safe_dump(self.spec.model_dump(mode="json")),
            "command line": self.command or "",
            "class names": "\n".join([*data.class_names, *(data.mask_class_names or [])]),
            "data description": data.description,
        }

    def _refuse_identifying_text(self, texts: dict[str, str], refused: str) -> None:
        """Fail closed if a text about to be written holds a value the data set flagged as
        identifying (DICOM header values, file names). The message names the texts, a count
        and where the values came from (a case's file name, a DICOM attribute), never the values."""
        sensitive = self.data.sensitive_values
        leaks = {name: leaked_values(text, sensitive) for name, text in texts.items()}
        where = ", ".join(f"{name} ({len(v)} value{'s' if len(v) > 1 else ''})" for name, v in leaks.items() if v)
        if where:
            sources = sorted({sensitive[value] for values in leaks.values() for value in values})
            shown = "; ".join(sources[:MAX_SOURCES_SHOWN])
            more = len(sources) - MAX_SOURCES_SHOWN
            raise PrivacyError(
                f"refused to {refused}: {where} would hold values read from the input: {shown}"
                + (f"; and {more} more" if more > 0 else "")
                + ". Remove the identifying text (from the spec, the command line, a plugin's output or the class "
                "names) or rename the files, and run again."
            )

    def _final_texts(self, outputs: dict[str, str], results: dict) -> dict[str, str]:
        """The outputs as a reader would see them, plus every text file already in the run dir."""
        texts = dict(outputs)
        texts["results.json"] = json.dumps(results, ensure_ascii=False, default=str)  # no \u escapes
        if "report.html" in texts:  # figures are PNG bytes in base64, not text
            texts["report.html"] = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", texts["report.html"])
        for path in sorted(self.run_dir.rglob("*")):
            if path.suffix in {".json", ".jsonl", ".yaml", ".xml", ".html"} and path.name not in outputs:
                texts[str(path.relative_to(self.run_dir))] = path.read_text(encoding="utf-8")
        return texts

    def run_job(self, job: Job, progress: Progress) -> dict[str, Any]:
        started = time.perf_counter()
        model = self.models[job.defense].module
        # What the attack differentiates: the defended model, or its adaptive view (BPDA/EOT);
        # predictions are always those of the defended model itself.
        self._attacked = self.models[job.defense].adaptive_module if job.adaptive else model
        n, bs = len(self.data), self.spec.runtime.batch_size
        dense = self.spec.task is Task.SEGMENTATION
        attack: Attack | None = None
        clean: list[dict] = []
        if not job.is_clean:
            attack = self.attacks[job.spec_attack]
            clean_job = next(j for j in self.jobs if j.defense == job.defense and j.is_clean)
            clean = read_records(self.run_dir, clean_job.id)
        generator = torch.Generator(device=self.device).manual_seed(job_seed(self.spec.runtime.seed, job.id))
        torch.manual_seed(job_seed(self.spec.runtime.seed, job.id))

        task = progress.add_task(f"  {job.title()}", total=-(-n // bs))
        writer = RecordWriter(self.run_dir, job.id)
        # Penultimate features of the first cases, read during the forward passes that
        # score the (adversarial) images, for the report's embedding figure.
        self._tap = None if dense else FeatureTap(model, FEATURE_CASES)
        try:
            for start in range(0, n, bs):
                x = self.data.images[start : start + bs].to(self.device)
                if dense:
                    y = self.data.masks[start : start + bs].to(self.device)
                    rows = self._dense_batch(model, attack, job, x, y, clean[start : start + bs], generator, start)
                elif attack is None:
                    y = self.data.labels[start : start + bs].to(self.device)
                    rows = self._clean_batch(model, job, x, y, start)
                else:
                    y = self.data.labels[start : start + bs].to(self.device)
                    rows = self._attack_batch(model, attack, job, x, y, clean[start : start + bs], generator, start)
                for row, case in zip(rows, self.data.case_ids[start : start + bs]):
                    row["case"] = case
                writer.write(rows)
                progress.advance(task)
            if self._tap is not None and (captured := self._tap.result()) is not None:
                save_features(self.run_dir, job.id, *captured, self.data.labels[captured[0]])
        except BaseException as exc:
            writer.discard()
            progress.remove_task(task)
            if isinstance(exc, Exception) and (frame := self._model_frame(exc)) is not None:
                self._model_raised(job, exc, frame, list(self.data.case_ids[start : start + bs]))
            raise
        writer.commit()
        progress.remove_task(task)
        seconds = time.perf_counter() - started
        rundir.log_event(self.run_dir, event="job", job=job.id, seconds=round(seconds, 3))
        return {"job": job.id, "seconds": seconds}

    def _model_frame(self, exc: Exception) -> str | None:
        """Where the audited model's own code raised ``exc`` (``file:LINE in function``, the
        innermost frame outside torch and medaudit), or None when no frame outside them is
        the model's (then it is a bug in medaudit or a plugin)."""
        own = {id(m) for m in self.model.module.modules()}
        outside = [(f, line) for f, line in traceback.walk_tb(exc.__traceback__)
                   if not f.f_code.co_filename.startswith(LIBRARY_DIRS)]
        if not any(id(f.f_locals.get("self")) in own for f, _ in outside):
            return None
        frame, line = outside[-1]
        return f"{os.path.basename(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}"

    def _model_raised(self, job: Job, exc: Exception, frame: str, cases: list[str]) -> None:
        """Log the batch's cases and stop with one line that names the model as the source."""
        rundir.log_event(self.run_dir, event="model_error", job=job.id, cases=cases, error=type(exc).__name__, frame=frame)
        shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        raise ModelRaised(
            f"{self.model_name} raised {type(exc).__name__}: {_first_line(exc)} (at {frame}) in job {job.title()!r}, "
            f"on the batch of cases {shown}; fix the model, then resume with: medaudit run SPEC --resume {self.run_dir}"
        ) from None

    def _dense_batch(self, model, attack: Attack | None, job: Job, x, y, clean: list[dict], generator, start: int) -> list[dict]:
        """Segmentation: every case is attacked (there is no 'already wrong' for a label map);
        each record holds per-class overlap and distance scores, clean and under attack."""
        num_classes, spacing = self.model.num_classes, self.data.spacing
        if self.data.case_spacings is not None:  # cases of different resolutions: each its own
            spacing = self.data.case_spacings[start : start + len(x)]
        x_adv, target = x, None
        if attack is not None:
            with torch.enable_grad():
                x_adv = attack.perturb(self._attacked, x, y, eps=job.epsilon, norm=self.spec.threat_model.norm, generator=generator)
            target = attack.target_masks(y)
        with torch.inference_mode():
            logits = model(x_adv)
        pred = logits.argmax(1)
        scores = dense_scores(pred, y, num_classes, spacing)
        scores["finite"] = _finite(logits).tolist()  # clean_finite and adv_finite of each record
        delta = (x_adv - x).float()
        sizes = {
            "linf": _norm_of(delta, Norm.LINF).tolist(),
            "l2": _norm_of(delta, Norm.L2).tolist(),
            "in_range": ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1).tolist(),
        }
        rows = []
        for i in range(len(y)):
            adv = {f"adv_{k}": v[i] for k, v in scores.items()}
            base = {f"clean_{k}": v[i] for k, v in scores.items()} if attack is None else {
                k: v for k, v in clean[i].items() if k.startswith("clean_")
            }
            rows.append({"attacked": attack is not None, **{k: v[i] for k, v in sizes.items()}, **base, **adv})
        if target is not None:
            target_scores = dense_scores(pred, target, num_classes, spacing, distances=False)
            # The pixels the attacker wants changed, and the share of them it changed.
            wanted = (target != y).flatten(1)
            hit = ((pred == target).flatten(1) & wanted).sum(1) / wanted.sum(1).clamp_min(1)
            for row, dice, acc, n_wanted, h in zip(
                rows, target_scores["dice"], target_scores["pixel_accuracy"], wanted.sum(1).tolist(), hit.tolist()
            ):
                row.update(target_dice=dice, target_pixel_accuracy=acc, target_changed=n_wanted,
                           target_hit=round(h, 6) if n_wanted else None)
        if self._keeps_examples(start):
            save_examples(self.run_dir, job.id, x, x_adv, y, pred, target)
        return rows

    def _keeps_examples(self, start: int) -> bool:
        """The first batch's cases are kept for the report's figures, unless their pixels may
        carry burned-in identifying text."""
        return start == 0 and not self.data.pixels_may_identify

    def _detector_scores(self, job: Job, x: torch.Tensor) -> tuple[list[float], list[bool]] | None:
        """A detector defense's scores of ``x`` and whether it rejects each (None: no detector)."""
        scorer = self.models[job.defense].detector
        if scorer is None:
            return None
        with torch.no_grad():
            scores = scorer(x).float()
        return scores.tolist(), (scores > scorer.threshold).tolist()

    def _clean_batch(self, model, job: Job, x, y, start: int) -> list[dict]:
        with torch.inference_mode(), self._tap.capture(torch.arange(start, start + len(y), device=y.device)):
            logits = model(x)
        pred = logits.argmax(1)
        if self._keeps_examples(start):
            save_examples(self.run_dir, job.id, x, x, y, pred, clean_pred=pred)
        rows = [
            {"label": label, "clean_pred": p, "adv_pred": p, "attacked": False, "linf": 0.0, "l2": 0.0, "in_range": True,
             "clean_finite": f, "adv_finite": f}
            for label, p, f in zip(y.tolist(), pred.tolist(), _finite(logits).tolist())
        ]
        if (detected := self._detector_scores(job, x)) is not None:
            for row, score, rejected in zip(rows, *detected):
                row.update(clean_score=score, clean_rejected=rejected)
        return rows

    def _attack_batch(self, model, attack: Attack, job: Job, x, y, clean: list[dict], generator, start: int) -> list[dict]:
        """Attack the samples the model gets right (and a detector lets through); the others
        are already errors."""
        norm = self.spec.threat_model.norm
        clean_pred = torch.tensor([r["clean_pred"] for r in clean], device=self.device)
        rejected = torch.tensor([r.get("clean_rejected", False) for r in clean], device=self.device)
        clean_finite = torch.tensor([r.get("clean_finite", True) for r in clean], device=self.device)
        correct = (clean_pred == y) & ~rejected & clean_finite
        adv_pred = clean_pred.clone()
        adv_finite = clean_finite.clone()
        linf = torch.zeros(len(y), device=self.device)
        l2 = torch.zeros(len(y), device=self.device)
        in_range = torch.ones(len(y), dtype=torch.bool, device=self.device)
        min_norm = torch.full((len(y),), float("nan"), device=self.device)
        idx = correct.nonzero().flatten()
        adv_scores: dict[int, tuple[float, bool]] = {}
        if len(idx):
            x_att, y_att = x[idx], y[idx]
            bind_labels(self._attacked, x_att, y_att)  # a detector's joint view needs the labels
            if isinstance(attack, MinimumNormAttack):
                x_min = self._minimal_adversarial(self._attacked, attack, job, x_att, y_att, start)
                x_adv = project(x_min, x_att, job.epsilon, norm) if job.epsilon > 0 else x_att.clone()
                with torch.inference_mode():
                    found = model(x_min).argmax(1) != y_att
                size = _norm_of(x_min - x_att, norm)
                min_norm[idx] = torch.where(found, size, torch.full_like(size, float("nan")))
            else:
                with torch.enable_grad():
                    x_adv = attack.perturb(self._attacked, x_att, y_att, eps=job.epsilon, norm=norm, generator=generator)
            bind_labels(self._attacked, None, None)
            with torch.inference_mode(), self._tap.capture(start + idx):
                logits = model(x_adv)
            adv_pred[idx], adv_finite[idx] = logits.argmax(1), _finite(logits)
            if (detected := self._detector_scores(job, x_adv)) is not None:
                adv_scores = dict(zip(idx.tolist(), zip(*detected)))
            delta = (x_adv - x_att).float()
            linf[idx] = _norm_of(delta, Norm.LINF)
            l2[idx] = _norm_of(delta, Norm.L2)
            in_range[idx] = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
        if self._keeps_examples(start):
            k = min(EXAMPLE_CASES, len(y))
            shown = x[:k].clone()  # cases the model already got wrong are not attacked
            if len(idx):
                first = idx < k
                shown[idx[first]] = x_adv[first].to(shown.dtype)
            save_examples(self.run_dir, job.id, x[:k], shown, y[:k], adv_pred[:k], clean_pred=clean_pred[:k])
        rows = []
        for a, b, c, d, e, f, g, h, cf, af in zip(
            y.tolist(), clean_pred.tolist(), adv_pred.tolist(), correct.tolist(), linf.tolist(), l2.tolist(),
            in_range.tolist(), min_norm.tolist(), clean_finite.tolist(), adv_finite.tolist(),
        ):
            row = {"label": a, "clean_pred": b, "adv_pred": c, "attacked": d, "linf": e, "l2": f, "in_range": g,
                   "clean_finite": cf, "adv_finite": af}
            if isinstance(attack, MinimumNormAttack):
                row["min_norm"] = None if h != h else h  # NaN: attacked but no adversarial found
            rows.append(row)
        if self.models[job.defense].detector is not None:
            for i, (row, before) in enumerate(zip(rows, clean)):
                score, flagged = adv_scores.get(i, (None, before["clean_rejected"]))
                row.update(clean_score=before["clean_score"], clean_rejected=before["clean_rejected"],
                           adv_score=score, adv_rejected=flagged)
        return rows

    def _minimal_adversarial(self, model, attack: MinimumNormAttack, job: Job, x, y, start: int) -> torch.Tensor:
        """Compute once per (defense, attack) and batch; every epsilon job reuses it.

        The generator is seeded from the (defense, attack) pair, not the job, so the
        result is the same whichever epsilon job computes it (also after a resume).
        """
        key = (job.defense, job.attack)
        if key != self._minimal_key:
            self._minimal_key, self._minimal = key, {}
            seed = job_seed(self.spec.runtime.seed, f"{job.defense}.{job.attack}.minimal")
            self._minimal_generator = torch.Generator(device=self.device).manual_seed(seed)
        if start not in self._minimal:
            with torch.enable_grad():
                self._minimal[start] = attack.minimal(
                    model, x, y, norm=self.spec.threat_model.norm, generator=self._minimal_generator
                ).detach()
        return self._minimal[start]

    # -- results ------------------------------------------------------------------------

    def build_results(self) -> dict[str, Any]:
        spec, host = self.spec, self.host
        data = self.data
        dense = spec.task is Task.SEGMENTATION
        # Before anything else runs the model again: did the jobs leave its weights as they found them?
        self.probe["weights_unchanged"] = state_dict_sha256(self.model.module) == self.weights_sha256
        computed = compute_results(spec, host, self.jobs, self.run_dir, data.mask_class_names if dense else data.class_names)
        checks = validity_checks(spec, host, self.jobs, computed["records"], computed["rows"], self.gradient_health(),
                                 {**self.probe, "randomized": spec.model.randomized})
        accepted = acceptance(spec, host, computed, checks)
        timeline = rundir.read_timeline(self.run_dir)
        seconds = {e["job"]: e["seconds"] for e in timeline if e.get("event") == "job"}
        if dense:
            figures = segmentation_figures(
                self.run_dir, computed["rows"], self.jobs, spec.threat_model.epsilons, data.mask_class_names or [],
                self.model.num_classes,
            )
        else:
            figures = classification_figures(
                self.run_dir, computed["rows"], self.jobs, spec.threat_model.epsilons, data.class_names, self.models[NO_DEFENSE]
            )
        return {
            "schema_version": SCHEMA_VERSION,
            "medaudit_version": medaudit.__version__,
            "audit": {
                "name": spec.audit.name,
                "title": spec.title(),
                "description": spec.audit.description,
                "task": spec.task.value,
                "started": next((e["at"] for e in timeline if e["event"] == "start"), None),
                "finished": rundir.utc_now(),
            },
            "intended_use": spec.intended_use.model_dump(mode="json"),
            "verdict": accepted["verdict"],
            "exit_code": accepted["exit_code"],
            "fingerprints": self.fingerprints,
            "model": {
                "loader": spec.model.loader,
                **self._provenance("model", spec.model.loader),
                "description": self.model.description,
                "num_classes": self.model.num_classes,
                "in_channels": self.model.in_channels,
                "access": sorted(a.value for a in self.model.access),
                "sha256": self.model.fingerprint,
                "probe": self.probe,
            },

            "data": {
                "dataset": spec.data.dataset,
                **self._provenance("dataset", spec.data.dataset),
                "description": data.description,
                "n": len(data),
                "image_shape": list(data.images.shape[1:]),
                "intensity": intensity_stats(data.images),
                **(self._mask_summary() if dense else {
                    "class_names": data.class_names,
                    "class_counts": {
                        data.class_names[k] if k < len(data.class_names) else str(k): v
                        for k, v in sorted(Counter(data.labels.tolist()).items())
                    },
                }),
                "sha256": data.fingerprint,
                "intensity_window": list(data.intensity_window) if data.intensity_window else None,
                "intensity_unit": data.intensity_unit,
            },
            "threat_model": {
                "norm": spec.threat_model.norm.value,
                "epsilons": spec.threat_model.epsilons,
                "epsilon_labels": [epsilon_label(e, spec.threat_model.norm) for e in spec.threat_model.epsilons],
                "epsilons_physical": physical_budgets(spec.threat_model.epsilons, data.intensity_window),
            },
            "attacks": [
                {"label": a.label, "name": a.name, "params": a.params, **self._provenance("attack", a.name)}
                for a in spec.attacks
            ],
            "defenses": [
                {"label": d.label, "name": d.name, "params": d.params, "summary": host.get("defense", d.name).summary(),
                 "adaptive": host.get("defense", d.name).adaptive, "sha256": self.models[d.label].fingerprint,
                 "training": self.models[d.label].source.get("training"), **self._provenance("defense", d.name)}
                for d in spec.defenses
            ],
            "metrics": [
                {"name": m, "summary": host.get("metric", m).summary(), "better": host.get("metric", m).better,
                 "clean": host.get("metric", m).clean}
                for m in spec.metrics
            ],
            "clean": computed["clean"],
            "rows": computed["rows"],
            "curves": computed["curves"],
            "validity": checks,
            "acceptance": accepted,
            "figures": figures,
            "conventions": CONVENTIONS[spec.task] + (
                [DETECTOR_CONVENTION] if any(m.detector is not None for m in self.models.values()) else []
            ),
            "jobs": [
                {"id": j.id, "title": j.title(), "defense": j.defense, "attack": j.attack, "epsilon": j.epsilon,
                 "seconds": seconds.get(j.id)}
                for j in self.jobs
            ],
            "timeline": timeline,
            "environment": json.loads((self.run_dir / "environment.json").read_text(encoding="utf-8")),
            "seed": spec.runtime.seed,
            "spec": spec.model_dump(mode="json"),
        }

    def _mask_summary(self) -> dict[str, Any]:
        """Class names and the share of cases in which each class occurs (segmentation)."""
        data, k = self.data, self.model.num_classes
        names = data.mask_class_names if data.mask_class_names and len(data.mask_class_names) == k else [f"class {i}" for i in range(k)]
        present = torch.stack([(data.masks == c).flatten(1).any(1) for c in range(k)], 1).sum(0).tolist()
        return {
            "class_names": names,
            "class_counts": {f"cases with {n}": v for n, v in zip(names, present)},
            "spacing": list(data.spacing) if data.spacing else None,
        }

    def _provenance(self, kind: str, name: str) -> dict[str, Any]:
        cls = self.host.get(kind, name)
        info = self.host.plugin_of(cls)
        out = {"plugin": cls.plugin, "distribution": info.distribution if info else None, "version": info.version if info else None}
        if kind == "attack":
            c = component_info(cls)
            out.update(summary=c["summary"], norms=c["norms"], needs=c["needs"], targeted=c["targeted"])
        return out


def intensity_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per channel: min, max, mean and standard deviation of the pixel-space images."""
    flat = images.transpose(0, 1).flatten(1).float()
    return {name: [round(v, 6) for v in values.tolist()] for name, values in (
        ("min", flat.amin(1)), ("max", flat.amax(1)), ("mean", flat.mean(1)), ("std", flat.std(1)),
    )}


def physical_budgets(epsilons: list[float], window: tuple[float, float] | None) -> list[float] | None:
    """Each budget in the data's own intensity units: eps times the window's width (for an
    L2 budget this is the norm over all pixels, in those units)."""
    if window is None:
        return None
    width = window[1] - window[0]
    return [round(e * width, 6) for e in epsilons]


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Per case: are all its outputs finite? A NaN or Inf output is no prediction (its argmax is arbitrary)."""
    return logits.flatten(1).isfinite().all(1)


def _norm_of(delta: torch.Tensor, norm: Norm) -> torch.Tensor:

    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)
