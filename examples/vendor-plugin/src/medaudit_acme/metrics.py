"""Metrics: unchanged_share.

A diagnostic for the evaluation itself: an attack that leaves many of the cases it ran on
exactly unchanged saw no useful gradient there (masked or vanishing gradients), so its
robust accuracy is no evidence of robustness.
"""

from __future__ import annotations

from medaudit import Facet, Metric, MetricValue, Task


class UnchangedShare(Metric):
    """Share of the attacked cases the attack left exactly unchanged (L-inf of 0): high values hint at gradient masking.

    Counts only the cases the attack ran on (those classified correctly when clean); None
    when it ran on none. A proportion, so the report gives it a Wilson interval.
    """

    name = "unchanged_share"
    better = "lower"
    bounds = (0.0, 1.0)
    needs = frozenset({Facet.PERTURBATION})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})

    def compute(self, records):
        sizes = [r["linf"] for r in records if r["attacked"]]
        if not sizes:
            return None
        unchanged = sum(size == 0 for size in sizes)
        return MetricValue(value=unchanged / len(sizes), n=len(sizes), successes=unchanged)
