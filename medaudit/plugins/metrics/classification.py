"""Classification metrics: clean_accuracy, robust_accuracy, attack_success_rate, perturbation_linf_mean, perturbation_linf_max, perturbation_l2_mean, perturbation_l2_max, min_norm_median.

Accuracies and perturbation sizes (the latter for both tasks), computed from per-sample
records.

Proportions carry their counts so that the results can give Wilson confidence intervals.
"""

from __future__ import annotations

import math

from medaudit import hookimpl
from medaudit.core.components import Facet, Metric, MetricValue, Task

UNIT = (0.0, 1.0)
CLASSIFICATION = frozenset({Facet.CLASSIFICATION})


def _proportion(flags: list[bool]) -> MetricValue | None:
    if not flags:
        return None
    k = sum(flags)
    return MetricValue(value=k / len(flags), n=len(flags), successes=k)


class CleanAccuracy(Metric):
    """Accuracy on unperturbed inputs."""

    name = "clean_accuracy"
    clean = True
    needs = CLASSIFICATION
    bounds = UNIT

    def compute(self, records):
        return _proportion([r["clean_correct"] for r in records])


class RobustAccuracy(Metric):
    """Accuracy under attack: a sample counts only if it is classified correctly after the
    attack (samples misclassified when clean count as errors). For ``worst_case`` a sample
    must survive every attack at that epsilon."""

    name = "robust_accuracy"
    needs = CLASSIFICATION
    bounds = UNIT

    def compute(self, records):
        return _proportion([r["adv_correct"] for r in records])


class AttackSuccessRate(Metric):
    """Fraction of the correctly classified clean samples whose prediction the attack flips."""

    name = "attack_success_rate"
    needs = CLASSIFICATION
    better = "lower"
    bounds = UNIT

    def compute(self, records):
        return _proportion([not r["adv_correct"] for r in records if r["clean_correct"]])


class _NormStat(Metric):
    """Perturbation size over the samples the attack ran on (correct when clean)."""

    better = "lower"
    field = ""
    reduce = "mean"
    tasks = frozenset(Task)
    bounds = (0.0, math.inf)
    needs = frozenset({Facet.PERTURBATION})

    def compute(self, records):
        values = [r[self.field] for r in records if r["attacked"]]
        if not values:
            return None
        value = max(values) if self.reduce == "max" else sum(values) / len(values)
        return MetricValue(value=value, n=len(values))


class LinfMean(_NormStat):
    """Mean L-inf norm of the perturbations, in [0, 1] pixel units."""

    name, field, reduce, bounds = "perturbation_linf_mean", "linf", "mean", UNIT


class LinfMax(_NormStat):
    """Largest L-inf norm of any perturbation, in [0, 1] pixel units."""

    name, field, reduce, bounds = "perturbation_linf_max", "linf", "max", UNIT


class L2Mean(_NormStat):
    """Mean L2 norm of the perturbations, in [0, 1] pixel units."""

    name, field, reduce = "perturbation_l2_mean", "l2", "mean"


class L2Max(_NormStat):
    """Largest L2 norm of any perturbation, in [0, 1] pixel units."""

    name, field, reduce = "perturbation_l2_max", "l2", "max"


class MinNormMedian(Metric):
    """Median size (in the threat model's norm) of the smallest fooling perturbation found by a
    minimum-norm attack, over the attacked samples; samples it could not fool count as infinite."""

    name = "min_norm_median"
    needs = frozenset({Facet.PERTURBATION, Facet.MINIMUM_NORM})
    bounds = (0.0, math.inf)

    def compute(self, records):
        sizes = sorted(
            float("inf") if r["min_norm"] is None else r["min_norm"] for r in records if r["attacked"]
        )
        if not sizes:
            return None
        mid = len(sizes) // 2
        median = sizes[mid] if len(sizes) % 2 else (sizes[mid - 1] + sizes[mid]) / 2
        return None if median == float("inf") else MetricValue(value=median, n=len(sizes))


@hookimpl
def register_metrics(register):
    for cls in (CleanAccuracy, RobustAccuracy, AttackSuccessRate, LinfMean, LinfMax, L2Mean, L2Max, MinNormMedian):
        register(cls)
