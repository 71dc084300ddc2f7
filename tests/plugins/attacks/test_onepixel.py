"""The one-pixel attack: pixel budget, range, eps rules, determinism, strength, no gradients."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import Access, Norm
from medaudit.core.host import get_host
from medaudit.plugins.attacks.onepixel import OnePixel, OnePixelParams

#: Small enough for two shared CPU cores: 8 images x 8 candidates x 4 evaluations.
SMALL = dict(pixels=3, population=8, generations=3)


def run(attack, model, x, y, eps, norm=Norm.LINF, seed=0):
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))


def true_prob(model, x, y):
    with torch.inference_mode():
        return model(x).softmax(1).gather(1, y[:, None]).squeeze(1)


@pytest.fixture
def xy(demo_data):
    return demo_data.images[:8], demo_data.labels[:8]


@pytest.mark.parametrize(
    "norm,eps,pixels",
    [(Norm.LINF, 8 / 255, 3), (Norm.LINF, 1.0, 3), (Norm.LINF, 1.0, 1), (Norm.L0, 3 / (64 * 64), 3)],
)
def test_pixel_budget_range_and_linf_bound(norm, eps, pixels, demo_model, xy):
    x, y = xy
    x_adv = run(OnePixel(OnePixelParams(**{**SMALL, "pixels": pixels})), demo_model.module, x, y, eps, norm)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    changed = ((x_adv - x).abs().amax(1) > 0).flatten(1).sum(1)  # positions where any channel changed
    assert (changed <= pixels).all(), changed
    assert (changed > 0).any()  # it did perturb
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm is Norm.LINF:
        assert (x_adv - x).abs().max() <= eps + 1e-6


def test_l0_requires_pixels_within_eps_fraction(demo_model, xy):
    x, y = xy
    attack = OnePixel(OnePixelParams(**SMALL))  # 3 pixels of 64 x 64
    with pytest.raises(ValueError, match="fraction of pixels"):
        run(attack, demo_model.module, x, y, 2 / (64 * 64), Norm.L0)
    with pytest.raises(ValueError, match="l0 or linf"):
        run(attack, demo_model.module, x, y, 1.0, Norm.L2)
    with pytest.raises(ValueError, match="2D"):
        run(attack, demo_model.module, x[:, :, None], y, 1.0)


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L0])
def test_eps_zero_leaves_inputs_unchanged(norm, demo_model, xy):
    x, y = xy
    assert torch.equal(run(OnePixel(OnePixelParams(**SMALL)), demo_model.module, x, y, 0.0, norm), x)


def test_deterministic_under_a_fixed_seed(demo_model, xy):
    x, y = xy
    attack = OnePixel(OnePixelParams(**SMALL))
    a = run(attack, demo_model.module, x, y, 1.0, seed=7)
    b = run(attack, demo_model.module, x, y, 1.0, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(attack, demo_model.module, x, y, 1.0, seed=8))


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 1.0), (Norm.L0, 3 / (64 * 64))])
def test_fools_some_samples_and_never_raises_the_true_class_probability(norm, eps, demo_model, xy):
    model, (x, y) = demo_model.module, xy
    clean = true_prob(model, x, y)
    assert (clean > 0.5).all()  # all 8 are classified correctly before the attack
    x_adv = run(OnePixel(OnePixelParams(**SMALL)), model, x, y, eps, norm)
    adv = true_prob(model, x_adv, y)
    # Observed: 3 of 8 fooled (the three 'normal' slices: a few bright pixels read as a
    # nodule; the 'nodule' slices resist 3 pixels), with seeds 0 and 1. Margin: >= 2.
    with torch.inference_mode():
        fooled = (model(x_adv).argmax(1) != y).sum().item()
    assert fooled >= 2, fooled
    assert (adv <= clean + 1e-5).all(), adv - clean
    assert (adv < clean).sum() >= 3  # observed 6 of 8 lowered (saturated ones may keep x)


class NoGradModel(torch.nn.Module):
    """Refuses to run with autograd on: a score-based attack must not need it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        if torch.is_grad_enabled() or x.requires_grad:
            raise AssertionError("onepixel ran the model with gradients enabled")
        self.calls += 1
        return self.inner(x)


def test_never_needs_gradients(demo_model, xy):
    x, y = xy
    model = NoGradModel(demo_model.module)
    x_adv = run(OnePixel(OnePixelParams(**SMALL)), model, x, y, 1.0)
    assert model.calls > 1 and not x_adv.requires_grad
    assert OnePixel.needs is Access.SCORES


def test_registered_with_its_threat_model():
    host = get_host(load_entry_points=False)  # a built-in
    cls = host.components["attack"]["onepixel"]
    assert cls is OnePixel
    assert cls.norms == frozenset({Norm.L0, Norm.LINF}) and cls.dims == frozenset({2})
    assert cls.needs is Access.SCORES and not cls.targeted
    assert cls.summary().startswith("One-pixel attack")
