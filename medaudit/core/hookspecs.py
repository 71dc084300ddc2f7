"""Hook specifications: the whole contract between medaudit and its plugins.

Registration hooks receive a ``register`` callback; call it once per component class you
provide. Built-in plugins (``medaudit.plugins``) use exactly these hooks, and so does any
package that declares an entry point in the ``medaudit`` group::

    [project.entry-points.medaudit]
    acme = "medaudit_acme"

An implementation may accept a subset of a hook's arguments (pluggy's opt-in arguments),
so new arguments can be added to a hook without breaking existing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from medaudit.core.jobs import Job
    from medaudit.core.spec import Spec
    from medaudit.core.components import (
        Attack,
        Dataset,
        Defense,
        Metric,
        ModelLoader,
        ReportSection,
    )

hookspec = pluggy.HookspecMarker("medaudit")
#: Marker for plugin implementations: ``@medaudit.hookimpl``.
hookimpl = pluggy.HookimplMarker("medaudit")


# -- registration hooks ---------------------------------------------------------------


@hookspec
def register_models(register: Callable[[type[ModelLoader]], None]) -> None:
    """Register model loaders (subclasses of :class:`medaudit.core.components.ModelLoader`).

    :param register: call ``register(MyLoader)`` for each loader class.

    A loader turns its params (checkpoint path, architecture, normalisation) into a
    :class:`~medaudit.core.components.LoadedModel` whose module takes pixel-space input in
    [0, 1] and returns logits. Specs select it with ``model: {loader: <name>}``.
    """


@hookspec
def register_datasets(register: Callable[[type[Dataset]], None]) -> None:
    """Register datasets (subclasses of :class:`medaudit.core.components.Dataset`).

    :param register: call ``register(MyDataset)`` for each dataset class.

    A dataset returns a :class:`~medaudit.core.components.LoadedData` of pixel-space
    images, labels and pseudonymous case ids. Specs select it with ``data: {dataset: <name>}``.
    """


@hookspec
def register_attacks(register: Callable[[type[Attack]], None]) -> None:
    """Register evasion attacks (subclasses of :class:`medaudit.core.components.Attack`).

    :param register: call ``register(MyAttack)`` for each attack class.

    An attack declares its norms, whether it is targeted and what it needs from the model
    (gradients, scores or decisions), and implements ``perturb``. Specs list attacks under
    ``attacks: [{name: <name>, params: {...}}]``.
    """


@hookspec
def register_defenses(register: Callable[[type[Defense]], None]) -> None:
    """Register defenses (subclasses of :class:`medaudit.core.components.Defense`).

    :param register: call ``register(MyDefense)`` for each defense class.

    A defense wraps the loaded model; every attack runs against each defended model as well
    as the undefended one. Specs list them under ``defenses: [{name: <name>}]``.
    """


@hookspec
def register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register metrics (subclasses of :class:`medaudit.core.components.Metric`).

    :param register: call ``register(MyMetric)`` for each metric class.

    A metric computes one value from the per-sample records of one (defense, attack,
    epsilon) group; acceptance criteria refer to metrics by name.
    """


@hookspec
def register_report_sections(register: Callable[[type[ReportSection]], None]) -> None:
    """Register report sections (subclasses of :class:`medaudit.core.components.ReportSection`).

    :param register: call ``register(MySection)`` for each section class.

    A section renders an HTML fragment from ``results.json`` alone, so a report can be
    re-rendered from a run directory without rerunning anything.
    """


# -- lifecycle hooks ------------------------------------------------------------------


@hookspec
def audit_started(spec: Spec, run_dir: Path, jobs: list[Job]) -> None:
    """Called once the model and data are loaded, before the first job runs.

    :param spec: the validated spec.
    :param run_dir: the run directory.
    :param jobs: every planned job, finished ones included when resuming.
    """


@hookspec
def job_finished(job: Job, summary: dict[str, Any], run_dir: Path) -> None:
    """Called after a job's records are written (not for jobs skipped on resume).

    :param job: the job that finished.
    :param summary: its metric values, as they will appear in results.json.
    :param run_dir: the run directory.

    Raising ``KeyboardInterrupt`` here stops the audit as Ctrl-C would; the job just
    finished is kept.
    """


@hookspec
def audit_finished(results: dict[str, Any], run_dir: Path) -> None:
    """Called after results.json and the report are written.

    :param results: the content of results.json.
    :param run_dir: the run directory.
    """
