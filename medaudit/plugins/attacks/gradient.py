"""Gradient attacks: fgsm, pgd, bim, mifgsm, tifgsm.

White-box attacks on the loss gradient, L-inf and L2. The iterative ones (``bim``,
``mifgsm``, ``tifgsm``) reuse the steps and projections of :mod:`medaudit.core.perturbation`
and share one loop, :func:`iterate`, that checks every iterate like ``pgd`` does. Native torch, batched, on the model's device for the whole loop: no numpy and no
per-step host synchronisation. Gradients are taken w.r.t. the input only (the runner
freezes the model's parameters). Images are in [0, 1]; epsilon is in that unit.
"""

from __future__ import annotations

from typing import Callable, Literal

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import CROSS_ENTROPY, Attack, AttackFamily, Norm, Params, Task
from medaudit.core.lazy import F, torch
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
    family = AttackFamily.SINGLE_STEP
    loss_kinds = frozenset({CROSS_ENTROPY})
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
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({CROSS_ENTROPY})
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


# -- iterative attacks: shared loop -------------------------------------------------


#: Maps the current iterate and its input gradient to the next iterate.
Update = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def iterate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, update: Update) -> torch.Tensor:
    """Run ``steps`` gradient iterations from ``x``; each sample keeps the iterate on which
    the model does worst (:class:`~medaudit.core.perturbation.WorstIterate`)."""
    worst = WorstIterate(x, y)
    x_adv = x.clone()
    for _ in range(steps):
        logits, grad = input_gradient(model, x_adv, y)
        worst.observe(x_adv, logits)
        x_adv = update(x_adv, grad)
    return worst.result(model, x_adv)


def _per_sample_l1(t: torch.Tensor) -> torch.Tensor:
    """L1 norm of each sample over all non-batch dims, shaped to broadcast against ``t``."""
    return t.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def gaussian_kernel(size: int, sigma: float, channels: int, *, dtype=None, device=None) -> torch.Tensor:
    """A ``channels x 1 x size x size`` Gaussian kernel summing to 1, for a depthwise conv2d
    (``dtype`` None: float32)."""
    dtype = torch.float32 if dtype is None else dtype
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    kernel = kernel / kernel.sum()
    return kernel.expand(channels, 1, size, size).contiguous()


