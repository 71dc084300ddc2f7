"""From per-sample records to results: what results.json gives, computed from the run
directory's records only, so results can be recomputed from a run directory and a resumed
run gives the same results as an uninterrupted one.

The work is split by concern; this module keeps the names the runner and results.json's
readers import:

- :mod:`medaudit.audits.statistics`: confidence intervals (Wilson and Clopper-Pearson on
  proportions, percentile bootstrap and BCa on means over cases);
- :mod:`medaudit.audits.aggregation`: metrics per group (:func:`compute_results`), the
  per-class table, the robustness curve, the detection summary and the cases with NaN or
  Inf outputs. It asks the records for their facets, never for their keys; the worst case
  over attacks is the task protocol's (:mod:`medaudit.core.tasks`);
- :mod:`medaudit.audits.validity`: the validity checks (:func:`validity_checks`), which
  compare attack families and views, never attack names;
- :mod:`medaudit.audits.acceptance`: each criterion's verdict and the audit's
  (:func:`judge`, :func:`acceptance`).
"""

from __future__ import annotations

from typing import Any

from medaudit.audits.acceptance import (
    FAIL, INCONCLUSIVE, INVALID, NOT_ASSESSED, PASS, VERDICT_EXIT_CODES, acceptance, judge,
)
from medaudit.audits.aggregation import (
    compute_metric, compute_results, detection_summary, nonfinite_cases, per_class_table, robustness_curve,
)
from medaudit.audits.statistics import (
    BOOTSTRAP_RESAMPLES, bca_interval, bootstrap_interval, clopper_pearson_interval, metric_value, wilson_interval,
)
from medaudit.audits.validity import (
    BUDGET_TOLERANCE, LARGE_LINF, NOT_APPLICABLE, FALLBACK_TOLERANCE, WARN, gradient_check, model_checks,
    outputs_check, validity_checks,
)
from medaudit.core.components import MetricValue
from medaudit.core.tasks import worst_case_records

__all__ = [
    "FAIL", "INCONCLUSIVE", "INVALID", "NOT_APPLICABLE", "NOT_ASSESSED", "PASS", "WARN", "VERDICT_EXIT_CODES",
    "BOOTSTRAP_RESAMPLES", "BUDGET_TOLERANCE", "LARGE_LINF", "FALLBACK_TOLERANCE",
    "acceptance", "bca_interval", "bootstrap_interval", "clopper_pearson_interval", "compute_metric",
    "compute_results", "detection_summary", "gradient_check", "judge", "metric_value", "model_checks",
    "nonfinite_cases", "outputs_check", "per_class_table", "robustness_curve", "validity_checks",
    "wilson_interval", "worst_case_records",
]


def _value(mv: MetricValue | None, confidence: float) -> dict[str, Any] | None:
    """Transitional (the runner's per-job metrics): :func:`metric_value` with the default intervals."""
    return metric_value(mv, confidence)
