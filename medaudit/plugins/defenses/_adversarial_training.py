"""Adversarial training as library functions: PGD-AT (Madry et al.), TRADES (Zhang et al.)
and SSAT (Li, Pan & Zhu), plus plain training, the baseline they are judged against.

Each function fine-tunes (or trains) a classifier in place. The classifier maps pixel-space
images in [0, 1] to logits, with any normalisation inside the module (as every
:class:`~medaudit.core.components.LoadedModel` does). The functions share these rules:

- They train in train mode with every parameter trainable. Afterwards, even when training
  fails, the model is back in eval mode with ``requires_grad`` False, ready to audit.
- They run on the device of ``images``. The model must be there too. Tensors stay on that
  device: no numpy, and no host synchronisation per step. Losses are summed on the device
  and read once, at the end.
- They are deterministic for a given ``generator``. One seed is drawn from it and then
  seeds three things: the shuffling (and SSAT's budgets and unlabelled batches) on a CPU
  generator, the random starts on a generator on the data's device, and torch's global
  RNG (for dropout and stochastic depth). The global RNG is forked, so the caller's global
  RNG state is left as it was.
- The attacks inside training reuse the library's perturbation geometry
  (:mod:`medaudit.core.perturbation`: ``random_start``, ``input_gradient``, ``ascent_step``,
  ``project``). They train on the last iterate, as the papers do. The audit's ``pgd``
  attack instead keeps the first iterate that fools the model, which is the right choice
  for measuring robustness but not for training.
- By default (``recalibrate_bn=True``), once training ends they re-estimate every
  batch-norm layer's running statistics on the clean training images (see
  :func:`recalibrate_batch_norm`). The papers do not do this; this library does. Their
  runs last 100 epochs or more, so the running averages catch up with the weights. A
  fine-tuning run of a few epochs does not: on the demo model, TRADES left the eval-mode
  model predicting one class (held-out accuracy 0.46), while the same weights with
  re-estimated statistics scored 0.95.
- They return a small dict of training facts for the report.

Each method's hyper-parameters, with defaults and one-line descriptions, are in a
:class:`~medaudit.core.components.Params` model (:class:`PGDATParams`,
:class:`TRADESParams`, :class:`SSATParams`, :class:`StandardTrainingParams`). The fields
match the function's keyword arguments, so ``pgd_at(model, x, y, generator=g,
**params.model_dump())`` works. A Defense plugin can expose them in the spec.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator, Literal, Optional, Union

from pydantic import Field

from medaudit.core.lazy import F, torch
from medaudit.core.spec import Epsilon
from medaudit.core.components import Norm, Params
from medaudit.core.perturbation import ascent_step, input_gradient, project
from medaudit.core.perturbation import random_start as random_point

#: Builds an optimiser from the model's parameters, e.g. ``lambda ps: torch.optim.SGD(ps, lr=0.1)``.
OptimizerFactory = Callable[[Iterable["torch.nn.Parameter"]], "torch.optim.Optimizer"]
OptimizerName = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "step", "cosine"]
AttackMode = Literal["train", "eval"]


# -- params ---------------------------------------------------------------------------


class TrainingParams(Params):
    """Optimisation hyper-parameters shared by every training function."""

    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the labelled training images.")
    batch_size: int = Field(128, ge=1, le=65_536, description="Labelled images per optimiser step.")
    optimizer: OptimizerName = Field("sgd", description="Optimiser: SGD with momentum (the papers' choice), Adam or AdamW.")
    lr: float = Field(0.01, gt=0.0, le=10.0, description="Learning rate (the papers use 0.1 from scratch; 0.01 suits fine-tuning).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (ignored by Adam and AdamW).")
    weight_decay: float = Field(2e-4, ge=0.0, le=1.0, description="L2 weight decay on every parameter.")
    lr_schedule: Schedule = Field(
        "constant",
        description="Learning-rate schedule over all steps: 'constant'; 'step' (x0.1 at 50 % and x0.01 at "
        "75 %, as in Madry et al.'s CIFAR-10 run); 'cosine' (annealed to 0).",
    )
    recalibrate_bn: bool = Field(
        True,
        description="After training, re-estimate batch-norm running statistics on the clean training images "
        "(short fine-tuning leaves the running averages behind the weights).",
    )


class StandardTrainingParams(TrainingParams):
    """Plain (clean) training: the baseline an adversarially trained model is compared with."""


class PGDATParams(TrainingParams):
    """PGD adversarial training (Madry et al. 2018)."""

    eps: Epsilon = Field(8 / 255, description="Training budget in [0, 1] pixel units (Madry et al.: 8/255 on CIFAR-10).")
    norm: Literal["linf", "l2"] = Field("linf", description="Norm of the training budget.")
    steps: int = Field(7, ge=1, le=1_000, description="PGD steps per batch (Madry et al.: 7 on CIFAR-10).")
    step_size: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="PGD step size in pixel units; default 2.5 * eps / steps (the library's PGD rule)."
    )
    random_start: bool = Field(True, description="Start PGD from a uniform random point of the eps-ball (Madry et al.).")
    mix_clean: float = Field(
        0.0, ge=0.0, le=1.0, description="Weight of the clean loss: (1 - w) * CE(adv) + w * CE(clean); 0 is Madry et al."
    )
    attack_mode: AttackMode = Field(
        "train", description="Mode of the model while PGD runs: 'train' (batch statistics, as in the reference) or 'eval'."
    )


class TRADESParams(TrainingParams):
    """TRADES (Zhang et al. 2019)."""

    eps: Epsilon = Field(0.031, description="Training budget in [0, 1] pixel units (reference: 0.031 on CIFAR-10).")
    norm: Literal["linf", "l2"] = Field("linf", description="Norm of the training budget.")
    beta: float = Field(6.0, ge=0.0, le=1_000.0, description="Weight of the KL(clean || adv) term (1/lambda; the paper's 6).")
    steps: int = Field(10, ge=1, le=1_000, description="Steps of the inner KL maximisation (reference: 10).")
    step_size: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Inner step size; default: L-inf 2.26 * eps / steps (the reference's 0.007 for 10 steps at eps "
        "0.031), L2 2 * eps / steps (the reference's).",
    )
    init_std: float = Field(0.001, ge=0.0, le=1.0, description="Std of the Gaussian start of the inner maximisation.")
    attack_mode: AttackMode = Field(
        "eval", description="Mode of the model during the inner maximisation ('eval' in the reference)."
    )


class SSATParams(TrainingParams):
    """Semi-supervised adversarial training (Li, Pan & Zhu, ISBI 2021)."""

    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the labelled images (reference: 10).")
    batch_size: int = Field(64, ge=1, le=65_536, description="Labelled images per step (reference: 64).")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Learning rate (reference: SGD 1e-3, momentum 0.9).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="L2 weight decay (reference: none).")
    eps: Epsilon = Field(0.003, description="Largest FGSM budget; each step draws one from U(eps_low * eps, eps) (reference: 0.003).")
    eps_low: float = Field(
        1 / 3, ge=0.0, le=1.0, description="Lower end of the per-step budget range as a fraction of eps (reference: 0.001 / 0.003)."
    )
    norm: Literal["linf", "l2"] = Field("linf", description="Norm of the FGSM step (reference: L-inf, sign step).")
    unlabeled_weight: float = Field(3.0, ge=0.0, le=1_000.0, description="Weight lambda of the adversarial pseudo-label loss (reference: 3).")
    unlabeled_batch_size: Optional[int] = Field(
        None, ge=1, le=65_536, description="Unlabelled images per step, drawn afresh each step; default batch_size (reference: 64)."
    )
    attack_mode: AttackMode = Field(
        "train", description="Mode of the model while pseudo-labelling and running FGSM ('train' in the reference)."
    )


# -- shared machinery -----------------------------------------------------------------


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    optimizer: Union[OptimizerName, OptimizerFactory],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The named optimiser, or whatever a factory builds (``lr``, ``momentum`` and
    ``weight_decay`` are then ignored)."""
    if callable(optimizer):
        return optimizer(parameters)
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd', 'adam', 'adamw' or a factory")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, total: int):
    if schedule == "constant":
        return None
    if schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 1.0 if step < 0.5 * total else (0.1 if step < 0.75 * total else 0.01)
        )
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    raise ValueError(f"unknown lr_schedule {schedule!r}; use 'constant', 'step' or 'cosine'")


