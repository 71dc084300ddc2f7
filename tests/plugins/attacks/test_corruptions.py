"""Rician noise, the first corruption: MONAI's distribution, severity that grows, any shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaudit.core.components import AttackOutcome, Norm
from medaudit.plugins.attacks.corruptions import RICIAN_SIGMA_PER_SEVERITY, RicianNoise


def noisy(x, severity, seed=0):
    out = RicianNoise().perturb(None, x, None, eps=severity, norm=Norm.LINF, generator=torch.Generator().manual_seed(seed))
    return AttackOutcome.of(out)


def test_matches_monai_rician_noise_in_distribution():
    """Same intensity, same sigma: the mean and spread of our draws and of MONAI's
    RandRicianNoise (numpy, fixed std) agree within sampling error on 2^18 pixels."""
    from monai.transforms import RandRicianNoise

    sigma = RICIAN_SIGMA_PER_SEVERITY * 3
    x = torch.full((1, 1, 512, 512), 0.3)
    ours = noisy(x, 3).adversarial.flatten().double()
    monai = RandRicianNoise(prob=1.0, std=sigma, sample_std=False)
    monai.set_random_state(0)
    theirs = torch.as_tensor(np.asarray(monai(x[0].numpy()))).flatten().double().clamp(0, 1)
    se = float(theirs.std()) / len(theirs) ** 0.5
    assert abs(float(ours.mean() - theirs.mean())) < 4 * se
    assert abs(float(ours.std() / theirs.std()) - 1) < 0.01
    assert float(ours.mean()) > 0.3  # Rician bias: the magnitude of noisy data is biased upwards


def test_severity_raises_the_noise_and_is_recorded():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    errors = []
    for s in (1, 2, 3, 4, 5):
        out = noisy(x, s)
        assert out.extras["noise_std"] == [pytest.approx(RICIAN_SIGMA_PER_SEVERITY * s)] * 4
        errors.append(float((out.adversarial - x).pow(2).mean()))
    assert errors == sorted(errors) and errors[-1] > 10 * errors[0]


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 8, 16, 16)])
def test_keeps_2d_and_3d_shapes_and_range(shape):
    x = torch.rand(shape)
    out = noisy(x, 5).adversarial
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, noisy(x, 5).adversarial) and not torch.equal(out, noisy(x, 5, seed=1).adversarial)
