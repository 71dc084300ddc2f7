"""Running a validated spec: load once, run every unfinished job, compute the results.

Model and data are loaded and checked before the run directory is created, so bad input
leaves nothing behind. The runner renders nothing: the command line hands the results to
:mod:`medaudit.reports.write`, which writes results.json and the reports.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import medaudit
from medaudit.audits import history, rundir, strategy
from medaudit.audits.figures import certified_figure, convergence_figure, task_figures
from medaudit.audits.plan import check_model_access, plan_jobs
from medaudit.audits.records import (
    EXAMPLE_CASES, FEATURE_CASES, RecordWriter, is_done, read_records, save_examples, save_features,
)
from medaudit.audits.execute import Session, Sink, execute, model_frame, view_modules
from medaudit.audits.aggregation import corruption_errors
from medaudit.audits.certification import certify_defenses
from medaudit.audits.soundness import convergence, model_behaviour, noise_baseline
from medaudit.audits.results_schema import SCHEMA_VERSION
from medaudit.audits.results import acceptance, compute_metric, compute_results, validity_checks
from medaudit.core.components import NO_SCREEN, Access, Facet, LoadedData, LoadedModel, Task, component_info
from medaudit.core.data import check_data_fits, class_summary, summarise
from medaudit.core.environment import GpuMonitor, configure_torch, describe_environment, select_device
from medaudit.core.errors import (
    DataError, ExitCode, MedauditError, ModelRaised, ModelRejected, ModelUnstable, OutOfMemory, SpecError, Terminated,
)
from medaudit.core.host import Host
from medaudit.core.jobs import Job, Records, view_label
from medaudit.core.models import state_dict_sha256
from medaudit.core.perturbation import input_gradient
from medaudit.core.tasks import protocol
from medaudit.core.privacy import refuse_leaks
from medaudit.core.probes import FeatureTap
from medaudit.core.spec import NO_DEFENSE, WORST_CASE, Spec, epsilon_label

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


def check_model_runs(model: LoadedModel, data: LoadedData, task: Task, device: torch.device) -> None:
    """Run the model on the first case before any job: an input shape the model cannot take
    (e.g. an ONNX graph with a fixed size) or outputs of the wrong shape fail here, before
    the run directory exists."""
    _, x, _ = next(data.batches(0, 1, 1, task=task))
    x = x.to(device)
    try:
        with torch.no_grad():
            out = model.module(x)
    except Exception as exc:
        raise DataError(
            f"the model cannot run on the data (case {data.case_ids[0]}, input of shape {tuple(x.shape)}): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    expected = protocol(task).output_shape(model, x)
    if tuple(out.shape) != expected:
        raise DataError(f"the model gives outputs of shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                        f"expected {expected} ({model.num_classes} classes)")


#: Cases (the first of the data set, at most one batch) the load-time probe runs the model on.
PROBE_CASES = 8
#: Two forward passes whose outputs differ by more than this (``torch.allclose``) are non-deterministic.
DETERMINISM_RTOL, DETERMINISM_ATOL = 1e-4, 1e-5


def probe_model(model: LoadedModel, data: LoadedData, task: Task, device: torch.device, batch_size: int, name: str,
                randomized: bool) -> dict[str, Any]:
    """Run the audited model twice on the first cases before any job and refuse what no
    attack can be scored on: NaN or Inf outputs and probabilities instead of logits
    (ModelRejected), weights the model changes itself or, unless the spec declares a
    randomised model, two passes that differ (ModelUnstable: the audit would be INVALID).
    Returns the findings for results.json."""
    k = min(batch_size, PROBE_CASES, len(data))
    _, x, _ = next(data.batches(0, k, k, task=task))
    x, cases = x.to(device), data.case_ids[:k]
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
                            "deterministic, or declare model.randomized: true in the spec and attack it with EOT "
                            "(autoattack with version: rand, or eot_samples), or the audit is INVALID")
    return {"cases": k, "outputs": "logits", "finite": True, "deterministic": deterministic}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_dims(spec: Spec, host: Host, data: LoadedData) -> None:
    """Refuse components that do not handle the data's dimensionality (2D images, 3D volumes)."""
    dims = len(data.image_shape) - 1
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


