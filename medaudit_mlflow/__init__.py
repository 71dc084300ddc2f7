"""Track medaudit audits in MLflow: one MLflow run per audit run directory.

Off unless asked for, and then it never stops an audit: MLflow is imported only when
``MLFLOW_TRACKING_URI`` is set (MLflow's own switch) or ``MEDAUDIT_MLFLOW=1``;
``MEDAUDIT_MLFLOW=0`` turns it off whatever the URI. Without ``MLFLOW_TRACKING_URI``, MLflow's
default store applies (``sqlite:///mlflow.db`` in the working directory for MLflow 3; MLflow 3
refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``).
If MLflow is missing or the store fails, a warning says so and the audit goes on untracked.

The experiment is ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME`` if set, else the
audit's name; the run is named ``<audit>-<run dir name>`` (the UTC stamp). Through the lifecycle hooks:

``audit_started``
    starts the run, or reopens the one of the same run directory on ``--resume``; tags the
    medaudit version, the run directory and its fingerprints; logs the resolved spec as params.
``job_finished``
    logs the job's metrics as ``<defense>/<attack>/eps_<epsilon>/<metric>`` (see :mod:`.keys`).
``audit_finished``
    logs every metric row of results.json, the verdict (tag ``medaudit.verdict``, metric
    ``verdict_pass``) and each criterion's, the artifacts (results.json, the reports, the
    resolved spec), and ends the run FINISHED, whatever the verdict: MLflow's FAILED means the
    run broke, while a FAIL verdict is a result (filter with ``tags.medaudit.verdict = 'FAIL'``).

A run whose audit never finishes is ended when the process exits: KILLED when the audit was
interrupted (Ctrl-C, SIGTERM, SIGHUP: resumable, and a resume reopens it), FAILED when it
stopped on an error. A process killed outright (SIGKILL, power loss) leaves it RUNNING, until
a resume of its run directory reopens it.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from medaudit import hookimpl
from medaudit_mlflow.keys import acceptance_entries, group_parts, metric_entries, results_metrics, spec_params

log = logging.getLogger(__name__)

ENABLE_VAR = "MEDAUDIT_MLFLOW"
INSTALL_HINT = "pip install 'medaudit[mlflow]'"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off", ""}

#: The run-directory files logged as artifacts, where the run wrote them.
ARTIFACTS = ("results.json", "report.html", "report.pdf", "junit.xml", "spec.resolved.yaml")

#: MLflow's limits on one log_batch call.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def tracking_requested() -> bool:
    """``MEDAUDIT_MLFLOW`` decides when set (1/true/yes/on or 0/false/no/off); otherwise a
    non-empty ``MLFLOW_TRACKING_URI`` asks for tracking, as it does for MLflow itself."""
    switch = os.environ.get(ENABLE_VAR)
    if switch is not None:
        value = switch.strip().lower()
        if value in _ON | _OFF:
            return value in _ON
        log.warning("%s=%r is neither 1 nor 0; MLflow tracking follows MLFLOW_TRACKING_URI", ENABLE_VAR, switch)
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip())


@dataclasses.dataclass
class _Tracked:
    """The MLflow run of one audit run directory, while its audit is under way."""

    client: Any
    run_id: str
    run_dir: Path


#: Open runs by run directory: an audit's hooks find their run, and several audits may run in one process.
_open: dict[str, _Tracked] = {}
_exit_hook_registered = False


def _slot(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def run_key(run_dir: Path) -> str:
    """A tag value that finds the run of a run directory again (a resume), with no quoting to get wrong."""
    return hashlib.sha256(_slot(run_dir).encode()).hexdigest()[:20]


def _failed(what: str, exc: BaseException, tracked: _Tracked | None = None) -> None:
    """Tracking stops for this audit, which goes on: a tracker is never a reason to lose an audit."""
    log.warning("MLflow tracking stops for this audit, which goes on untracked: %s failed: %s: %s",
                what, type(exc).__name__, exc)
    if tracked is not None:
        _open.pop(_slot(tracked.run_dir), None)
        _end_quietly(tracked.client, tracked.run_id, "FAILED")


def _end_quietly(client, run_id: str, status: str) -> None:
    """End a run if the store still answers; a store that does not has been reported already."""
    try:
        client.set_terminated(run_id, status)
    except Exception:
        log.debug("MLflow run %s could not be ended as %s", run_id, status, exc_info=True)


@hookimpl
def audit_started(spec, run_dir, jobs) -> None:
    """Start (or reopen) the run; tag it, log the spec as params."""
    if not tracking_requested():
        return
    try:
        import mlflow
    except ImportError:
        log.warning("MLflow tracking is on (MLFLOW_TRACKING_URI or %s=1) but mlflow is not installed; "
                    "install it with: %s. The audit goes on without tracking.", ENABLE_VAR, INSTALL_HINT)
        return
    try:
        tracked = _start_run(spec, Path(run_dir))
    except Exception as exc:  # an unreachable server, a refused store: never the audit's end
        _failed("starting the run", exc)
        return
    _open[_slot(run_dir)] = tracked
    _register_exit_hook()
    log.info("MLflow run %s in %s", tracked.run_id, mlflow.get_tracking_uri())


@hookimpl
def job_finished(job, summary, run_dir) -> None:
    """Log the finished job's metric values."""
    tracked = _open.get(_slot(run_dir))
    if tracked is None:
        return
    parts = group_parts(job.defense, job.attack, job.epsilon_label, budget=job.budget)
    try:
        _log_metrics(tracked, dict(metric_entries(parts, summary.get("metrics") or {})))
    except Exception as exc:
        _failed(f"logging job {job.id}", exc, tracked)


