"""Randomized smoothing (Cohen et al. 2019): sound and tight certificates on a linear model,
whose smoothed classifier is known exactly, and the randomized-smoothing defense on the demo model."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from medaudit.core.smoothing import (
    ABSTAIN,
    SmoothedLogits,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    predict,
    radius_from_p_lower,
    sample_counts,
)
from medaudit.plugins.defenses.smoothing import (
    RandomizedSmoothing,
    RandomizedSmoothingParams,
)

SIGMA, N, ALPHA = 0.25, 20_000, 0.001


class LinearBinary(nn.Module):
    """Logits ``[0, w.x + b]`` on flattened inputs: class 1 where ``w.x + b > 0``. Under noise
    ``w.(x + d) + b ~ N(w.x + b, sigma^2 |w|^2)``, so the smoothed classifier's top-class
    probability is ``Phi(|w.x + b| / (sigma |w|))`` and its exact L2 radius ``|w.x + b| / |w|``."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, dim, generator=torch.Generator().manual_seed(seed)))
            self.linear.bias.fill_(-0.5 * float(self.linear.weight.sum()))  # the boundary passes through 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)

    def at_signed_distance(self, distances: list[float]) -> torch.Tensor:
        """Images (1 x 4 x 4) at the given signed L2 distances from the boundary (positive: class 1)."""
        w = self.linear.weight[0].detach()
        x = 0.5 + torch.tensor(distances)[:, None] * (w / w.norm())
        return x.view(-1, 1, 4, 4)


class Constant(nn.Module):
    """Always class ``label`` of ``classes``, whatever the noise."""

    def __init__(self, label: int, classes: int = 3):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), self.classes).float() * 5.0


@pytest.fixture(scope="module")
def linear():
    return LinearBinary(16)


DISTANCES = [-0.7, -0.45, -0.2, 0.2, 0.35, 0.5, 0.7]


def test_linear_certificates_are_sound_and_tight(linear):
    """Soundness: every certified radius is at most the exact one. Tightness: with K the count
    of the top class, K >= k_low = Binomial(N, pA).ppf(1e-6) but with probability 1e-6, and
    the Clopper-Pearson bound grows with K, so the radius is at least
    sigma * Phi^-1(CP(k_low)): the tolerance is the bound's own width at N draws (0.02 to
    0.07 here, widest near the largest radius N draws can certify, 0.85), not a guess."""
    x = linear.at_signed_distance(DISTANCES)
    cert = certify(linear, x, sigma=SIGMA, n0=100, n=N, alpha=ALPHA, batch=7000,
                   generator=torch.Generator().manual_seed(1))
    exact = torch.tensor(DISTANCES, dtype=torch.float64).abs()
    assert cert.prediction.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert (cert.radius <= exact).all(), (cert.radius, exact)
    p_exact = norm.cdf(exact.numpy() / SIGMA)
    k_low = torch.from_numpy(binom.ppf(1e-6, N, p_exact))
    smallest = radius_from_p_lower(clopper_pearson_lower(k_low, N, ALPHA), SIGMA)
    assert (cert.radius >= smallest).all(), (cert.radius, smallest)
    assert (exact - smallest).max() < 0.08  # the tolerance is small: the test can fail
    assert cert.settings() == {"sigma": SIGMA, "n0": 100, "n": N, "alpha": ALPHA}
    assert (cert.counts_top <= N).all() and cert.rows()[3]["prediction"] == 1


