"""Classification metrics: clean_accuracy, robust_accuracy, attack_success_rate, sensitivity, specificity, false_negative_rate, clean_sensitivity, clean_specificity, clean_false_negative_rate, perturbation_linf_mean, perturbation_linf_max, perturbation_l2_mean, perturbation_l2_max, min_norm_median.

Accuracies and perturbation sizes (the latter for both tasks), computed from per-sample
records.

Proportions carry their counts so that the results can give Wilson confidence intervals.
"""

from __future__ import annotations

import abc
import math

from medaudit import hookimpl
from medaudit.core.components import Facet, Metric, MetricValue, Task
from medaudit.core.rates import found, spared

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
    monotone = True
    bounds = UNIT

    def compute(self, records):
        return _proportion([r["adv_correct"] for r in records])


class AttackSuccessRate(Metric):
    """Fraction of the correctly classified clean samples whose prediction the attack flips."""

    name = "attack_success_rate"
    needs = CLASSIFICATION
    better = "lower"
    monotone = True
    bounds = UNIT

    def compute(self, records):
        return _proportion([not r["adv_correct"] for r in records if r["clean_correct"]])


class _ClassRate(Metric):
    """A rate of one class against the rest (sensitivity, specificity, false-negative rate).
    :meth:`compute_class` gives it for one class; :meth:`compute` for the class where it is
    worst, the clinically worst direction of error (a criterion names a class with
    ``class:``)."""

    per_class = True
    needs = CLASSIFICATION
    bounds = UNIT
    side = "adv"

    @abc.abstractmethod
    def compute_class(self, records, c: int) -> MetricValue | None:
        """The rate of class index ``c`` against the rest; None when no case decides it."""

    def compute(self, records):
        values = [v for c in sorted({r["label"] for r in records}) if (v := self.compute_class(records, c)) is not None]
        if not values:
            return None
        return (min if self.better == "higher" else max)(values, key=lambda v: v.value)


class Sensitivity(_ClassRate):
    """Sensitivity (recall) of a class under attack: the share of its cases classified as it
    (a case misclassified when clean counts as missed). Without a class: the lowest over classes."""

    name = "sensitivity"

    def compute_class(self, records, c):
        return _proportion(found(records, c, self.side))


class Specificity(_ClassRate):
    """Specificity of a class under attack: the share of the other classes' cases not
    classified as it. Without a class: the lowest over classes."""

    name = "specificity"

    def compute_class(self, records, c):
        return _proportion(spared(records, c, self.side))


class FalseNegativeRate(Sensitivity):
    """False-negative rate of a class under attack (1 - sensitivity): the share of its cases
    missed, the missed findings. Without a class: the highest over classes."""

    name = "false_negative_rate"
    better = "lower"

    def compute_class(self, records, c):
        hits = super().compute_class(records, c)
        return None if hits is None else MetricValue(value=1 - hits.value, n=hits.n, successes=hits.n - hits.successes)


class CleanSensitivity(Sensitivity):
    """Sensitivity of a class on unperturbed inputs (the lowest over classes without a class)."""

    name, clean, side = "clean_sensitivity", True, "clean"


class CleanSpecificity(Specificity):
    """Specificity of a class on unperturbed inputs (the lowest over classes without a class)."""

    name, clean, side = "clean_specificity", True, "clean"


class CleanFalseNegativeRate(FalseNegativeRate):
    """False-negative rate of a class on unperturbed inputs (the highest over classes without a class)."""

    name, clean, side = "clean_false_negative_rate", True, "clean"


CLASS_RATES = (Sensitivity, Specificity, FalseNegativeRate, CleanSensitivity, CleanSpecificity, CleanFalseNegativeRate)


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
    for cls in (CleanAccuracy, RobustAccuracy, AttackSuccessRate, *CLASS_RATES, LinfMean, LinfMax, L2Mean, L2Max,
                MinNormMedian):
        register(cls)
