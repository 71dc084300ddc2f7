"""APGD and Square building blocks shared by ``autoattack`` and ``autoattack-seg``: the
APGD step-size search and its checkpoints, the DLR-targeted loss, and Square's schedule and
random boxes. Native torch, batched; see :mod:`.autoattack` for the references."""

from __future__ import annotations

from typing import Callable

from medaudit.core.components import Norm
from medaudit.core.lazy import torch
from medaudit.core.perturbation import ascent_step, project, random_start

#: ``objective(x_adv) -> (logits, per-sample loss, gradient of the summed loss)``.
Objective = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]


def col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector to broadcast against ``like``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def pick(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, cls[:, None]).squeeze(1)


def targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss APGD-T maximises, per sample: ``(z_t - z_y) / scale``.

    With 4 or more classes ``scale = z_pi1 - (z_pi3 + z_pi4) / 2`` (the targeted DLR loss;
    ``pi`` sorts the logits in decreasing order). DLR's scale needs the third largest logit,
    so with 3 classes ``scale = z_pi1 - z_pi3`` (the untargeted DLR scale), and with 2
    classes, where no scale exists, the loss is the plain logit margin ``z_t - z_y``.
    """
    z = logits.float()
    gap = pick(z, target) - pick(z, y)
    n_classes = z.shape[1]
    if n_classes < 3:
        return gap
    top = z.topk(min(n_classes, 4), dim=1).values
    third = top[:, 2] if n_classes == 3 else (top[:, 2] + top[:, 3]) / 2
    return gap / (top[:, 0] - third + 1e-12)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The untargeted DLR loss APGD-DLR maximises, per sample: ``-(z_y - max_{i != y} z_i) / scale``
    with ``scale = z_pi1 - z_pi3`` (``pi`` sorts the logits in decreasing order), invariant to
    shifts and rescalings of the logits. With 2 classes no third logit exists and the loss is
    the unscaled negative margin (the CW loss), as :func:`targeted_loss` does."""
    z = logits.float()
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    gap = others - pick(z, y)
    if z.shape[1] < 3:
        return gap
    top = z.topk(3, dim=1).values
    return gap / (top[:, 0] - top[:, 2] + 1e-12)


def eot_objective(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], draws: int = 1) -> Objective:
    """The APGD objective of ``model`` under ``loss_fn(logits) -> per-sample loss``: logits,
    loss and input gradient, each averaged over ``draws`` forward passes (Expectation over
    Transformation, Athalye et al. 2018: a randomised model's gradient is estimated by the
    mean over its random draws, 20 in AutoAttack's ``rand`` version). The reference steps on
    the mean gradient and judges the step size by the last draw's loss; here the loss and the
    logits the iterate is judged by are means too. One draw: the plain gradient."""

    def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_sum = loss_sum = grad_sum = None
        for _ in range(draws):
            xg = x_adv.detach().requires_grad_(True)
            logits = model(xg)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
            logits, loss = logits.detach(), loss.detach()
            if logits_sum is None:
                logits_sum, loss_sum, grad_sum = logits, loss, grad
            else:
                logits_sum, loss_sum, grad_sum = logits_sum + logits, loss_sum + loss, grad_sum + grad
        if draws == 1:
            return logits_sum, loss_sum, grad_sum
        return logits_sum / draws, loss_sum / draws, grad_sum / draws

    return objective