def test_radius_is_sigma_times_inverse_normal_of_p_lower(linear):
    p = torch.tensor([0.3, 0.5, norm.cdf(1.0), norm.cdf(2.0)], dtype=torch.float64)
    assert torch.allclose(radius_from_p_lower(p, 0.5), torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    cert = certify(linear, linear.at_signed_distance([0.3, -0.5]), sigma=SIGMA, n=2000,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cert.radius, SIGMA * torch.from_numpy(norm.ppf(cert.p_lower.numpy())))


def test_certain_class_gets_the_largest_radius_n_draws_allow():
    """A model that never changes its mind: K = n, p_lower = alpha^(1/n), for any class count."""
    x = torch.rand(3, 1, 4, 4)
    cert = certify(Constant(2), x, sigma=0.5, n0=10, n=500, alpha=0.01, batch=256,
                   generator=torch.Generator().manual_seed(0))
    p = 0.01 ** (1 / 500)
    assert cert.prediction.tolist() == [2, 2, 2] and cert.counts_top.tolist() == [500] * 3
    assert torch.allclose(cert.p_lower, torch.full((3,), p, dtype=torch.float64))
    assert torch.allclose(cert.radius, torch.full((3,), 0.5 * norm.ppf(p), dtype=torch.float64))


def test_abstains_on_the_boundary(linear):
    x = linear.at_signed_distance([0.0] * 4)
    cert = certify(linear, x, sigma=SIGMA, n=N, alpha=ALPHA, batch=10_000, generator=torch.Generator().manual_seed(2))
    assert (cert.p_lower <= 0.5).all()
    assert cert.prediction.tolist() == [ABSTAIN] * 4 and cert.abstained.all()
    assert (cert.radius == 0).all()
    assert set(cert.guess.tolist()) <= {0, 1}


def test_predict_returns_clear_classes_and_abstains_on_the_boundary(linear):
    x = linear.at_signed_distance([-0.5, 0.5, 0.0, 0.0])
    out = predict(linear, x, sigma=SIGMA, n=2000, alpha=ALPHA, generator=torch.Generator().manual_seed(0))
    assert out.prediction.tolist() == [0, 1, ABSTAIN, ABSTAIN]
    assert (out.p_value[:2] < 1e-100).all() and (out.p_value[2:] > ALPHA).all()
    assert (out.counts.sum(1) == 2000).all()


def test_clopper_pearson_lower_bound():
    n, alpha = 50, 0.05
    bounds = clopper_pearson_lower([0, 20, n], n, alpha)
    assert bounds[0] == 0 and math.isclose(bounds[2], alpha ** (1 / n), rel_tol=1e-12)
    # Its definition: the p at which K >= k has probability alpha.
    assert math.isclose(binom.sf(19, n, float(bounds[1])), alpha, rel_tol=1e-6)
    with pytest.raises(ValueError):
        clopper_pearson_lower([n + 1], n, alpha)


def test_certified_accuracy_by_hand():
    radii = [0.5, 0.2, 0.0, 1.0]
    predictions = [1, 0, ABSTAIN, 2]  # correct, wrong, abstained, correct
    labels = [1, 1, 0, 2]
    curve = certified_accuracy(radii, predictions, labels, [0.0, 0.5, 0.75, 1.0, 1.5])
    assert curve == [(0.0, 0.5), (0.5, 0.5), (0.75, 0.25), (1.0, 0.25), (1.5, 0.0)]
    with pytest.raises(ValueError):
        certified_accuracy([0.1], [1, 1], [1, 1], [0.0])


def test_counts_are_reproducible_under_a_fixed_generator(linear):
    x = linear.at_signed_distance([0.05, 0.1, -0.1])

    def counts(seed: int) -> torch.Tensor:
        return sample_counts(linear, x, SIGMA, 3000, 1000, torch.Generator().manual_seed(seed))

    first = counts(3)
    assert torch.equal(first, counts(3)) and not torch.equal(first, counts(4))
    assert (first.sum(1) == 3000).all() and first.shape == (3, 2)
    a = certify(linear, x, sigma=SIGMA, n=3000, generator=torch.Generator().manual_seed(5))
    b = certify(linear, x, sigma=SIGMA, n=3000, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("prediction", "radius", "p_lower", "counts_top"))


def test_noise_is_not_clamped_to_the_image_range():
    """The certificate is for the Gaussian itself: a boundary at 1.05, beyond the image range,
    is crossed from 0.95 with probability 1 - Phi(0.1 / sigma); clamped noise never crosses it."""
    model = LinearBinary(16)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.weight[0, 0] = 1.0
        model.linear.bias.fill_(-1.05)
    counts = sample_counts(model, torch.full((1, 1, 4, 4), 0.95), SIGMA, 4000, 4000, torch.Generator().manual_seed(0))
    assert abs(counts[0, 1].item() / 4000 - (1 - norm.cdf(0.1 / SIGMA))) < 0.03


def test_soft_smoothed_classifier_is_the_mean_softmax(linear):
    """On the linear model with hard-ish logits the mean softmax approaches pA = Phi(t / sigma)."""
    scaled = LinearBinary(16)
    with torch.no_grad():
        scaled.linear.weight.mul_(100)
        scaled.linear.bias.mul_(100)  # same boundary, near-hard softmax
    x = scaled.at_signed_distance([-0.2, 0.1, 0.3])
    soft = SmoothedLogits(scaled, SIGMA, 20_000)
    torch.manual_seed(0)
    out = soft(x)
    expected = torch.tensor(norm.cdf([-0.2 / SIGMA, 0.1 / SIGMA, 0.3 / SIGMA]), dtype=torch.float32)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out[:, 1].exp(), expected, atol=0.02), (out[:, 1].exp(), expected)
    small = SmoothedLogits(linear, SIGMA, 4)
    x_in = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(small(x_in)[:, 1].sum(), x_in)
    assert grad.isfinite().all() and grad.abs().sum() > 0


def test_defense_on_demo_model(demo_model, demo_data, host):
    torch.set_num_threads(1)  # many small passes: one thread is faster on a shared machine
    assert host.get("defense", "randomized-smoothing") is RandomizedSmoothing
    defense = RandomizedSmoothing(RandomizedSmoothingParams(sigma=0.01, n0=8, n=32, batch=40, attack_samples=4,
                                                            eot_samples=6, trained_sigma=0.01))
    defended = defense.apply(demo_model, demo_data)
    x = demo_data.images[:4]
    with torch.no_grad():
        first, second = defended.module(x), defended.module(x)
        eot = defended.view("eot")(x)
        base = demo_model.module(x).argmax(1)
    assert not torch.equal(first, second)  # randomised: fresh noise every pass
    for out in (first, second, eot):
        assert out.shape == (4, 2) and out.isfinite().all() and (out <= 0).all()
        assert torch.allclose(out.logsumexp(1), torch.zeros(4), atol=1e-4)  # log-probabilities
    assert set(RandomizedSmoothing.view_names()) == {"eot"} and defended.view("eot").samples == 6
    assert defense.caveats() == []

    cert = defense.certify(demo_model, x, torch.Generator().manual_seed(0))
    again = defense.certify(defended, x, torch.Generator().manual_seed(0))  # unwrapped to the base: same draws
    assert torch.equal(cert.counts_top, again.counts_top) and torch.equal(cert.prediction, again.prediction)
    # At a tiny sigma the smoothed classifier is the base classifier, certified at radius of order sigma.
    assert torch.equal(cert.prediction, base)
    assert ((cert.radius > 0) & (cert.radius < 4 * 0.01)).all()


def test_caveats_warn_about_a_base_model_not_trained_with_noise():
    assert "not trained with Gaussian noise" in RandomizedSmoothing(RandomizedSmoothingParams()).caveats()[0]
    assert "sigma=0.5" in RandomizedSmoothing(RandomizedSmoothingParams(trained_sigma=0.5)).caveats()[0]
    assert RandomizedSmoothing(RandomizedSmoothingParams(sigma=0.5, trained_sigma=0.5)).caveats() == []