@hookimpl
def audit_finished(results, run_dir) -> None:
    """Log every metric row, the verdicts and the artifacts; end the run FINISHED."""
    tracked = _open.get(_slot(run_dir))
    if tracked is None:
        return
    try:
        verdict_metrics, verdict_tags = acceptance_entries(results)
        _log_metrics(tracked, {**results_metrics(results), **verdict_metrics})
        _log_tags(tracked, verdict_tags)
        for name in ARTIFACTS:
            if (Path(run_dir) / name).is_file():
                tracked.client.log_artifact(tracked.run_id, str(Path(run_dir) / name))
        tracked.client.set_terminated(tracked.run_id, "FINISHED")
    except Exception as exc:
        _failed("logging the results", exc, tracked)
        return
    _open.pop(_slot(run_dir), None)


def end_open_runs() -> None:
    """End the runs whose audit never finished (at exit): KILLED after an interruption, which
    the run directory's timeline records, FAILED otherwise."""
    for slot, tracked in list(_open.items()):
        _open.pop(slot, None)
        try:
            interrupted = _last_event(tracked.run_dir) == "interrupted"
            tracked.client.set_tag(tracked.run_id, "medaudit.ended", "interrupted" if interrupted else "error")
            tracked.client.set_terminated(tracked.run_id, "KILLED" if interrupted else "FAILED")
        except Exception as exc:  # at exit, with the store perhaps gone: say so, raise nothing
            log.warning("MLflow run %s could not be ended: %s: %s", tracked.run_id, type(exc).__name__, exc)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(end_open_runs)
        _exit_hook_registered = True


def _last_event(run_dir: Path) -> str | None:
    from medaudit.audits.rundir import read_timeline

    events = read_timeline(run_dir)
    return events[-1].get("event") if events else None


def _start_run(spec, run_dir: Path) -> _Tracked:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _experiment_id(client, spec.audit.name)
    tags = _run_tags(spec, run_dir)
    [previous] = client.search_runs([experiment_id], f"tags.`medaudit.run_key` = '{tags['medaudit.run_key']}'",
                                    max_results=1) or [None]
    if previous is not None:  # a resume: the same run goes on
        run_id = previous.info.run_id
        client.update_run(run_id, status="RUNNING")
        logged = previous.data.params
    else:
        run_id = client.create_run(experiment_id, run_name=f"{spec.audit.name}-{run_dir.name}", tags=tags).info.run_id
        logged = {}
    tracked = _Tracked(client, run_id, run_dir)
    params = {k: v for k, v in spec_params(spec.model_dump(mode="json")).items() if k not in logged}
    try:
        _log_params(tracked, params)
    except Exception:
        _end_quietly(client, run_id, "FAILED")  # not left RUNNING for ever
        raise
    return tracked


def _experiment_id(client, audit_name: str) -> str:
    """MLflow's own variables first (``MLFLOW_EXPERIMENT_ID``, ``MLFLOW_EXPERIMENT_NAME``), else the audit's name."""
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip():
        return experiment_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or audit_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it in between
        return client.get_experiment_by_name(name).experiment_id


def _run_tags(spec, run_dir: Path) -> dict[str, str]:
    from medaudit import __version__

    tags = {
        "medaudit.version": __version__,
        "medaudit.audit": spec.audit.name,
        "medaudit.run_dir": _slot(run_dir),
        "medaudit.run_key": run_key(run_dir),
        "medaudit.task": spec.task.value,
        "mlflow.note.content": spec.audit.description or spec.audit.title or spec.audit.name,
    }
    fingerprints = Path(run_dir) / "fingerprints.json"
    if fingerprints.is_file():
        for name, value in json.loads(fingerprints.read_text(encoding="utf-8")).items():
            tags[f"medaudit.fingerprint.{name}"] = str(value)
    return tags


def _log_params(tracked: _Tracked, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    for chunk in _chunks(sorted(params.items()), _PARAMS_PER_BATCH):
        tracked.client.log_batch(tracked.run_id, params=[Param(k, v) for k, v in chunk])


def _log_tags(tracked: _Tracked, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    for chunk in _chunks(sorted(tags.items()), _PARAMS_PER_BATCH):
        tracked.client.log_batch(tracked.run_id, tags=[RunTag(k, v) for k, v in chunk])


def _log_metrics(tracked: _Tracked, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for chunk in _chunks(sorted(metrics.items()), _METRICS_PER_BATCH):
        tracked.client.log_batch(tracked.run_id, metrics=[Metric(k, v, now, 0) for k, v in chunk])


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i:i + size] for i in range(0, len(items), size))


__all__ = ["ARTIFACTS", "ENABLE_VAR", "INSTALL_HINT", "audit_finished", "audit_started", "end_open_runs",
           "job_finished", "run_key", "tracking_requested"]