def checkpoints(steps: int) -> set[int]:
    """APGD's step-size checkpoints ``ceil(p_j * steps)``: p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (in hundredths, to stay exact)."""
    prev, cur, out = 0, 22, set()
    while cur <= 100:
        out.add(-(-cur * steps // 100))
        prev, cur = cur, cur + max(cur - prev - 3, 6)
    return out - {0}


#: ``score(logits, loss) -> per-sample score``: lower is better for the attacker; APGD
#: returns, per sample, the first iterate that reached its lowest score.
Score = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def apgd_search(
    objective: Objective, x: torch.Tensor, *, eps: float, norm: Norm, steps: int, rho: float,
    generator: torch.Generator, score: Score,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start (the step-size schedule follows the loss).

    Returns, per sample, the first iterate with the lowest ``score``, that score, and the
    highest loss reached. Classification scores the first misclassified iterate lowest
    (see :func:`apgd`); segmentation scores iterates by their Dice.
    """
    x_adv = random_start(x, eps, norm, generator)
    logits, loss, grad = objective(x_adv)
    x_keep, keep = x_adv.clone(), score(logits, loss)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()

    # Step size 2 * eps, halved per sample at the checkpoints.
    step = col(torch.full_like(loss, 2 * eps), x)
    checks, last_check = checkpoints(steps), 0
    loss_prev, n_increased = loss, torch.zeros_like(loss)
    loss_best_at_check = loss_best.clone()
    halved_at_check = torch.ones_like(loss, dtype=torch.bool)  # so the second rule cannot fire at the first checkpoint
    x_prev = x_adv
    for i in range(steps):
        # Heavy-ball step: alpha = 0.75, except the first step (alpha = 1).
        alpha = 0.75 if i > 0 else 1.0
        z = project(ascent_step(x_adv, grad, step, norm), x, eps, norm)
        x_prev, x_adv = x_adv, project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev), x, eps, norm)

        logits, loss, grad = objective(x_adv)
        current = score(logits, loss)
        lower = current < keep
        x_keep = torch.where(col(lower, x), x_adv, x_keep)
        keep = torch.where(lower, current, keep)
        better = loss > loss_best
        x_best = torch.where(col(better, x), x_adv, x_best)
        grad_best = torch.where(col(better, x), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        n_increased += loss > loss_prev
        loss_prev = loss

        if i + 1 in checks:
            # Halve where fewer than rho of the steps since the last checkpoint raised the
            # loss (the reference tests <=, the paper <), or where the step was not halved
            # last time and the best loss has not improved since; restart those from x_best.
            few_gains = n_increased < rho * (i + 1 - last_check)
            stalled = ~halved_at_check & (loss_best <= loss_best_at_check)
            halve = few_gains | stalled
            step = torch.where(col(halve, x), step / 2, step)
            x_adv = torch.where(col(halve, x), x_best, x_adv)
            grad = torch.where(col(halve, x), grad_best, grad)
            halved_at_check, loss_best_at_check = halve, loss_best.clone()
            n_increased = torch.zeros_like(n_increased)
            last_check = i + 1
    return x_keep.detach(), keep, loss_best


def apgd(
    objective: Objective, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm, steps: int, rho: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start, for classification.

    Returns, per sample, the first iterate that is misclassified (else the highest-loss
    iterate), whether one was, and the highest loss reached.
    """

    def score(logits, loss):
        # -inf once misclassified (the first such iterate is kept), else -loss (the
        # highest-loss iterate is kept); an infinite loss stays above -inf.
        return torch.where(logits.argmax(1) != y, float("-inf"), (-loss).clamp_min(torch.finfo(loss.dtype).min))

    x_adv, keep, loss_best = apgd_search(
        objective, x, eps=eps, norm=norm, steps=steps, rho=rho, generator=generator, score=score
    )
    return x_adv, torch.isneginf(keep), loss_best


def p_schedule(i: int, queries: int, p_init: float, rescale: bool = True) -> float:
    """Fraction of the pixels the square covers at iteration ``i``: the reference schedule
    for 10,000 queries (halve after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000),
    rescaled to ``queries`` unless ``rescale`` is False."""
    it = int(i / queries * 10_000) if rescale else i
    halvings = sum(it > b for b in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def random_boxes(n: int, spatial: torch.Size, side: int, generator: torch.Generator, device) -> tuple:
    """A random cube of ``side`` per sample, inside the image: its mask ``n x 1 x *spatial``
    and, per axis, each pixel's coordinate inside the cube (clamped outside it)."""
    inside, local = None, []
    for axis, size in enumerate(spatial):
        start = torch.randint(0, size - side + 1, (n, 1), generator=generator, device=device)
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = size
        pos = (torch.arange(size, device=device) - start).view(shape)
        ok = (pos >= 0) & (pos < side)
        inside = ok if inside is None else inside & ok
        local.append(pos.clamp(0, side - 1))
    return inside.unsqueeze(1), local
