"""Small helpers shared by the attack tests."""

from __future__ import annotations

import torch

from medaudit.core.components import Norm


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def run(attack, model, x, y, eps, norm=Norm.LINF, seed=0):
    """``attack.perturb`` with a fresh CPU generator seeded with ``seed``."""
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))