def smooth(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel of ``N x C x H x W`` ``grad`` with ``kernel`` (zero padding, same size)."""
    return F.conv2d(grad, kernel, groups=grad.shape[1], padding=kernel.shape[-1] // 2)


def momentum_iterate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm,
    steps: int,
    step: float,
    decay: float,
    kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """MI-FGSM's loop; with ``kernel`` the gradient is smoothed first (TI-MI-FGSM)."""
    momentum = torch.zeros_like(x)

    def update(x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        nonlocal momentum
        if kernel is not None:
            grad = smooth(grad, kernel)
        # L1 normalisation puts every step's gradient on the same scale, so the
        # accumulated direction is not dominated by the steps with the largest loss slope.
        momentum = decay * momentum + grad / _per_sample_l1(grad)
        return project(ascent_step(x_adv, momentum, step, norm), x, eps, norm)

    return iterate(model, x, y, steps, update)


# -- BIM ------------------------------------------------------------------------------


class BIMParams(Params):
    steps: int = Field(10, ge=1, le=10_000, description="Gradient steps.")
    step_size: float | None = Field(
        None, gt=0, description="Step size in pixel units; default eps / steps, so the steps together just reach the budget."
    )


class BIM(Attack):
    """Basic Iterative Method (I-FGSM): small FGSM steps from the clean input, projected each time.

    Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World", ICLR 2017
    workshop, https://arxiv.org/abs/1607.02533. Untargeted, white box (gradients), L-inf
    (sign steps) or L2 (normalised-gradient steps). It is PGD without a random start, so
    it is deterministic. Defaults: 10 steps of eps / 10 (the paper used steps of 1/255).
    Every iterate is checked: a sample keeps the first iterate that fools the model.
    Task-aware like ``pgd`` (per-pixel cross-entropy for segmentation). Works on 2D images
    and 3D volumes.
    """

    name = "bim"
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({CROSS_ENTROPY})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = BIMParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: BIMParams = self.params
        if eps == 0:
            return x.clone()
        step = p.step_size if p.step_size is not None else eps / p.steps

        def update(x_adv, grad):
            return project(ascent_step(x_adv, grad, step, norm), x, eps, norm)

        return iterate(model, x, y, p.steps, update)


# -- MI-FGSM --------------------------------------------------------------------------


class MIFGSMParams(Params):
    steps: int = Field(10, ge=1, le=10_000, description="Gradient steps.")
    step_size: float | None = Field(
        None, gt=0, description="Step size in pixel units; default eps / steps, as in the paper."
    )
    decay: float = Field(1.0, ge=0, description="Momentum decay mu; 0 gives BIM.")


class MIFGSM(Attack):
    """Momentum Iterative FGSM: BIM steps along an accumulated, L1-normalised gradient.

    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
    https://arxiv.org/abs/1710.06081. Untargeted, white box (gradients), L-inf (sign of
    the momentum) or L2 (the momentum normalised). Momentum steadies the direction across
    steps, which escapes poor local maxima and transfers better to other models.
    Defaults as in the paper: 10 steps of eps / 10, decay 1.0. Every iterate is checked:
    a sample keeps the first iterate that fools the model. Works on any input shape (2D
    images and 3D volumes).
    """

    name = "mifgsm"
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({CROSS_ENTROPY})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = MIFGSMParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: MIFGSMParams = self.params
        if eps == 0:
            return x.clone()
        step = p.step_size if p.step_size is not None else eps / p.steps
        return momentum_iterate(model, x, y, eps=eps, norm=norm, steps=p.steps, step=step, decay=p.decay)


# -- TI-FGSM --------------------------------------------------------------------------


class TIFGSMParams(MIFGSMParams):
    kernel_size: int = Field(
        7, ge=3, le=63, description="Odd side of the Gaussian kernel in pixels (the paper used 15 on 299 px images)."
    )
    sigma: float | None = Field(
        None, gt=0, description="Kernel standard deviation in pixels; default (kernel_size - 1) / 6, as in the paper's code."
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd, so the smoothed gradient stays centred on each pixel")
        return value


class TIFGSM(Attack):
    """Translation-Invariant MI-FGSM: MI-FGSM on a Gaussian-smoothed gradient.

    Dong et al., "Evading Defenses to Transferable Adversarial Examples by
    Translation-Invariant Attacks", CVPR 2019, https://arxiv.org/abs/1904.02884 (the
    TI-MI-FGSM variant; ``decay = 0`` gives TI-FGSM). Untargeted, white box (gradients),
    L-inf or L2. Smoothing optimises over small translations of the image at once, which
    yields low-frequency perturbations: weaker than PGD on the audited model itself, but
    a probe of defenses that filter out high frequencies and of transfer. Defaults:
    10 steps of eps / 10, decay 1.0, a 7 px kernel with sigma 1 px (the paper's 15 px
    kernel spanning +-3 sigma, scaled down for medical images of 64 to 256 px).
    2D images only (``N x C x H x W``): the kernel is a per-channel 2D convolution.
    """

    name = "tifgsm"
    family = AttackFamily.TRANSFER
    loss_kinds = frozenset({CROSS_ENTROPY})
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2})
    Params = TIFGSMParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: TIFGSMParams = self.params
        if x.dim() != 4:
            raise ValueError(f"tifgsm supports 2D images (N x C x H x W) only, got shape {tuple(x.shape)}")
        if eps == 0:
            return x.clone()
        step = p.step_size if p.step_size is not None else eps / p.steps
        sigma = p.sigma if p.sigma is not None else (p.kernel_size - 1) / 6
        kernel = gaussian_kernel(p.kernel_size, sigma, x.shape[1], dtype=x.dtype, device=x.device)
        return momentum_iterate(
            model, x, y, eps=eps, norm=norm, steps=p.steps, step=step, decay=p.decay, kernel=kernel
        )


@hookimpl
def register_attacks(register):
    register(FGSM)
    register(PGD)
    register(BIM)
    register(MIFGSM)
    register(TIFGSM)
