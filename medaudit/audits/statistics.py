"""Confidence intervals of the results: on proportions (Wilson, Clopper-Pearson) and on means
over cases (percentile bootstrap, BCa).

The defaults (Wilson, percentile bootstrap) give the numbers medaudit has always given;
Clopper-Pearson (exact, conservative) and BCa (bias-corrected and accelerated, better
coverage for skewed per-case values such as Dice) are the spec's alternatives
(``acceptance.proportion_interval``, ``acceptance.mean_interval``).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from medaudit.core.components import MetricValue

WILSON, CLOPPER_PEARSON = "wilson", "clopper-pearson"
BOOTSTRAP, BCA = "bootstrap", "bca"
#: Intervals on a proportion (they need ``successes``) and on a mean over cases (``per_case``).
PROPORTION_INTERVALS = (WILSON, CLOPPER_PEARSON)
MEAN_INTERVALS = (BOOTSTRAP, BCA)

#: Bootstrap resamples for intervals on means over cases (seeded: results are reproducible).
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good coverage at small n). 0 and 1
    are exact endpoints when there are no successes or no failures.

    The closed form, not ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``: the
    two agree to round-off (a few 1e-16, tested), but only the closed form gives, bit for
    bit, the intervals of earlier results."""
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def clopper_pearson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson ("exact") interval: coverage at least ``confidence`` for every true
    proportion, at the price of a wider interval than Wilson's."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="exact")
    return (0.0 if successes == 0 else float(ci.low), 1.0 if successes == n else float(ci.high))


def bootstrap_interval(values: tuple[float, ...], confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over cases."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(BOOTSTRAP_RESAMPLES, len(data)))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def bca_interval(values: tuple[float, ...], confidence: float, seed: int = 0) -> tuple[float, float]:
    """Bias-corrected and accelerated bootstrap interval of the mean over cases (Efron 1987),
    by ``scipy.stats.bootstrap``. Cases that all share one value give that value twice
    (BCa is undefined there)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (math.nan, math.nan)
    if np.all(data == data[0]):
        return (float(data[0]), float(data[0]))
    ci = bootstrap(
        (data,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence, method="BCa",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return (float(ci.low), float(ci.high))


PROPORTION = {WILSON: wilson_interval, CLOPPER_PEARSON: clopper_pearson_interval}
MEAN = {BOOTSTRAP: bootstrap_interval, BCA: bca_interval}


def metric_value(
    mv: MetricValue | None, confidence: float, proportion: str = WILSON, mean: str = BOOTSTRAP
) -> dict[str, Any] | None:
    """A metric's value as results.json keeps it: estimate, n and, where the metric gives
    counts (a proportion) or per-case values (a mean over at least two cases), an interval
    and its name."""
    if mv is None:
        return None
    out: dict[str, Any] = {"value": mv.value, "n": mv.n}
    if mv.successes is not None:
        low, high = PROPORTION[proportion](mv.successes, mv.n, confidence)
        out.update(successes=mv.successes, ci_low=low, ci_high=high, interval=proportion)
    elif mv.per_case is not None and len(mv.per_case) >= 2:
        low, high = MEAN[mean](mv.per_case, confidence)
        out.update(ci_low=low, ci_high=high, interval=mean)
    return out
