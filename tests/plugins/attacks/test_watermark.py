"""The ``watermark`` attack: Krawtchouk moments, QIM embedding, budget, black-box search."""

from __future__ import annotations

import math

import pytest
import torch

import medaudit.plugins.attacks.watermark as wm
from medaudit.core.components import Access, Norm
from medaudit.core.host import get_host
from medaudit.core.models import CallCounter
from medaudit.core.perturbation import project


class NoGradients(torch.nn.Module):
    """Fails if the attack runs the model with autograd enabled."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        if torch.is_grad_enabled():
            raise AssertionError("the watermark attack must not use gradients")
        return self.module(x)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_budget(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()


# -- Krawtchouk moments -----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_krawtchouk_matrix_is_orthonormal(p):
    K = wm.krawtchouk_matrix(64, p)
    assert K.shape == (64, 64) and K.dtype == torch.float64
    assert torch.allclose(K.T @ K, torch.eye(64, dtype=torch.float64), atol=1e-10)


def test_krawtchouk_first_orders_match_the_closed_form():
    N, p = 64, 0.5
    K = wm.krawtchouk_matrix(N, p)
    x = torch.arange(N, dtype=torch.float64)
    w = torch.tensor([math.comb(N - 1, int(i)) * p**i * (1 - p) ** (N - 1 - i) for i in x.tolist()], dtype=torch.float64)
    assert torch.allclose(K[:, 0], w.sqrt(), atol=1e-14)
    rho1 = (1 - p) / (p * (N - 1))
    assert torch.allclose(K[:, 1], (1 - x / (p * (N - 1))) * (w / rho1).sqrt(), atol=1e-13)


def test_large_sizes_stay_orthonormal_and_agree_with_the_recurrence_at_low_orders():
    # At N = 128 the plain n-recurrence has broken down (p = 0.5); the Jacobi fallback takes over.
    K = wm.krawtchouk_matrix(128, 0.5)
    assert torch.allclose(K.T @ K, torch.eye(128, dtype=torch.float64), atol=1e-10)
    R = wm._recurrence(128, 0.5)
    assert torch.allclose(K[:, :8], R[:, :8], atol=1e-12)


def test_full_order_moments_reconstruct_a_non_square_image():
    img = torch.rand(2, 1, 48, 64, generator=gen(), dtype=torch.float64)
    kr, kc = wm.krawtchouk_matrix(48), wm.krawtchouk_matrix(64, 0.4)
    q = wm.moments(img, kr, kc)
    assert q.shape == img.shape
    assert torch.allclose(wm.reconstruct(q, kr, kc), img, atol=1e-12)


def test_zigzag_selection_skips_the_mean_and_respects_the_shape():
    rows, cols = wm.zigzag_indices(4, 3, 11)
    pairs = list(zip(rows.tolist(), cols.tolist()))
    assert (0, 0) not in pairs and len(set(pairs)) == 11
    assert pairs[:2] == [(0, 1), (1, 0)]
    assert all(n < 4 and m < 3 for n, m in pairs)
    assert [n + m for n, m in pairs] == sorted(n + m for n, m in pairs)
    with pytest.raises(ValueError):
        wm.zigzag_indices(4, 3, 12)


# -- QIM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.05, 0.4])
def test_embedded_bits_are_extracted_from_the_unclipped_image(delta):
    x = torch.rand(3, 2, 32, 48, generator=gen(1))
    bits = (torch.rand(3, 2, 200, generator=gen(2)) < 0.5).float()
    keys = torch.rand(3, 2, 200, generator=gen(3))
    marked = wm.embed(x, bits, keys, delta)
    assert torch.equal(wm.extract(marked, keys, delta), bits.long())
    # Each selected moment moves by at most delta / 2, the others not at all (Parseval).
    change = (marked - x.double()).flatten(2).norm(dim=2)
    assert (change <= delta / 2 * math.sqrt(200) + 1e-9).all()


def test_qim_embed_lands_on_the_dithered_lattice():
    q = torch.randn(1000, generator=gen(), dtype=torch.float64) * 3
    bits = (torch.rand(1000, generator=gen(1)) < 0.5).double()
    keys = torch.rand(1000, generator=gen(2), dtype=torch.float64)
    out = wm.qim_embed(q, bits, keys, 0.5)
    assert ((out - q).abs() <= 0.25 + 1e-12).all()
    assert torch.equal(wm.qim_extract(out, keys, 0.5), bits.long())


# -- image quality ---------------------------------------------------------------------------


def test_psnr_and_ssim():
    a = torch.rand(2, 1, 32, 32, generator=gen())
    assert torch.isinf(wm.psnr(a, a)).all()
    assert torch.allclose(wm.ssim(a, a), torch.ones(2, dtype=torch.float64))
    b = (a + 0.1).clamp(0, 1)
    mse = (a - b).double().pow(2).flatten(1).mean(1)
    assert torch.allclose(wm.psnr(a, b), 10 * torch.log10(1 / mse))
    noisy = (a + 0.3 * torch.randn(a.shape, generator=gen(1))).clamp(0, 1)
    assert (wm.ssim(a, noisy) < wm.ssim(a, b)).all()


# -- the attack ------------------------------------------------------------------------------


def small():
    return wm.Watermark(wm.WatermarkParams(lengths=[64, 256], strengths=[0.2, 0.8]))


@pytest.mark.parametrize("norm, eps", [(Norm.LINF, 4 / 255), (Norm.L2, 0.5)])
def test_budget_range_and_determinism(demo_model, demo_data, norm, eps):
    model, x, y = NoGradients(demo_model.module), demo_data.images[:8], demo_data.labels[:8]
    a = small()
    x1 = a.perturb(model, x, y, eps=eps, norm=norm, generator=gen(5))
    check_budget(x1, x, eps, norm)
    x2 = small().perturb(model, x, y, eps=eps, norm=norm, generator=gen(5))
    assert torch.equal(x1, x2)
    assert a.last_psnr.shape == a.last_ssim.shape == a.last_fooled.shape == (8,)


def test_eps_zero_is_the_identity(demo_model, demo_data):
    x, y = demo_data.images[:4], demo_data.labels[:4]
    a = small()
    assert torch.equal(a.perturb(demo_model.module, x, y, eps=0.0, norm=Norm.LINF, generator=gen()), x)
    assert torch.isinf(a.last_psnr).all() and not a.last_fooled.any()


def test_flips_predictions_on_the_demo_model_with_good_image_quality(demo_model, demo_data, caplog):
    model, x, y = NoGradients(demo_model.module), demo_data.images[:32], demo_data.labels[:32]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    a = wm.Watermark()
    with caplog.at_level("INFO", logger=wm.__name__):
        x_adv = a.perturb(model, x, y, eps=8 / 255, norm=Norm.LINF, generator=gen())
    check_budget(x_adv, x, 8 / 255, Norm.LINF)
    with torch.no_grad():
        adv = model(x_adv).argmax(1) == y
    # Observed: clean accuracy 1.0, about half of the samples fooled (0.55 on 64 samples).
    assert clean.float().mean() > 0.9
    assert (clean & ~adv).float().mean() >= 0.25
    assert torch.equal(a.last_fooled, ~adv)
    changed = (x_adv != x).flatten(1).any(1)
    assert torch.isfinite(a.last_psnr[changed]).all() and (a.last_psnr[changed] > 20).all()
    assert (a.last_ssim > 0.5).all()
    assert (a.last_grid_index[a.last_fooled] >= 0).all() and (a.last_grid_index[~a.last_fooled] == -1).all()
    assert "mean PSNR" in caplog.text


class OneAtATime(torch.nn.Module):
    """Runs the model on one sample at a time, so a sample's logits do not depend on the
    batch it came in (a batched model's rounding can differ in the last bits with its size)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([self.inner(x[i : i + 1]) for i in range(len(x))])


def search_every_sample(attack, model, x, y, eps, norm, generator):
    """The grid search as it was before it left the fooled samples out: every grid point
    watermarks and queries the whole batch and masks the fooled samples."""
    p = attack.params
    n, c = x.shape[:2]
    l_max = max(length for length, _ in attack.grid)
    bits = (torch.rand((n, c, l_max), generator=generator) < 0.5).to(torch.float64)
    keys = torch.rand((n, c, l_max), generator=generator).to(torch.float64)
    out, fooled, index = x.clone(), torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
    for i, (length, delta) in enumerate(attack.grid):
        marked = wm.embed(x, bits[..., :length], keys[..., :length], delta, p_rows=p.p_rows, p_cols=p.p_cols)
        cand = project(marked.clamp(0, 1).to(x.dtype), x, eps, norm)
        newly = (model(cand).argmax(1) != y) & ~fooled
        out = torch.where(fooled.view(-1, 1, 1, 1), out, cand)
        index = torch.where(newly, i, index)
        fooled |= newly
        if bool(fooled.all()):
            break
    return out, fooled, index


@pytest.mark.parametrize("norm, eps", [(Norm.LINF, 8 / 255), (Norm.L2, 2.0)])
def test_queries_only_the_samples_not_fooled_yet_with_the_same_result(demo_model, demo_data, norm, eps):
    model, x, y = OneAtATime(NoGradients(demo_model.module)), demo_data.images[:32], demo_data.labels[:32]
    every, fewer = CallCounter(model), CallCounter(model)
    a = wm.Watermark()
    with torch.no_grad():
        out, fooled, index = search_every_sample(a, every, x, y, eps, norm, gen(3))
    x_adv = a.perturb(fewer, x, y, eps=eps, norm=norm, generator=gen(3))
    assert torch.equal(x_adv, out) and torch.equal(a.last_fooled, fooled) and torch.equal(a.last_grid_index, index)
    assert fooled.any() and not fooled.all()  # some samples leave the search early, some run the whole grid
    # Measured on this model: 0.79 of the every-sample search's model calls (L-inf), 0.69 (L2).
    assert fewer.samples <= 0.85 * every.samples, (fewer.samples, every.samples)


def test_stronger_delta_gives_lower_psnr(demo_model, demo_data):
    x, y = demo_data.images[:8], demo_data.labels[:8]
    psnrs = []
    for delta in (0.1, 0.4, 1.2):
        a = wm.Watermark(wm.WatermarkParams(lengths=[256], strengths=[delta]))
        a.perturb(demo_model.module, x, y, eps=1.0, norm=Norm.LINF, generator=gen())  # budget not binding
        psnrs.append(a.last_psnr.mean().item())
    assert psnrs[0] > psnrs[1] > psnrs[2]


def test_grid_is_ordered_by_expected_distortion_and_lengths_are_checked(demo_model, demo_data):
    a = wm.Watermark(wm.WatermarkParams(lengths=[16, 256], strengths=[0.8, 0.1]))
    assert a.grid == [(16, 0.1), (256, 0.1), (16, 0.8), (256, 0.8)]
    too_long = wm.Watermark(wm.WatermarkParams(lengths=[64 * 64]))
    with pytest.raises(ValueError):
        too_long.perturb(demo_model.module, demo_data.images[:2], demo_data.labels[:2], eps=0.1, norm=Norm.LINF,
                         generator=gen())
    with pytest.raises(ValueError):
        wm.WatermarkParams(strengths=[0.0])


def test_registration():
    host = get_host(load_entry_points=False)  # a built-in
    cls = host.components["attack"]["watermark"]
    assert cls is wm.Watermark
    assert cls.needs is Access.DECISIONS and cls.norms == {Norm.LINF, Norm.L2} and cls.dims == {2}
    assert not cls.targeted
    assert cls.summary().startswith("Watermarking attack")
