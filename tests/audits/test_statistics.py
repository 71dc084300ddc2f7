"""Confidence intervals: Wilson as scipy computes it, the percentile bootstrap as earlier
results gave it, and the alternatives (Clopper-Pearson, BCa) on known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, chi2

from medaudit.audits.statistics import (
    bca_interval, bootstrap_interval, clopper_pearson_interval, metric_value, wilson_interval,
)
from medaudit.core.components import MetricValue


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_is_scipys_wilson_with_exact_endpoints_at_0_and_n(confidence):
    for n in range(1, 70):
        for k in range(n + 1):
            ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            low, high = wilson_interval(k, n, confidence)
            assert low == pytest.approx(max(0.0, ci.low), abs=1e-12) and high == pytest.approx(min(1.0, ci.high), abs=1e-12)
            assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)
    assert all(math.isnan(v) for v in wilson_interval(0, 0, confidence))


def test_percentile_bootstrap_gives_the_numbers_of_earlier_results():
    # Pinned from the implementation the goldens were made with: same rng, same resamples.
    assert bootstrap_interval((0.2, 0.4, 0.6, 0.8, 0.95, 0.1, 0.33), 0.95) == (0.28, 0.7114285714285715)
    assert wilson_interval(8, 10, 0.95) == (0.49016247153664183, 0.9433178485456247)


def test_clopper_pearson_known_values():
    # k = 0 and k = n have closed forms: (alpha/2) ** (1/n); 5/10 is the textbook (0.1871, 0.8129).
    assert clopper_pearson_interval(0, 10, 0.95) == pytest.approx((0.0, 1 - 0.025 ** 0.1), abs=1e-12)
    assert clopper_pearson_interval(10, 10, 0.95) == pytest.approx((0.025 ** 0.1, 1.0), abs=1e-12)
    low, high = clopper_pearson_interval(5, 10, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)
    # Exact intervals are never narrower than Wilson's around the estimate.
    w_low, w_high = wilson_interval(5, 10, 0.95)
    assert low < w_low and high > w_high


def test_bca_follows_the_skew_the_percentile_bootstrap_misses():
    """For exponential data the exact interval of the mean is known (2 n mean / theta is
    chi-square with 2n degrees of freedom): it reaches further above the mean than below.
    BCa reproduces that asymmetry; the percentile bootstrap falls short of it."""
    n = 100
    exact = ((2 * n / chi2.ppf(0.025, 2 * n)) - 1) / (1 - 2 * n / chi2.ppf(0.975, 2 * n))
    bca, percentile = [], []
    for seed in range(20):
        x = tuple(np.random.default_rng(seed).exponential(1.0, n))
        m = float(np.mean(x))
        for out, interval in ((bca, bca_interval), (percentile, bootstrap_interval)):
            low, high = interval(x, 0.95)
            assert low < m < high
            out.append((high - m) / (m - low))
    assert abs(np.mean(bca) - exact) < 0.1 < abs(np.mean(percentile) - exact)
    assert bca_interval(x, 0.95) == bca_interval(x, 0.95)  # seeded


def test_bca_of_identical_cases_is_that_value():
    assert bca_interval((0.5, 0.5, 0.5), 0.95) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bca_interval((0.5,), 0.95))


def test_metric_value_names_the_interval_it_gives():
    proportion = MetricValue(value=0.5, n=10, successes=5)
    mean = MetricValue(value=0.5, n=4, per_case=(0.2, 0.4, 0.6, 0.8))
    assert metric_value(proportion, 0.95)["interval"] == "wilson"
    assert metric_value(mean, 0.95)["interval"] == "bootstrap"
    exact = metric_value(proportion, 0.95, proportion="clopper-pearson")
    assert exact["interval"] == "clopper-pearson" and exact["ci_low"] == clopper_pearson_interval(5, 10, 0.95)[0]
    bca = metric_value(mean, 0.95, mean="bca")
    assert bca["interval"] == "bca" and (bca["ci_low"], bca["ci_high"]) == bca_interval(mean.per_case, 0.95)
    assert "ci_low" not in metric_value(MetricValue(value=0.1, n=3), 0.95)
    assert metric_value(None, 0.95) is None


@pytest.mark.parametrize("k, n", [(0, 0), (0, 5), (3, 5), (5, 5), (7, 20), (15, 20), (40, 60), (1, 1)])
def test_the_convergence_check_s_sign_test_is_scipy_s_one_sided_binomial_test(k, n):
    from scipy.stats import binomtest

    from medaudit.audits.soundness import sign_test

    expected = binomtest(k, n, 0.5, alternative="greater").pvalue if n else 1.0
    assert sign_test(k, n) == pytest.approx(expected, rel=1e-12)
