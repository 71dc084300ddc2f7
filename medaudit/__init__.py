"""medaudit: audit the adversarial robustness of medical image models.

``medaudit.audit(spec, model=..., data=...)`` runs an audit from Python (:mod:`medaudit.api`).
A plugin needs only this package's top level: ``from medaudit import hookimpl`` and the
base classes re-exported here from :mod:`medaudit.core.components` (Attack, Dataset,
Defense, Metric, ModelLoader, ReportSection and the types they use).
"""

from medaudit.core.components import (
    CROSS_ENTROPY,
    MARGIN,
    Access,
    Attack,
    AttackContext,
    AttackFamily,
    AttackOutcome,
    Budget,
    Dataset,
    Defense,
    Facet,
    InputPath,
    LoadedData,
    LoadedModel,
    Metric,
    MetricValue,
    MinimumNormAttack,
    ModelLoader,
    Norm,
    Params,
    ReportSection,
    Screen,
    Task,
)
from medaudit.core.hookspecs import hookimpl


def audit(*args, **kwargs):
    """Run an audit from Python: see :func:`medaudit.api.audit` (imported on first call, so
    that ``import medaudit`` stays light for plugins)."""
    from medaudit.api import audit as run_audit

    return run_audit(*args, **kwargs)


__version__ = "0.1.0"
__all__ = [
    "CROSS_ENTROPY",
    "MARGIN",
    "Access",
    "Attack",
    "AttackContext",
    "AttackFamily",
    "AttackOutcome",
    "Budget",
    "Dataset",
    "Defense",
    "Facet",
    "InputPath",
    "LoadedData",
    "LoadedModel",
    "Metric",
    "MetricValue",
    "MinimumNormAttack",
    "ModelLoader",
    "Norm",
    "Params",
    "ReportSection",
    "Screen",
    "Task",
    "__version__",
    "audit",
    "hookimpl",
]
