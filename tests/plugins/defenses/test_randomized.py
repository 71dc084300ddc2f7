"""The random-resize-pad defense (Xie et al. 2018): randomized, reproducible, and weaker
under EOT (Athalye et al. 2018) than a naive attack makes it look."""

from __future__ import annotations

import torch

from medaudit.core.components import Norm
from medaudit.plugins.attacks.gradient import PGD, PGDParams
from medaudit.plugins.defenses.randomized import RandomResizePad, RandomResizePadParams, random_resize_pad


def test_transform_sizes_and_padding():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 20, 20) + 1  # no zero pixel: zeros in the output are padding
    out = random_resize_pad(x, 0.5)
    assert out.shape == (6, 1, 30, 30)
    kept = (out > 0).flatten(1).sum(1)
    assert ((kept >= 400) & (kept <= 900)).all() and len(set(kept.tolist())) > 1  # sizes drawn per image
    assert random_resize_pad(x, 0.5, restore_size=True).shape == x.shape


def test_defended_model_is_randomized_but_reproducible(demo_model, demo_data):
    defended = RandomResizePad(RandomResizePadParams(restore_size=True)).apply(demo_model, demo_data)
    x = demo_data.images[:16]

    def forward(module, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return module(x)

    assert not torch.allclose(forward(defended.module, 0), forward(defended.module, 1))
    assert torch.equal(forward(defended.module, 0), forward(defended.module, 0))
    assert torch.equal(forward(defended.view("eot"), 3), forward(defended.view("eot"), 3))
    assert set(RandomResizePad.view_names()) == {"eot"} and set(defended.views) == {"eot"}


def test_eot_view_averages_draws(demo_model, demo_data):
    p = RandomResizePadParams(restore_size=True, eot_samples=4)
    defended = RandomResizePad(p).apply(demo_model, demo_data)
    x = demo_data.images[:5]
    torch.manual_seed(7)
    with torch.no_grad():
        draws = torch.stack([defended.module(x) for _ in range(4)])
    torch.manual_seed(7)
    with torch.no_grad():
        eot = defended.view("eot")(x)
    # The view draws all k samples in one pass (k x N images), so its draws differ from
    # four separate passes; it must still be a mean of draws: within their range.
    assert eot.shape == draws.shape[1:]
    assert (eot >= draws.amin(0) - 1).all() and (eot <= draws.amax(0) + 1).all()


def test_eot_attack_is_stronger_than_naive(demo_model, demo_data):
    """PGD on one draw's gradient overstates the defense; PGD through EOT finds more."""
    defended = RandomResizePad(RandomResizePadParams(restore_size=True, eot_samples=6)).apply(demo_model, demo_data)
    x, y = demo_data.images[:32], demo_data.labels[:32]

    def robust_accuracy(view: str) -> float:
        torch.manual_seed(0)
        x_adv = PGD(PGDParams(steps=8)).perturb(
            defended.view(view), x, y, eps=4 / 255, norm=Norm.LINF, generator=torch.Generator().manual_seed(0)
        )
        torch.manual_seed(1)  # the deployed system scores both with the same draws
        with torch.no_grad():
            return (defended.module(x_adv).argmax(1) == y).float().mean().item()

    naive, eot = robust_accuracy("naive"), robust_accuracy("eot")
    assert eot < naive - 0.1, (naive, eot)
