"""Built-in white-box gradient attacks: ``fgsm`` and ``pgd`` (L-inf and L2).

Native torch, batched, on the model's device for the whole loop: no numpy and no
per-step host synchronisation. Gradients are taken w.r.t. the input only (the runner
freezes the model's parameters). Images are in [0, 1]; epsilon is in that unit.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Attack, Norm, Params, Task
from medaudit.core.perturbation import WorstIterate, ascent_step, input_gradient, project, random_start


LOSS_DESCRIPTION = (
    "Segmentation loss to ascend: per-pixel cross-entropy averaged over the image ('ce') or the "
    "soft Dice loss ('dice'). Classification always uses cross-entropy."
)


class FGSMParams(Params):
    loss: Literal["ce", "dice"] = Field("ce", description=LOSS_DESCRIPTION)


class FGSM(Attack):
    """Fast Gradient Sign Method: one step of size eps along the loss gradient's sign.

    Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015, https://arxiv.org/abs/1412.6572. Untargeted, white box (gradients).
    L-inf: ``x + eps * sign(grad)``; L2 (the fast gradient method): ``x + eps * grad / ||grad||``.
    Task-aware: for segmentation the loss is the per-pixel cross-entropy averaged over the
    image (or the soft Dice loss, ``loss: dice``). Works on 2D images and 3D volumes.
    """

    name = "fgsm"
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    Params = FGSMParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        if eps == 0:
            return x.clone()
        _, grad = input_gradient(model, x, y, self.params.loss)
        return project(ascent_step(x, grad, eps, norm), x, eps, norm)


class PGDParams(Params):
    steps: int = Field(10, ge=1, le=10_000, description="Gradient steps per restart.")
    step_size: float | None = Field(
        None, gt=0, description="Step size in pixel units; default 2.5 * eps / steps (Madry et al.)."
    )
    random_start: bool = Field(True, description="Start from a random point of the eps-ball.")
    restarts: int = Field(1, ge=1, le=100, description="Independent restarts; each sample keeps its worst case.")
    loss: Literal["ce", "dice"] = Field("ce", description=LOSS_DESCRIPTION)


class PGD(Attack):
    """Projected Gradient Descent on the cross-entropy loss, with random start and restarts.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018, https://arxiv.org/abs/1706.06083. Untargeted, white box (gradients),
    L-inf (sign steps) or L2 (normalised-gradient steps). Defaults: 10 steps of
    2.5 * eps / 10, one random start. Every iterate is checked: a sample keeps the first
    iterate that fools the model, in any restart (so more restarts never weaken it).
    Task-aware: for segmentation it ascends the per-pixel cross-entropy averaged over the
    image (ROG's volumetric loss; or the soft Dice loss, ``loss: dice``) and each case
    keeps the iterate with the lowest foreground Dice. Works on 2D images and 3D volumes.
    """

    name = "pgd"
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    Params = PGDParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: PGDParams = self.params
        if eps == 0:
            return x.clone()
        step = p.step_size if p.step_size is not None else 2.5 * eps / p.steps
        worst = WorstIterate(x, y)
        for restart in range(p.restarts):
            x_adv = random_start(x, eps, norm, generator) if p.random_start else x.clone()
            for _ in range(p.steps):
                logits, grad = input_gradient(model, x_adv, y, p.loss)
                worst.observe(x_adv, logits)
                x_adv = project(ascent_step(x_adv, grad, step, norm), x, eps, norm)
            if restart < p.restarts - 1:
                # The last iterate is judged here only when another restart could replace it.
                with torch.no_grad():
                    worst.observe(x_adv, model(x_adv))
        return worst.result(model, x_adv)


@hookimpl
def register_attacks(register):
    register(FGSM)
    register(PGD)
