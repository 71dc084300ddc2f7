"""An example vendor plugin, installed in tests through the ``medaudit`` entry-point group."""

import torch

from medaudit import hookimpl
from medaudit.core.components import Access, Attack, Norm, Params


class RandomSignNoise(Attack):
    """Random +-eps noise on every pixel: a decision-free baseline attack."""

    name = "random-sign"
    norms = frozenset({Norm.LINF})
    needs = Access.DECISIONS
    Params = Params

    def perturb(self, model, x, y, *, eps, norm, generator):
        signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return (x + eps * signs).clamp(0, 1)


@hookimpl
def register_attacks(register):
    register(RandomSignNoise)
