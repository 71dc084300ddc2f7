"""The corruption attacks: calibrated severities, worst of k seeded draws, MONAI's Rician
noise, and the spec's levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medaudit.core.components import AttackOutcome, Norm
from medaudit.core.quality import ssim
from medaudit.core.spec import load_spec
from medaudit.plugins.attacks._severities import SEVERITIES, TARGET_SSIM, severity_table
from medaudit.plugins.attacks.corruptions import CORRUPTIONS, RicianNoise, case_outcomes


def corrupt(cls, x, severity, model=None, y=None, seed=0, draws=1):
    attack = cls(cls.Params(draws=draws))
    model = model or (lambda t: torch.zeros(len(t), 2))
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return AttackOutcome.of(attack.perturb(model, x, y, eps=severity, norm=Norm.LINF,
                                           generator=torch.Generator().manual_seed(seed)))


def test_every_operation_has_a_calibrated_monotone_table():
    table = severity_table()
    assert set(table["corruptions"]) == set(CORRUPTIONS) and tuple(table["target_ssim"]) == TARGET_SSIM
    for name, entry in table["corruptions"].items():
        assert entry["parameters"] == sorted(entry["parameters"]), name
        assert all(a >= b - 1e-3 for a, b in zip(entry["ssim"], entry["ssim"][1:])), name  # SSIM falls
        for target, got, reached in zip(TARGET_SSIM, entry["ssim"], entry["reached"]):
            # The band's edge, or just past it: JPEG quality, k-space lines and pixel blocks are whole numbers,
            # so some operations' SSIM moves in steps.
            assert not reached or target - 0.05 < got <= target + 0.005, (name, target, got)


def test_a_severity_applies_its_table_parameter_and_records_it():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    table = severity_table()["corruptions"]["rician-noise"]["parameters"]
    for s in SEVERITIES:
        out = corrupt(RicianNoise, x, s)
        assert out.extras["corruption_strength"] == [table[int(s) - 1]] * 4
    similarity = [float(ssim(corrupt(RicianNoise, x, s).adversarial, x).mean()) for s in SEVERITIES]
    assert similarity == sorted(similarity, reverse=True)


def test_matches_monai_rician_noise_in_distribution():
    """Same intensity, same sigma: the mean and spread of our draws and of MONAI's
    RandRicianNoise (numpy, fixed std) agree within sampling error on 2^18 pixels."""
    from monai.transforms import RandRicianNoise

    sigma = RicianNoise.budget.limit(3.0)
    x = torch.full((1, 1, 512, 512), 0.3)
    ours = corrupt(RicianNoise, x, 3.0).adversarial.flatten().double()
    monai = RandRicianNoise(prob=1.0, std=sigma, sample_std=False)
    monai.set_random_state(0)
    theirs = torch.as_tensor(np.asarray(monai(x[0].numpy()))).flatten().double().clamp(0, 1)
    se = float(theirs.std()) / len(theirs) ** 0.5
    assert abs(float(ours.mean() - theirs.mean())) < 4 * se
    assert abs(float(ours.std() / theirs.std()) - 1) < 0.01
    assert float(ours.mean()) > 0.3  # Rician bias: the magnitude of noisy data is biased upwards


class Brightness(nn.Module):
    """Class 1 when the mean intensity is high: noise flips cases near the boundary."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], 1) * 50


def test_worst_of_k_is_never_better_than_the_mean_of_k_per_case():
    g = torch.Generator().manual_seed(0)
    x = (0.5 + 0.01 * torch.randn(64, 1, 16, 16, generator=g)).clamp(0, 1)  # near the boundary
    y = (x.flatten(1).mean(1) > 0.5).long()
    model = Brightness()
    one = corrupt(CORRUPTIONS["gaussian-noise"], x, 3.0, model, y, draws=1)
    many = corrupt(CORRUPTIONS["gaussian-noise"], x, 3.0, model, y, draws=8)
    worst = (model(many.adversarial).argmax(1) == y).double()
    mean = torch.tensor(many.extras["draws_mean"])
    assert (worst <= mean).all() and (worst < mean).any()  # some case survives most draws, not all
    assert worst.mean() <= (model(one.adversarial).argmax(1) == y).double().mean()
    again = corrupt(CORRUPTIONS["gaussian-noise"], x, 3.0, model, y, draws=8)
    assert torch.equal(again.adversarial, many.adversarial)  # seeded: the same draws, the same pick


def test_worst_of_k_for_segmentation_takes_the_lowest_dice():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0.5).long()

    def threshold(t):
        return torch.cat([0.5 - t, t - 0.5], 1) * 20

    out = corrupt(CORRUPTIONS["gaussian-noise"], x, 5.0, threshold, y, draws=6)
    worst, _ = case_outcomes(threshold(out.adversarial), y)
    assert (worst <= torch.tensor(out.extras["draws_mean"], dtype=worst.dtype) + 1e-12).all()
    assert out.adversarial.shape == x.shape


def test_a_deterministic_corruption_draws_once():
    calls = []

    def model(t):
        calls.append(len(t))
        return torch.zeros(len(t), 2)

    corrupt(CORRUPTIONS["contrast"], torch.rand(2, 1, 8, 8), 2.0, model, draws=5)
    assert calls == [2]


def test_an_rgb_corruption_refuses_grey_images():
    with pytest.raises(ValueError, match="RGB"):
        corrupt(CORRUPTIONS["stain-variation"], torch.rand(2, 1, 8, 8), 1.0)


def test_the_spec_refuses_a_severity_the_table_does_not_have(write_spec, host):
    from medaudit.core.errors import SpecError

    path = write_spec(attacks="attacks:\n  - name: gaussian-noise\n    levels: [1, 2.5, 7]")
    with pytest.raises(SpecError, match=r"severity levels 1, 2, 3, 4, 5 only \(not 2.5, 7\)"):
        load_spec(path, host)