def _norm(norm: Union[str, Norm]) -> Norm:
    norm = Norm(norm)
    if norm not in (Norm.LINF, Norm.L2):
        raise ValueError(f"adversarial training supports the linf and l2 norms, not {norm.value}")
    return norm


def _check_images(images: torch.Tensor, what: str) -> None:
    if not torch.is_tensor(images) or images.dim() < 4 or not images.is_floating_point():
        raise ValueError(f"{what} must be a float tensor N x C x H x W (or N x C x D x H x W)")
    if images.numel() and (images.min() < 0 or images.max() > 1):  # one check, before training
        raise ValueError(f"{what} must be pixel values in [0, 1]; normalisation belongs inside the model")


def _check_data(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    _check_images(images, "images")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    if labels.shape != (images.shape[0],) or labels.dtype != torch.long:
        raise ValueError(f"labels must be a long tensor of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if labels.device != images.device:
        raise ValueError(f"images are on {images.device} but labels on {labels.device}")
    param = next(model.parameters(), None)
    if param is not None and param.device != images.device:
        raise ValueError(f"the model is on {param.device} but the images on {images.device}; move one of them")


@contextlib.contextmanager
def _mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run a block in eval mode (``mode='eval'``) and return to train mode afterwards."""
    if mode == "eval":
        model.eval()
        try:
            yield
        finally:
            model.train()
    elif mode == "train":
        yield
    else:
        raise ValueError(f"attack_mode must be 'train' or 'eval', not {mode!r}")


class _Training:
    """Book-keeping every method shares: seeding, batches, optimiser steps, loss history,
    and the eval-mode, frozen model at the end."""

    def __init__(
        self,
        method: str,
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        *,
        epochs: int,
        batch_size: int,
        optimizer: Union[OptimizerName, OptimizerFactory],
        lr: float,
        momentum: float,
        weight_decay: float,
        lr_schedule: str,
        recalibrate_bn: bool,
    ):
        _check_data(model, images, labels)
        if epochs < 1 or batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        self.method, self.model, self.images, self.labels = method, model, images, labels
        self.device = images.device
        self.epochs, self.batch_size = epochs, batch_size
        self.n = images.shape[0]
        # A trailing batch of a single image is left out: batch norm cannot train on it.
        self.per_epoch = self.n - 1 if self.n > 1 and self.n % batch_size == 1 else self.n
        self.batches_per_epoch = -(-self.per_epoch // batch_size)
        # One draw from the caller's generator seeds everything below.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self.seed = seed
        #: Shuffling, SSAT's budgets and unlabelled batches (CPU: no device round trips).
        self.cpu_generator = torch.Generator().manual_seed(seed)
        #: Random starts, on the data's device.
        self.device_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self._opt_args = (optimizer, lr, momentum, weight_decay, lr_schedule)
        self.recalibrate_bn = recalibrate_bn
        self.history: list[torch.Tensor] = []
        self.steps = 0

    @contextlib.contextmanager
    def session(self) -> Iterator["_Training"]:
        """Seed the (forked) global RNG, train mode, trainable parameters; afterwards eval
        mode and frozen parameters, whatever happened."""
        devices = [self.device] if self.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(self.seed + 2)
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(self.seed + 2)
            try:
                self.model.train()
                self.model.requires_grad_(True)
                optimizer, lr, momentum, weight_decay, schedule = self._opt_args
                self.opt = make_optimizer(self.model.parameters(), optimizer, lr, momentum, weight_decay)
                self.sched = _scheduler(self.opt, schedule, self.epochs * self.batches_per_epoch)
                with torch.enable_grad():
                    yield self
                if self.recalibrate_bn:
                    recalibrate_batch_norm(self.model, self.images, self.batch_size)
            finally:
                self.model.eval()
                self.model.requires_grad_(False)
        self.wall_seconds = time.perf_counter() - start

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every epoch, the labelled images in a fresh random order, ``batch_size`` at a time."""
        for _ in range(self.epochs):
            order = torch.randperm(self.n, generator=self.cpu_generator).to(self.device)
            self._epoch_loss = torch.zeros((), device=self.device)
            for start in range(0, self.per_epoch, self.batch_size):
                idx = order[start : min(start + self.batch_size, self.per_epoch)]
                yield self.images[idx], self.labels[idx]
            self.history.append(self._epoch_loss / self.per_epoch)

    def step(self, loss: torch.Tensor, batch: int) -> None:
        """One optimiser step on ``loss`` (the mean over a batch of ``batch`` images)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self._epoch_loss += loss.detach() * batch
        self.steps += 1

    def report(self, **extra) -> dict:
        history = torch.stack(self.history).tolist()  # the only read of the losses
        return {
            "method": self.method,
            "epochs": self.epochs,
            "optimizer_steps": self.steps,
            "n_train": self.n,
            "final_loss": history[-1],
            "loss_history": history,
            "wall_seconds": round(self.wall_seconds, 3),
            "device": str(self.device),
            "seed": self.seed,
            **extra,
        }


def recalibrate_batch_norm(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128) -> int:
    """Re-estimate the running mean and variance of every batch-norm layer that tracks them.
    The estimate is an equal-weight average over batches of ``images`` (train-mode forward
    passes without gradients), as ``torch.optim.swa_utils.update_bn`` does. This is needed
    after short fine-tuning: the running averages (momentum 0.1) lag behind weights that
    adversarial training moves quickly, and eval mode then misclassifies even clean images.
    Leaves the model in train mode. Returns the number of layers updated."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        with torch.no_grad():
            # Near-equal chunks, so that no batch holds a single image.
            for chunk in images.tensor_split(-(-images.shape[0] // batch_size)):
                model(chunk)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return len(layers)


def _pgd_last_iterate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm, steps: int, step: float,
    start_random: bool, generator: torch.Generator,
) -> torch.Tensor:
    """PGD on the cross-entropy (the library's step and projection), returning the last iterate."""
    x_adv = random_point(x, eps, norm, generator) if start_random else x.clone()
    for _ in range(steps):
        _, grad = input_gradient(model, x_adv, y)
        x_adv = project(ascent_step(x_adv, grad, step, norm), x, eps, norm)
    return x_adv.detach()


# -- methods --------------------------------------------------------------------------


def standard_training(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: Union[OptimizerName, OptimizerFactory] = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    lr_schedule: Schedule = "constant",
    recalibrate_bn: bool = True,
) -> dict:
    """Plain training on the clean images: minimise ``CE(f(x), y)``.

    This is the baseline for the same budget (epochs, optimiser, batches). With the same
    ``generator`` it sees the batches in the same order as :func:`pgd_at` and
    :func:`trades`, so :func:`trades` with ``beta=0`` takes exactly its steps.
    """
    run = _Training("standard", model, images, labels, generator, epochs=epochs, batch_size=batch_size,
                    optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
                    recalibrate_bn=recalibrate_bn)
    with run.session():
        for x, y in run.batches():
            run.step(F.cross_entropy(model(x), y), len(y))
    return run.report()


def pgd_at(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    eps: float = 8 / 255,
    norm: Union[str, Norm] = "linf",
    steps: int = 7,
    step_size: Optional[float] = None,
    random_start: bool = True,
    mix_clean: float = 0.0,
    attack_mode: AttackMode = "train",
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: Union[OptimizerName, OptimizerFactory] = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    lr_schedule: Schedule = "constant",
    recalibrate_bn: bool = True,
) -> dict:
    """PGD adversarial training: minimise ``E max_{||d|| <= eps} CE(f(x + d), y)``.

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083.

    Every batch is replaced by PGD adversarial examples against the current weights. PGD
    starts from a uniform random point of the eps-ball and takes ``steps`` steps of
    ``step_size`` (signed gradient under L-inf, normalised gradient under L2), projecting
    after each one. The loss is the mean cross-entropy on the last iterate.
    ``mix_clean = w > 0`` trains on ``(1 - w) * CE(adv) + w * CE(clean)`` instead; w = 0.5
    is Goodfellow et al.'s mixture.

    Where the defaults come from:

    - From the paper and its reference code (MadryLab/cifar10_challenge, ``config.json``
      and ``train.py``): 7 steps for training; a random start; adversarial loss only; SGD
      with momentum 0.9 and weight decay 2e-4; batch size 128; and, with
      ``lr_schedule='step'``, a learning rate divided by 10 at 50 % and again at 75 % of
      training (40k and 60k of 80k steps in the reference). The reference's attack shares
      the training-mode graph, so batch norm uses batch statistics while PGD runs
      (``attack_mode='train'``). Here that also updates the running statistics, as in
      PyTorch ports; ``attack_mode='eval'`` avoids it.
    - Chosen here: step size 2.5 * eps / steps (the library's ``pgd`` rule; the reference
      uses 2/255 at eps 8/255, i.e. eps / 4 for 7 steps); lr 0.01 (the reference trains
      from scratch at 0.1, and 0.01 suits fine-tuning); weight decay applied to every
      parameter (the reference decays only the weights, not batch norm).

    Trains ``model`` in place. Returns the training facts (see :func:`standard_training`)
    plus ``eps`` and ``norm``.
    """
    norm = _norm(norm)
    if not 0.0 <= mix_clean <= 1.0:
        raise ValueError("mix_clean must be in [0, 1]")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    step = step_size if step_size is not None else 2.5 * eps / steps
    run = _Training("pgd_at", model, images, labels, generator, epochs=epochs, batch_size=batch_size,
                    optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
                    recalibrate_bn=recalibrate_bn)
    with run.session():
        for x, y in run.batches():
            with _mode(model, attack_mode):
                x_adv = _pgd_last_iterate(model, x, y, eps, norm, steps, step, random_start, run.device_generator)
            loss = F.cross_entropy(model(x_adv), y)
            if mix_clean > 0:
                loss = (1.0 - mix_clean) * loss + mix_clean * F.cross_entropy(model(x), y)
            run.step(loss, len(y))
    return run.report(eps=eps, norm=norm.value)


def trades(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    eps: float = 0.031,
    norm: Union[str, Norm] = "linf",
    beta: float = 6.0,
    steps: int = 10,
    step_size: Optional[float] = None,
    init_std: float = 0.001,
    attack_mode: AttackMode = "eval",
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: Union[OptimizerName, OptimizerFactory] = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    lr_schedule: Schedule = "constant",
    recalibrate_bn: bool = True,
) -> dict:
    """TRADES: minimise ``CE(f(x), y) + beta * KL(p(x) || p(x'))``, where ``x'`` maximises
    the KL divergence in the eps-ball.

    Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between
    Robustness and Accuracy", ICML 2019, https://arxiv.org/abs/1901.08573.

    Taken from the reference implementation (yaodongyu/TRADES, ``trades.py`` and
    ``train_trades_cifar10.py``):

    - The inner maximisation runs in eval mode. It starts at ``x + 0.001 * N(0, I)`` and
      takes ``steps`` signed-gradient steps on the summed
      ``KL(softmax(f(x)) || softmax(f(x')))``, with the clean distribution fixed. After each
      step it projects onto the eps-ball and [0, 1]. The defaults are 10 steps and, under
      L-inf, a step of 0.007 at eps 0.031. Here the default step is scaled with eps and
      with the number of steps: ``(0.007 / 0.031) * eps * 10 / steps``, which is the
      reference's value at 10 steps and still reaches the boundary with fewer steps.
    - The outer loss runs in train mode: the mean CE on the clean batch plus beta times
      the batch-mean KL. Gradients flow through both the clean and the adversarial
      distributions, as in the reference.
    - The optimiser is SGD with momentum 0.9 and weight decay 2e-4, at batch size 128.
      beta = 6 is the paper's CIFAR-10 value (the training script's default is 1).

    Chosen here: under L2 the reference optimises the perturbation with SGD on a
    renormalised gradient (learning rate 2 * eps / steps). Here it takes the library's
    normalised-gradient steps of that size instead. The start is clipped to [0, 1].
    lr is 0.01 because that suits fine-tuning (the reference trains from scratch at 0.1
    with steps at epochs 75, 90 and 100).

    With ``beta = 0`` the loss is the clean cross-entropy, and training takes the same
    steps as :func:`standard_training` with the same generator. The adversarial batch
    still goes through the model, which moves batch norm's running statistics. With
    ``recalibrate_bn`` those are re-estimated at the end, so the two models come out
    identical.

    Trains ``model`` in place. Returns the training facts (see :func:`standard_training`)
    plus ``eps``, ``norm`` and ``beta``.
    """
    norm = _norm(norm)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if step_size is not None:
        step = step_size
    else:
        # The reference's 10 steps of 0.007 at eps 0.031, scaled to eps and to the number of steps.
        step = eps * (0.007 / 0.031) * (10 / steps) if norm is Norm.LINF else 2.0 * eps / steps
    run = _Training("trades", model, images, labels, generator, epochs=epochs, batch_size=batch_size,
                    optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
                    recalibrate_bn=recalibrate_bn)
    with run.session():
        for x, y in run.batches():
            with _mode(model, attack_mode):
                x_adv = _trades_inner(model, x, eps, norm, steps, step, init_std, run.device_generator)
            loss = trades_loss(model, x, y, x_adv, beta)
            run.step(loss, len(y))
    return run.report(eps=eps, norm=norm.value, beta=beta)


def _trades_inner(
    model: torch.nn.Module, x: torch.Tensor, eps: float, norm: Norm, steps: int, step: float, init_std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Maximise ``KL(p(x) || p(x'))`` over the eps-ball around ``x`` (last iterate)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + init_std * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = project(ascent_step(x_adv.detach(), grad, step, norm), x, eps, norm)
    return x_adv.detach()


def trades_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, beta: float) -> torch.Tensor:
    """The TRADES objective on one batch: ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``,
    the KL averaged over the batch. It is exactly the clean cross-entropy when ``beta = 0``."""
    logits = model(x).float()
    natural = F.cross_entropy(logits, y)
    robust = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return natural + beta * robust


def ssat(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    unlabeled_images: Optional[torch.Tensor],
    *,
    generator: torch.Generator,
    eps: float = 0.003,
    eps_low: float = 1 / 3,
    norm: Union[str, Norm] = "linf",
    unlabeled_weight: float = 3.0,
    unlabeled_batch_size: Optional[int] = None,
    attack_mode: AttackMode = "train",
    epochs: int = 10,
    batch_size: int = 64,
    optimizer: Union[OptimizerName, OptimizerFactory] = "sgd",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: Schedule = "constant",
    recalibrate_bn: bool = True,
) -> dict:
    """Semi-supervised adversarial training: supervised CE on the labelled images plus
    CE on FGSM examples of unlabelled images against the model's own pseudo-labels.

    Li, Pan & Zhu, "Defending against adversarial attacks on medical imaging AI system,
    classification or detection?", ISBI 2021, https://arxiv.org/abs/2006.13555. The
    reference is xinli0928/Defending, ``MainFolder/Training.ipynb``. Each step:

    - ``(x_l, y_l)``: a batch of labelled images, reshuffled every epoch.
    - ``x_u``: a random batch of unlabelled images, drawn afresh at every step.
    - ``eps_t ~ U(eps_low * eps, eps)``, drawn at every step.
    - ``y_u = argmax f(x_u)``, the pseudo-labels.
    - ``x_u' = clip_[0,1](x_u + eps_t * sign(grad CE(f(x_u), y_u)))``.
    - ``L = CE(f(x_l), y_l) + unlabeled_weight * CE(f(x_u'), y_u)``.

    Taken from the reference [CODE]: the loss and lambda = 3; FGSM against the model's own
    prediction, with the CE summed; a budget drawn from U(0.001, 0.003) at every step; a
    new shuffled unlabelled batch at every step; train mode throughout, for
    pseudo-labelling and FGSM too; SGD with lr 1e-3 and momentum 0.9, no weight decay,
    batch 64 and 10 epochs.

    Choices where the method description is silent or this library differs ([GAP] or
    [DESIGN] in the methods notes):

    - Budget scale: ``eps`` is the top of the range and ``eps_low`` the bottom as a
      fraction of it. The defaults reproduce U(0.001, 0.003); a larger ``eps`` scales the
      whole range.
    - Pseudo-labels: computed once per step without gradient (detached; they are argmax
      values anyway), and used both by FGSM and in the loss. The reference runs the same
      forward pass twice (once inside FGSM, once for the labels), which gives the same
      labels in train mode without dropout.
    - Epoch: one pass over the labelled images, as in the reference, whose loop runs over
      the labelled loader. If the pool has fewer images than ``unlabeled_batch_size``, the
      whole pool is used at every step.
    - L2: FGSM's L2 version is one normalised-gradient step of length ``eps_t`` (the
      reference is L-inf only).
    - ``unlabeled_images=None`` (or an empty tensor) drops the unsupervised term, which
      leaves plain training at SSAT's settings.
    - ``attack_mode='eval'`` pseudo-labels and attacks in eval mode instead; it is not
      the reference.

    Trains ``model`` in place. Returns the training facts (see :func:`standard_training`)
    plus ``eps``, ``norm`` and ``n_unlabeled``.
    """
    norm = _norm(norm)
    if not 0.0 <= eps_low <= 1.0:
        raise ValueError("eps_low must be in [0, 1]")
    if unlabeled_images is not None:
        _check_images(unlabeled_images, "unlabeled_images")
        if unlabeled_images.shape[1:] != images.shape[1:]:
            raise ValueError(f"unlabeled images {tuple(unlabeled_images.shape[1:])} differ in shape from images {tuple(images.shape[1:])}")
        if unlabeled_images.device != images.device:
            raise ValueError(f"images are on {images.device} but unlabeled_images on {unlabeled_images.device}")
    n_u = 0 if unlabeled_images is None else unlabeled_images.shape[0]
    bu = min(unlabeled_batch_size or batch_size, n_u)
    run = _Training("ssat", model, images, labels, generator, epochs=epochs, batch_size=batch_size,
                    optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
                    recalibrate_bn=recalibrate_bn)
    with run.session():
        for x, y in run.batches():
            loss = F.cross_entropy(model(x), y)
            if n_u:
                u_idx = torch.randperm(n_u, generator=run.cpu_generator)[:bu].to(run.device)
                x_u = unlabeled_images[u_idx]
                eps_t = eps * (eps_low + (1.0 - eps_low) * float(torch.rand((), generator=run.cpu_generator)))
                with _mode(model, attack_mode):
                    with torch.no_grad():
                        y_u = model(x_u).argmax(1)
                    _, grad = input_gradient(model, x_u, y_u)
                    x_u_adv = project(ascent_step(x_u, grad, eps_t, norm), x_u, eps_t, norm).detach()
                loss = loss + unlabeled_weight * F.cross_entropy(model(x_u_adv), y_u)
            run.step(loss, len(y))
    return run.report(eps=eps, norm=norm.value, n_unlabeled=n_u)
