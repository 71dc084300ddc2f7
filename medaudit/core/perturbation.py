"""What attacks share: steps, projections and random starts under a norm (each delegates to
the norm's object in :mod:`medaudit.core.norms`), losses, margins and the worst iterate.

Images are in [0, 1]; every function keeps its result there.
"""

from __future__ import annotations

from medaudit.core.components import Norm
from medaudit.core.lazy import F, torch
from medaudit.core.norms import norm_of, per_sample_l2  # noqa: F401  (per_sample_l2: re-exported for attacks)
from medaudit.core.segmentation import dense_cross_entropy, dice_per_class, foreground_mean, is_dense, soft_dice_loss


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step: float, norm: Norm) -> torch.Tensor:
    """One steepest-ascent step of size ``step`` under ``norm`` (see :mod:`medaudit.core.norms`)."""
    return norm_of(norm).step(x_adv, grad, step)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project onto the eps-ball of ``norm`` around ``x`` intersected with the valid range [0, 1]."""
    return norm_of(norm).project(x_adv, x, eps)


def random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """A random point of the eps-ball of ``norm`` around ``x``, clipped to [0, 1]."""
    return norm_of(norm).random_start(x, eps, generator)


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The loss an untargeted attack ascends, per sample: cross-entropy for labels; for
    label maps the per-pixel cross-entropy averaged over the image (``loss="ce"``) or the
    soft Dice loss (``loss="dice"``)."""
    if not is_dense(y):
        return F.cross_entropy(logits.float(), y, reduction="none")
    return soft_dice_loss(logits, y) if loss == "dice" else dense_cross_entropy(logits, y)


def input_gradient(
    model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient of the summed per-sample loss w.r.t. the input."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    (grad,) = torch.autograd.grad(per_sample_loss(logits, y, loss).sum(), x_adv)
    return logits.detach(), grad


def attacker_score(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How well the model still does on each sample; an untargeted attack keeps, per sample,
    the iterate with the lowest score. Labels: the logit margin, ``-inf`` once misclassified
    (so the first fooling iterate is kept); label maps: the foreground Dice of the prediction."""
    if is_dense(y):
        return foreground_mean(dice_per_class(logits.argmax(1), y, logits.shape[1]))
    m = margin(logits, y)
    return torch.where(logits.argmax(1) != y, torch.full_like(m, float("-inf")), m)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i``: positive while the sample is classified correctly."""
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return logits.gather(1, y[:, None]).squeeze(1) - others


class WorstIterate:
    """Keeps, per sample, the iterate on which the model does worst (lowest
    :func:`attacker_score`): for labels the first one that fools it, for label maps the
    one with the lowest Dice. Checking every iterate means more steps never weaken an attack."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.y = y
        self.best = x.clone()
        self.score = torch.full((x.shape[0],), float("inf"), device=x.device)

    def observe(self, x_adv: torch.Tensor, logits: torch.Tensor) -> None:
        score = attacker_score(logits.detach(), self.y)
        better = (score < self.score).view(-1, *([1] * (x_adv.dim() - 1)))
        self.best = torch.where(better, x_adv.detach(), self.best)
        self.score = torch.minimum(score, self.score)

    def result(self, model: torch.nn.Module, x_last: torch.Tensor) -> torch.Tensor:
        """Judge the final iterate too: for labels it is returned where no earlier iterate
        fooled the model (the runner evaluates it; no extra forward pass), for label maps
        one more forward pass decides."""
        if is_dense(self.y):
            with torch.no_grad():
                self.observe(x_last, model(x_last))
            return self.best.detach()
        fooled = torch.isneginf(self.score).view(-1, *([1] * (x_last.dim() - 1)))
        return torch.where(fooled, self.best, x_last).detach()