def check_criterion_scopes(spec: Spec, class_names: list[str] | None, covariates: list[dict] | None) -> None:
    """Refuse a criterion whose ``class`` or ``subgroup`` the data does not have, before anything runs."""
    problems = []
    for i, c in enumerate(spec.acceptance.criteria):
        if c.class_name is not None and c.class_name not in (class_names or []):
            problems.append(f"acceptance.criteria[{i}].class: the data has no class {c.class_name!r} (its classes: "
                            f"{', '.join(class_names or []) or 'unnamed'})")
        if c.subgroup is not None:
            found = {case.get(c.subgroup.covariate) for case in covariates or [] if c.subgroup.covariate in case}
            if not found:
                problems.append(f"acceptance.criteria[{i}].subgroup: the data gives no covariate "
                                f"{c.subgroup.covariate!r}")
            elif c.subgroup.value not in found:
                shown = ", ".join(sorted(repr(v) for v in found))
                problems.append(f"acceptance.criteria[{i}].subgroup: no case has {c.subgroup.covariate} = "
                                f"{c.subgroup.value!r} (its values: {shown})")
    if problems:
        raise SpecError(problems, source="plan")


class Runner:
    def __init__(self, spec: Spec, host: Host, *, show_progress: bool = True, command: str = ""):
        self.spec = spec
        self.host = host
        self.show_progress = show_progress
        self.command = command
        self.console = Console(stderr=True)
        self.protocol = protocol(spec.task)
        #: The batch size jobs run at: the spec's, halved after each out-of-memory error.
        self.batch_size = spec.runtime.batch_size
        #: The Ray workers (``runtime.executor: ray``) while the run lasts; None runs jobs here.
        self.pool = None

    @property
    def model_name(self) -> str:
        """The audited model as messages name it: its loader and what it loaded."""
        return f"model {self.spec.model.loader!r} ({self.model.description})"

    # -- loading ------------------------------------------------------------------------

    def load(self) -> None:
        spec = self.spec
        configure_torch(spec.runtime)  # before anything touches CUDA
        self.device = select_device(spec.runtime.device)
        self.session = Session.load(spec, self.host, self.device, checks=self._check_loaded)
        self.models, self.attacks = self.session.models, self.session.attacks
        self.jobs = plan_jobs(spec, self.host)
        #: The jobs in the order the strategy runs them (:mod:`medaudit.audits.strategy`).
        self.order = strategy.run_order(spec, self.jobs, self.attacks, self.model.num_classes)
        #: Jobs the verdict strategy left out, with the reason, and where and why it stopped.
        self.skipped: dict[str, str] = {}
        self.stopped: dict[str, Any] | None = None
        self.fingerprints = {
            "spec_sha256": spec.digest(),
            "model_sha256": self.model.fingerprint,
            "data_sha256": self.data.fingerprint,
            **{f"defense_{label}_sha256": m.fingerprint for label, m in self.models.items()
               if m.fingerprint != self.model.fingerprint},
        }

    def _check_loaded(self, model: LoadedModel, data: LoadedData) -> None:
        """Refuse data and a model that do not fit, before any defense is fitted."""
        spec = self.spec
        self.model, self.data = model, data
        if len(data) == 0:
            raise NothingToEvaluate("the dataset is empty: nothing to evaluate")
        # One pass over the data: the checks below and the results' data section.
        self.data_summary = summarise(data, spec.task, model.num_classes, spec.runtime.batch_size)
        check_data_fits(data, model, spec.task, self.data_summary)
        check_dims(spec, self.host, data)
        check_criterion_scopes(spec, self.protocol.class_names(data), data.covariates)
        check_model_access(spec, self.host, model)
        check_model_runs(model, data, spec.task, self.device)
        self.probe = probe_model(model, data, spec.task, self.device, spec.runtime.batch_size, self.model_name, spec.model.randomized)
        self.weights_sha256 = state_dict_sha256(model.module)  # compared after the last job

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
            refuse_leaks(self._known_texts(), self.data.sensitive_values, "start the run")
        if resume_dir is not None:
            rundir.check_resumable(Path(resume_dir), self.fingerprints, self.environment())
        rundir.check_free_space(output, self.output_bytes(resume_dir))
        self.run_dir = None
        try:
            if self.spec.runtime.executor == "ray":  # workers start (and versions are checked) before the run directory exists
                from medaudit.audits.ray_executor import RayPool

                self.pool = RayPool.start(self)
            return self._run_in_dir(resume_dir, run_dir, force)
        except OSError as exc:
            if exc.errno not in rundir.NOT_WRITABLE:
                raise
            raise rundir.output_error(exc, self.run_dir) from None
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None

    def environment(self) -> dict[str, Any]:
        """What environment.json records: versions and hardware, plus the plugins that are
        not built in, with their versions (a resume refuses any change of these)."""
        plugins = {info.distribution or name: info.version for name, info in self.host.plugins.items() if not info.builtin}
        executor = {"executor": self.spec.runtime.executor}
        if self.pool is not None:
            executor["cluster"] = self.pool.describe()
        return {**describe_environment(self.device), "plugins": plugins, **executor}

    def output_bytes(self, resume_dir: Path | None = None) -> int:
        """A rough upper estimate of what the run writes, checked against the free space
        before the first job. Per unfinished job: its records (300 bytes a case, plus 200 per
        class for segmentation's per-class scores), its examples (``EXAMPLE_CASES`` slices:
        two float32 images with all channels and three int64 label maps), its features
        (classification: ``FEATURE_CASES`` cases of up to 2048 float16 values) and 500 kB of
        figures (PNG files and their copies in report.html). Plus, for a new run, the trained
        defenses' checkpoints, and 10 MB for results.json, report.html and junit.xml."""
        n, shape = len(self.data), self.data.image_shape
        records = n * (300 + self.protocol.class_record_bytes * self.model.num_classes)
        examples = EXAMPLE_CASES * shape[-2] * shape[-1] * (8 * shape[0] + 24)
        features = min(n, FEATURE_CASES) * 2048 * 2 if self.protocol.keeps_features else 0
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
            self.session.save_states(run_dir)  # what defenses and attacks fitted, for other processes
            rundir.init_run_dir(  # last: the fingerprints make the folder resumable
                run_dir, self.spec.model_dump(mode="json"), self.fingerprints, self.environment()
            )
        self.run_dir = run_dir
        # A resumed run keeps the batch size an earlier out-of-memory error left it with.
        self.batch_size = min([self.spec.runtime.batch_size] + [e["to"] for e in rundir.read_timeline(run_dir)
                                                                if e.get("event") == "batch_size"])
        rundir.log_event(run_dir, event="resume" if resume_dir else "start", command=self.command)
        self.host.pm.hook.audit_started(spec=self.spec, run_dir=run_dir, jobs=self.jobs)

        todo = [job for job in self.order if not is_done(run_dir, job.id)]
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=not self.show_progress, transient=False,
        )
        with progress:
            overall = progress.add_task("jobs", total=len(self.jobs), completed=len(self.jobs) - len(todo))
            try:
                if self.spec.runtime.strategy == strategy.VERDICT:
                    self._run_verdict(progress, overall)
                elif self.pool is not None:  # shards on Ray workers; the hooks fire here as jobs are committed
                    self.pool.run(todo, progress, overall)
                else:
                    for job in todo:
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

        return Outcome(run_dir, self.build_results())

    def _run_verdict(self, progress: Progress, overall) -> None:
        """``runtime.strategy: verdict`` (:mod:`medaudit.audits.strategy`): the jobs in the
        strategy's order, each attack job on the cases still robust, until the blocking
        criteria are decided; the jobs left are skipped, and a resume decides the same."""
        spec, run_dir = self.spec, self.run_dir
        cached: dict[str, Records] = {}
        records = strategy.read_cached(run_dir, cached)
        judge = strategy.Verdict(spec, self.host, self.jobs)
        exact = strategy.exact_jobs(spec, self.host, self.jobs)
        carries = self.protocol.carries
        done = {job.id for job in self.order if is_done(run_dir, job.id)}
        for i, job in enumerate(self.order):
            decision = judge.decide(done, records)
            if decision.stop:
                left = [j for j in self.order[i:] if j.id not in done]
                if left:
                    self.skipped = {j.id: f"not needed for the verdict: {decision.reason}" for j in left}
                    after = next((j.id for j in reversed(self.order[:i]) if j.id in done), None)
                    self.stopped = {"after": after, "reason": decision.reason, "skipped": len(left)}
                    rundir.log_event(run_dir, event="early_stop", after=after, skipped=[j.id for j in left],
                                     detail=f"stopped with {len(left)} jobs left: {decision.reason}")
                    progress.update(overall, total=len(done))
                    if self.show_progress:
                        self.console.print(f"verdict strategy: {len(left)} jobs skipped, {decision.reason}")
                break
            if job.id in done:
                continue
            carried = None
            if carries and not job.is_clean and not job.budget and job.id not in exact:
                carried = strategy.carried_over(job, self.order[:i], records, len(self.data))
            if self.pool is not None:
                self.pool.run([job], progress, overall, carried={job.id: carried} if carried is not None else None)
            else:
                summary = self.run_job(job, progress, carried)
                progress.advance(overall)
                self.host.pm.hook.job_finished(job=job, summary=summary, run_dir=run_dir)
            done.add(job.id)

    def ran_jobs(self) -> list[Job]:
        """The planned jobs that ran (all of them, unless the verdict strategy skipped some), in plan order."""
        return [j for j in self.jobs if j.id not in self.skipped]

    def gradient_health(self, cases: int = 32) -> dict[str, dict]:
        """Per model an attack differentiates (each defense's naive and adaptive views): how
        many of the first ``cases`` inputs get an all-zero or non-finite loss gradient."""
        n = min(cases, self.batch_size, len(self.data))
        _, x, y = next(self.data.batches(0, n, n, task=self.spec.task))
        x, y = x.to(self.device), y.to(self.device)
        health = {}
        for label, loaded in self.models.items():
            if Access.GRADIENTS not in loaded.access:
                continue
            for view, module in view_modules(loaded).items():
                with torch.enable_grad():
                    _, grad = input_gradient(module, x, y)
                flat = grad.flatten(1)
                health[view_label(label, view)] = {"n": n, "zero": int((flat == 0).all(1).sum()),
                                                   "nonfinite": int((~flat.isfinite()).any(1).sum())}
        return health

    def certified(self) -> dict[str, dict]:
        """Each certifying defense's certificates (:mod:`medaudit.audits.certification`)."""
        return certify_defenses(self.session, self.data, self.spec, self.run_dir, self.batch_size,
                                self.console if self.show_progress else None)

    def _chance(self) -> float | None:
        """Classification: the share of the most frequent class, what always answering it scores (C1)."""
        if self.spec.task is not Task.CLASSIFICATION:
            return None
        counts = torch.bincount(torch.as_tensor(self.data.labels).long().flatten())
        return float(counts.max()) / max(int(counts.sum()), 1)

    def soundness(self, computed: dict) -> dict[str, Any]:
        """What the validity checks need from running the models again (after the jobs, so the
        jobs' random draws are the same with and without them): each deployed model's
        behaviour on the first cases and, for classification, the noise baseline and the
        convergence re-run (:mod:`medaudit.audits.soundness`)."""
        spec, started = self.spec, time.perf_counter()
        if self.show_progress:
            self.console.print("validity checks: each model's behaviour, the noise baseline and the convergence re-run")
        n = min(PROBE_CASES, len(self.data), self.batch_size)  # the batch size an out-of-memory error left
        _, x, _ = next(self.data.batches(0, n, n, task=spec.task))
        found: dict[str, Any] = {"behaviour": model_behaviour(self.models, x.to(self.device))}
        if spec.task is Task.CLASSIFICATION:
            options = spec.validity
            n = min(max(options.noise_cases, options.convergence_cases), len(self.data))
            x, y = self._first_cases(n) if n else (None, None)  # read once for both re-runs
            k = min(options.noise_cases, n)
            found["noise"] = noise_baseline(self.models, self.ran_jobs(), computed["records"], x[:k], y[:k],
                                            self.data.case_ids[:k], spec, self.batch_size) if k else {}
            k = min(options.convergence_cases, n)
            found["convergence"] = convergence(self.models, self.ran_jobs(), computed, self.attacks, self.protocol, x[:k],
                                               y[:k], spec, self.batch_size) if k else {}
        found["seconds"] = round(time.perf_counter() - started, 3)
        return found

    def _first_cases(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [(x, y) for _, x, y in self.data.batches(0, n, self.batch_size, task=self.spec.task)]
        return torch.cat([x for x, _ in parts]).to(self.device), torch.cat([y for _, y in parts]).to(self.device)

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

    def run_job(self, job: Job, progress: Progress, carried: list[dict | None] | None = None) -> dict[str, Any]:
        """Run one job over every case (less the ``carried`` ones: :func:`execute`), write its
        records and return its metric values. Out of GPU memory, the job starts again at half
        the batch size (:meth:`_halve_batch`)."""
        started = time.perf_counter()
        n = len(self.data)
        clean = None
        if not job.is_clean:
            clean_job = next(j for j in self.jobs if j.defense == job.defense and j.is_clean)
            clean = read_records(self.run_dir, clean_job.id)
        while True:
            bs = self.batch_size
            task = progress.add_task(f"  {job.title()}", total=-(-n // bs))
            writer = RecordWriter(self.run_dir, job.id)
            gpu = GpuMonitor(self.device)

            def advance(task=task, gpu=gpu):
                progress.advance(task)
                gpu.sample()

            sink = RunSink(self.run_dir, self.data, self.protocol.keeps_features, advance)
            try:
                records = execute(self.session, job, 0, n, clean, sink, batch_size=bs, carried=carried)
                writer.write(records)
                sink.finish(job)
                break
            except BaseException as exc:
                writer.discard()
                progress.remove_task(task)
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    self._halve_batch(job, exc)
                    continue
                if isinstance(exc, Exception) and (frame := model_frame(self.model.module, exc)) is not None:
                    self._model_raised(job, type(exc).__name__, _first_line(exc), frame,
                                       list(self.data.case_ids[sink.start : sink.start + bs]))
                raise
        writer.commit(records.facets)
        progress.remove_task(task)
        seconds = time.perf_counter() - started
        rundir.log_event(self.run_dir, event="job", job=job.id, seconds=round(seconds, 3), batch_size=bs, **gpu.summary())
        return {"job": job.id, "seconds": seconds, **self._job_metrics(job, records)}

    def _halve_batch(self, job: Job, exc: Exception) -> None:
        """Out of GPU memory: free the cache and run the job again at half the batch size,
        logged in the timeline (the report shows it). Batches start at multiples of the new
        size, so the per-batch seeds are those of a run at that size from the start. At
        batch size 1 the run stops, resumable, with advice (the fault list's row 16)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        bs = self.batch_size
        if bs == 1:
            done = sum(is_done(self.run_dir, j.id) for j in self.jobs)
            rundir.log_event(self.run_dir, event="out_of_memory", job=job.id, detail=_first_line(exc))
            raise OutOfMemory(
                f"out of memory on {self.device} at batch size 1 in job {job.title()!r} ({_first_line(exc)}); "
                f"{done} of {len(self.jobs)} jobs finished in {self.run_dir}. Free the GPU (other processes: "
                "nvidia-smi), use smaller inputs or a GPU with more memory, or set runtime.device: cpu, then resume "
                f"with: medaudit run SPEC --resume {self.run_dir}"
            ) from None
        self.batch_size = max(bs // 2, 1)
        detail = f"batch size {bs} -> {self.batch_size}: out of memory in job {job.title()}"
        rundir.log_event(self.run_dir, event="batch_size", job=job.id, to=self.batch_size, detail=detail)
        self.console.print(f"[yellow]{detail}; running the job again[/yellow]")

    def _job_metrics(self, job: Job, records: Records) -> dict[str, Any]:
        """The job's metric values as results.json will give them (clean metrics for a clean job)."""
        confidence = self.spec.acceptance.confidence
        metrics = {name: self.host.get("metric", name)() for name in self.spec.metrics}
        read = read_records(self.run_dir, job.id)
        return {"metrics": {name: compute_metric(m, read, confidence)
                            for name, m in metrics.items() if m.clean == job.is_clean}}

    def _model_raised(self, job: Job, error: str, message: str, frame: str, cases: list[str]) -> None:
        """Log the batch's cases and stop with one line that names the model as the source."""
        rundir.log_event(self.run_dir, event="model_error", job=job.id, cases=cases, error=error, frame=frame)
        shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        raise ModelRaised(
            f"{self.model_name} raised {error}: {message} (at {frame}) in job {job.title()!r}, "
            f"on the batch of cases {shown}; fix the model, then resume with: medaudit run SPEC --resume {self.run_dir}"
        ) from None

    # -- results ------------------------------------------------------------------------

    def build_results(self) -> dict[str, Any]:
        spec, host = self.spec, self.host
        data = self.data
        # Before anything else runs the model again: did the jobs leave its weights as they found them?
        self.probe["weights_unchanged"] = state_dict_sha256(self.model.module) == self.weights_sha256
        ran = self.ran_jobs()
        computed = compute_results(spec, host, ran, self.run_dir, self.protocol.class_names(data))
        for row in computed["rows"]:  # a worst case decided (failed) before every attack at its budget ran
            if row["attack"] == WORST_CASE and (left := [j.attack for j in self.jobs if j.id in self.skipped
                                                         and j.defense == row["defense"] and not j.budget
                                                         and j.epsilon == row["epsilon"]]):
                row["skipped_attacks"] = left
        soundness = self.soundness(computed)
        certified = self.certified()
        checks = validity_checks(spec, host, ran, computed["records"], computed["rows"], self.gradient_health(),
                                 {**self.probe, "randomized": spec.model.randomized}, attacks=self.attacks,
                                 clean=computed["clean"], soundness=soundness, chance=self._chance(),
                                 averaging_views={ref.label: host.get("defense", ref.name).averaging_views
                                                  for ref in spec.defenses},
                                 cumulative=spec.runtime.strategy == strategy.VERDICT and self.protocol.carries)
        accepted = acceptance(spec, host, computed, checks, run_dir=self.run_dir)
        timeline = rundir.read_timeline(self.run_dir)
        seconds = {e["job"]: e["seconds"] for e in timeline if e.get("event") == "job"}
        usage = {e["job"]: {k: e[k] for k in ("batch_size", "gpu_memory_peak_mib", "gpu_utilisation_percent") if k in e}
                 for e in timeline if e.get("event") == "job"}
        epsilons = [e for e in spec.threat_model.epsilons if any(j.epsilon == e and not j.budget for j in ran)]
        figures = task_figures(spec.task, self.run_dir, computed["rows"], ran, epsilons or spec.threat_model.epsilons,
                               data, self.models[NO_DEFENSE], spec.report.figures)
        if certified:
            figures.append(certified_figure(certified, computed["rows"], self.protocol.headline,
                                            spec.threat_model.norm.value, self.run_dir / "figures" / "certified.png"))
        if soundness.get("convergence"):
            figures.append(convergence_figure(soundness["convergence"], self.run_dir / "figures" / "convergence.png"))
        figures = [f for f in figures if f is not None]
        started = next((e["at"] for e in timeline if e["event"] == "start"), None)
        return {
            "schema_version": SCHEMA_VERSION,
            "medaudit_version": medaudit.__version__,
            "audit": {
                "name": spec.audit.name,
                "title": spec.title(),
                "description": spec.audit.description,
                "task": spec.task.value,
                "started": started,
                "finished": rundir.utc_now(),
                "report_id": history.report_id(spec.audit.name, started, self.fingerprints, self.run_dir.name),
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
                "image_shape": list(data.image_shape),
                "intensity": self.data_summary.intensity,
                **class_summary(data, spec.task, self.model.num_classes, self.data_summary),
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
            **({"clean_class_rates": computed["clean_class_rates"]} if computed["clean_class_rates"] else {}),
            **({"corruption_errors": errors} if (errors := self._corruption_errors(computed)) else {}),
            "rows": computed["rows"],
            "curves": computed["curves"],
            "subgroups": computed["subgroups"],
            "validity": checks,
            "soundness": soundness,
            **({"certified": certified} if certified else {}),
            "acceptance": accepted,
            "figures": figures,
            "conventions": self.protocol.conventions_for(
                any(Facet.REJECTION in (m.screen or NO_SCREEN).facets for m in self.models.values())),
            "jobs": [
                {"id": j.id, "title": j.title(), "defense": j.defense, "attack": j.attack, "view": j.view,
                 "spec_attack": j.spec_attack, "epsilon": j.epsilon, **({"budget": j.budget} if j.budget else {}),
                 "seconds": seconds.get(j.id), **usage.get(j.id, {}),
                 **({"skipped": self.skipped[j.id]} if j.id in self.skipped else {})}
                for j in self.jobs
            ],
            "strategy": strategy.describe(
                spec, self.order, {j.id for j in ran}, self.skipped,
                {job_id: n for job_id, rows in computed["records"].items()
                 if Facet.CARRIED in rows.facets and (n := sum(bool(r.get("carried")) for r in rows))},
                strategy.exact_jobs(spec, host, self.jobs) if spec.runtime.strategy == strategy.VERDICT else set(),
                self.stopped),
            "timeline": timeline,
            "environment": json.loads((self.run_dir / "environment.json").read_text(encoding="utf-8")),
            "seed": spec.runtime.seed,
            "spec": spec.model_dump(mode="json"),
        }

    def _corruption_errors(self, computed: dict) -> dict | None:
        """The corruption errors normalised to the spec's baseline run (mCE), if it names one."""
        if self.spec.baseline is None:
            return None
        baseline = json.loads((self.spec.baseline.run_dir / "results.json").read_text(encoding="utf-8"))
        errors = corruption_errors(computed["rows"], computed["clean"], baseline, self.spec.baseline.name,
                                   self.protocol.headline, self.protocol.clean_headline)
        if errors is not None:
            errors["same_data"] = errors["same_data"] == self.fingerprints["data_sha256"]
        return errors

    def _provenance(self, kind: str, name: str) -> dict[str, Any]:
        cls = self.host.get(kind, name)
        info = self.host.plugin_of(cls)
        out = {"plugin": cls.plugin, "distribution": info.distribution if info else None, "version": info.version if info else None}
        if kind == "attack":
            c = component_info(cls)
            out.update(summary=c["summary"], norms=c["norms"], needs=c["needs"], targeted=c["targeted"])
            out["budget"] = c.get("budget")  # None: bounded by the threat model's norm
        return out


def physical_budgets(epsilons: list[float], window: tuple[float, float] | None) -> list[float] | None:
    """Each budget in the data's own intensity units: eps times the window's width (for an
    L2 budget this is the norm over all pixels, in those units)."""
    if window is None:
        return None
    width = window[1] - window[0]
    return [round(e * width, 6) for e in epsilons]



class RunSink(Sink):
    """A job's side outputs in the run directory: the first batch's cases for the report's
    examples (unless their pixels may carry identifying text) and, where the task keeps
    them, the penultimate features of the first cases."""

    def __init__(self, run_dir: Path, data: LoadedData, features: bool, advance):
        self.run_dir, self.data, self.features, self.advance = run_dir, data, features, advance
        self.tap: FeatureTap | None = None
        self.start = 0

    def scoring(self, job: Job, model, positions):
        if not self.features:
            return super().scoring(job, model, positions)
        self.tap = self.tap or FeatureTap(model, FEATURE_CASES)
        return self.tap.capture(positions)

    def batch(self, job, batch_start, x, shown, y, pred, clean_pred, target) -> None:
        if batch_start == 0 and not self.data.pixels_may_identify:
            save_examples(self.run_dir, job.id, x, shown, y, pred, target, clean_pred=clean_pred)
        self.start = batch_start + len(x)
        self.advance()

    def finish(self, job: Job) -> None:
        if self.tap is not None and (captured := self.tap.result()) is not None:
            save_features(self.run_dir, job.id, *captured, self.data.labels[captured[0]])
