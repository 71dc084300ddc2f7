"""NLCE, the non-local context encoder of NLCEN (He et al., AAAI 2019, arXiv 1904.12181),
as library code: the module, its insertion into a segmentation-models-pytorch network,
and a short fine-tune. A defense plugin builds on these; this module registers nothing.

The paper's claim (verified from its abstract) is that NLCE "models short- and long-range
spatial dependencies and encode[s] global contexts for strengthening feature activations
by channel-wise attention", and that NLCE modules also make other segmentation networks
more robust. No public code of the paper exists, so the pieces below follow the two
papers it builds on: the embedded-Gaussian non-local block (Wang et al., CVPR 2018) and
the Encoding Layer of EncNet (Zhang et al., CVPR 2018). Every choice the paper leaves
open is listed under *Design choices* and tagged [GAP] (not found) or [DESIGN] (a choice
made here) as in the project's method notes.

Data flow of one NLCE module on a feature map ``X`` (``B x C x *S``, 2D or 3D):

1. Non-local block: ``X_nl = X + BN(W_z y)``, ``y_i = sum_j softmax_j(theta_i . phi_j) g_j``
   with ``theta, phi, g`` 1x1 projections to ``C / reduction`` channels.
2. Context encoding on ``X_nl``: a 1x1 conv-BN-ReLU to ``D = min(C, encoding_channels)``
   channels; residuals ``r_ik = x_i - d_k`` to ``K`` learned codewords; soft assignment
   ``a_ik = softmax_k(-s_k |r_ik|^2)`` with learned smoothing factors ``s_k > 0``;
   aggregated residuals ``e_k = sum_i a_ik r_ik``; global context ``e = sum_k ReLU(BN(e_k))``.
3. Channel attention: ``gamma = sigmoid(W_fc e)`` (one weight per channel of ``X``), applied
   as ``X_out = X_nl + lambda * (X_nl * gamma)`` (default), ``X_nl + X_nl * gamma`` or
   ``X_nl * gamma``.

Identity at initialisation (default ``zero_init=True``): the BN after ``W_z`` starts with
scale and shift 0, so the non-local branch adds exactly 0 (Wang et al.'s own init), and
the attention's residual scale ``lambda`` starts at 0, so ``X_out = X_nl = X`` exactly, in
train and eval mode. A network with NLCE inserted therefore computes the same logits as
before until fine-tuning moves those two scales; gradients reach ``lambda`` and the BN
scale on the first step and every other NLCE weight from the second step on.

Design choices (each open in the paper):

- [DESIGN] Non-local variant: embedded Gaussian, no ``1/sqrt(d)`` temperature, bottleneck
  ``C / reduction`` with ``reduction = 2`` (Wang et al.; the paper's exact variant is from
  memory, not verified). ``subsample > 1`` max-pools ``phi`` and ``g`` (Wang et al.'s
  sub-sampling trick) to bound the ``N x N/s^d`` attention cost on large maps; 1 = none.
- [DESIGN] Global context = the *sum* over codewords of BN-ReLU'd encodings (EncNet
  averages; the two differ by the constant ``K``, which the FC absorbs). The BN normalises
  each codeword's encoding (``BatchNorm1d(K)`` over batch and channels), as EncNet does.
- [DESIGN] ``K = 32`` codewords (EncNet's default; the paper's value is [GAP]).
- [DESIGN] Before encoding, a 1x1 conv-BN-ReLU projects ``C`` to ``min(C, 512)`` channels
  (EncNet works on 512 channels; it never widens a narrower map, so small encoders such
  as the demo's keep their width).
- [DESIGN] Smoothing factors are kept positive through a softplus (EncNet leaves its
  scale unconstrained and starts it negative); they start uniform in (0, 1) and the
  codewords uniform in ``+-1/sqrt(K D)``, EncNet's initialisation.
- [GAP]/[DESIGN] Attention wiring: the paper's exact form is not known. ``attention=
  "scaled_residual"`` (default, the identity at init), ``"residual"`` (``X_nl + X_nl *
  gamma``) and ``"multiply"`` (``X_nl * gamma``) are all offered. No ReLU after the
  attention (EncNet has one) so pre-activation encoder features keep their sign.
- [DESIGN] No semantic-encoding (SE) loss: EncNet's auxiliary loss needs image-level
  class presence labels and is not part of the NLCE description.
- [DESIGN] Placement: inside an smp model, NLCE runs on chosen *encoder* feature levels
  before the decoder (the paper's "plug-in" use on other networks); NLCEN itself applies
  it to FPN levels P2-P5, so the default levels are 2 and deeper (strides 4 to 2^depth
  for the usual encoders).
- [DESIGN] Fine-tune: Adam, cross-entropy + soft Dice (the library's dense losses, the
  demo U-Net's recipe; NLCEN trains a binary mask with BCE), random horizontal flips,
  only the NLCE weights by default with the base network frozen in eval mode (its
  BatchNorm statistics do not move). Learning rate and steps are [GAP]; the defaults are
  for a short fine-tune of inserted modules, not NLCEN's full training (methods notes:
  Adam 1e-4, batch 4, about 100 epochs). No adversarial training, as in the paper.

Modules work on any number of spatial dimensions: the 1x1 projections are ``Conv1d`` over
the flattened positions (the same weights as a 1x1 ``Conv2d``/``Conv3d``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medaudit.core.segmentation import dense_cross_entropy, soft_dice_loss
from medaudit.plugins.defenses._nlce_params import Attention, NLCEParams  # noqa: F401  (NLCEParams: re-exported)


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block: ``X + BN(W_z softmax(theta^T phi) g)``.

    ``channels``: ``C`` of the input; ``reduction``: the bottleneck is ``C / reduction``
    channels (at least 1); ``subsample``: max-pool stride applied to ``phi`` and ``g``
    (1 = attend to every position); ``zero_init``: start the output BN at scale 0, so the
    block is the identity until trained.
    """

    def __init__(self, channels: int, reduction: int = 2, subsample: int = 1, zero_init: bool = True):
        super().__init__()
        if channels < 1 or reduction < 1 or subsample < 1:
            raise ValueError("channels, reduction and subsample must be >= 1")
        inner = max(1, channels // reduction)
        self.channels, self.inner, self.subsample = channels, inner, subsample
        self.theta = nn.Conv1d(channels, inner, 1)
        self.phi = nn.Conv1d(channels, inner, 1)
        self.g = nn.Conv1d(channels, inner, 1)
        self.out = nn.Conv1d(inner, channels, 1, bias=False)
        self.norm = nn.BatchNorm1d(channels)
        if zero_init:
            nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def _pooled(self, t: torch.Tensor, spatial: torch.Size) -> torch.Tensor:
        if self.subsample == 1:
            return t
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
        b, c = t.shape[:2]
        return pool(t.view(b, c, *spatial), self.subsample, ceil_mode=True).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        flat = x.reshape(b, c, -1)
        query = self.theta(flat).transpose(1, 2)  # B x N x C'
        key = self._pooled(self.phi(flat), spatial).transpose(1, 2)  # B x M x C'
        value = self._pooled(self.g(flat), spatial).transpose(1, 2)
        # softmax_j(theta_i . phi_j) weighting g_j: attention with temperature 1
        y = F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None], scale=1.0)[:, 0]
        z = self.norm(self.out(y.transpose(1, 2)))
        return x + z.view_as(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}, subsample={self.subsample}"


class ContextEncoding(nn.Module):
    """EncNet's context encoding: learned codebook, soft assignment, aggregated residuals.

    Input ``B x C x *S``; output the global context vector ``B x D`` with
    ``D = min(C, encoding_channels)``. ``codewords`` is ``K``.
    """

    def __init__(self, channels: int, codewords: int = 32, encoding_channels: int = 512):
        super().__init__()
        if channels < 1 or codewords < 1 or encoding_channels < 1:
            raise ValueError("channels, codewords and encoding_channels must be >= 1")
        d = min(channels, encoding_channels)
        self.channels, self.dim, self.num_codewords = channels, d, codewords
        self.project = nn.Sequential(nn.Conv1d(channels, d, 1, bias=False), nn.BatchNorm1d(d), nn.ReLU())
        bound = 1.0 / math.sqrt(codewords * d)
        self.codewords = nn.Parameter(torch.empty(codewords, d).uniform_(-bound, bound))
        # s_k = softplus(raw_k), s_k ~ U(0, 1) at init
        s = torch.empty(codewords).uniform_(0.0, 1.0).clamp_min(1e-3)
        self.raw_smoothing = nn.Parameter(torch.log(torch.expm1(s)))
        self.norm = nn.BatchNorm1d(codewords)

    @property
    def smoothing(self) -> torch.Tensor:
        """The smoothing factors ``s_k > 0`` (``K``)."""
        return F.softplus(self.raw_smoothing)

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features ``B x N x D`` and soft assignments ``B x N x K`` (rows sum to 1)."""
        feats = self.project(x.reshape(x.shape[0], x.shape[1], -1)).transpose(1, 2)
        # float32 even under autocast: the expanded distance below cancels large terms
        with torch.autocast(device_type=feats.device.type, enabled=False):
            feats, c = feats.float(), self.codewords.float()
            # |x_i - d_k|^2 expanded, so the B x N x K x D residual tensor is never built
            dist = (feats.pow(2).sum(-1, keepdim=True) - 2 * feats @ c.t() + c.pow(2).sum(-1)).clamp_min(0)
            return feats, torch.softmax(-self.smoothing.float() * dist, dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregated residuals ``e_k = sum_i a_ik (x_i - d_k)``: ``B x K x D``."""
        feats, a = self.assign(x)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return a.transpose(1, 2) @ feats - a.sum(1).unsqueeze(-1) * self.codewords.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.encode(x))).sum(1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, codewords={self.num_codewords}"


class ChannelAttention(nn.Module):
    """``gamma = sigmoid(W_fc e)``: one gate in (0, 1) per channel, from the context vector."""

    def __init__(self, context_dim: int, channels: int):
        super().__init__()
        self.fc = nn.Linear(context_dim, channels)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(context))


class NLCE(nn.Module):
    """Non-local context encoder: ``B x C x *S`` to the same shape.

    Non-local block, then context encoding of its output, then channel attention (see the
    module docstring for the formulas and the design choices). With the default
    ``attention="scaled_residual"`` and ``zero_init=True`` it is exactly the identity at
    initialisation.
    """

    def __init__(
        self,
        channels: int,
        codewords: int = 32,
        reduction: int = 2,
        *,
        encoding_channels: int = 512,
        subsample: int = 1,
        attention: Attention = "scaled_residual",
        zero_init: bool = True,
    ):
        super().__init__()
        if attention not in ("scaled_residual", "residual", "multiply"):
            raise ValueError(f"attention must be scaled_residual, residual or multiply, not {attention!r}")
        self.channels, self.attention_mode = channels, attention
        self.non_local = NonLocalBlock(channels, reduction, subsample, zero_init=zero_init)
        self.encoding = ContextEncoding(channels, codewords, encoding_channels)
        self.attention = ChannelAttention(self.encoding.dim, channels)
        if attention == "scaled_residual":
            self.attention_scale = nn.Parameter(torch.full((1,), 0.0 if zero_init else 1.0))

    def gate(self, x_nl: torch.Tensor) -> torch.Tensor:
        """Channel gates ``B x C x 1...`` computed from the non-local output."""
        gamma = self.attention(self.encoding(x_nl))
        return gamma.view(*gamma.shape, *([1] * (x_nl.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"NLCE({self.channels}) got input of shape {tuple(x.shape)}")
        x_nl = self.non_local(x)
        gamma = self.gate(x_nl)
        if self.attention_mode == "multiply":
            return x_nl * gamma
        if self.attention_mode == "residual":
            return x_nl + x_nl * gamma
        return x_nl + self.attention_scale * (x_nl * gamma)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, attention={self.attention_mode}"


# -- insertion into smp models --------------------------------------------------------


class NLCEEncoder(nn.Module):
    """An smp encoder whose chosen feature levels pass through NLCE modules.

    ``encoder`` is the original encoder (so its weights sit under ``encoder.encoder.*`` in
    the state dict) and ``nlce[str(level)]`` the module of each level. Attributes the
    model reads from its encoder (``out_channels``, ``output_stride``...) are forwarded.
    """

    def __init__(self, encoder: nn.Module, blocks: dict[int, NLCE]):
        super().__init__()
        self.encoder = encoder
        self.nlce = nn.ModuleDict({str(level): block for level, block in sorted(blocks.items())})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "encoder" not in modules:
                raise
            return getattr(modules["encoder"], name)

    @property
    def levels(self) -> list[int]:
        return [int(key) for key in self.nlce]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        if not isinstance(features, (list, tuple)) or not all(isinstance(f, torch.Tensor) for f in features):
            raise TypeError(f"NLCE insertion expects the encoder to return a list of tensors, got {type(features).__name__}")
        features = list(features)
        for key, block in self.nlce.items():
            features[int(key)] = block(features[int(key)])
        return features


def find_smp_model(model: nn.Module) -> nn.Module:
    """The segmentation-models-pytorch network in ``model`` (itself, or a submodule such
    as the ``net`` of the library's pixel-space wrapper)."""
    for module in model.modules():
        encoder = getattr(module, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "out_channels") and hasattr(module, "decoder"):
            return module
    raise ValueError(
        f"NLCE insertion needs a segmentation-models-pytorch model (a module with .encoder.out_channels "
        f"and .decoder); {type(model).__name__} holds none"
    )


def default_levels(out_channels: Sequence[int]) -> list[int]:
    """Encoder levels 2 and deeper (strides 4 and coarser: NLCEN's P2-P5), skipping empty ones."""
    return [i for i in range(2, len(out_channels)) if out_channels[i] > 0]


def resolve_levels(levels: Sequence[int] | None, out_channels: Sequence[int]) -> list[int]:
    """Levels as positive indices into the encoder's feature list (``-1`` = the deepest);
    level 0 (the input itself) and empty levels are refused."""
    depth = len(out_channels) - 1
    if levels is None:
        chosen = default_levels(out_channels)
    else:
        chosen = []
        for level in levels:
            if not -depth <= level <= depth or level == 0:
                raise ValueError(f"level {level} is not an encoder feature level: use 1..{depth} or -1..-{depth}")
            chosen.append(level % (depth + 1))
    chosen = sorted(set(chosen))
    empty = [level for level in chosen if out_channels[level] < 1]
    if not chosen or empty:
        raise ValueError(f"no NLCE levels to insert (levels {levels}, encoder channels {list(out_channels)})")
    return chosen


def insert_nlce(
    model: nn.Module,
    levels: Sequence[int] | None = None,
    *,
    codewords: int = 32,
    reduction: int = 2,
    encoding_channels: int = 512,
    subsample: int = 1,
    attention: Attention = "scaled_residual",
    freeze_base: bool = False,
    seed: int | None = 0,
) -> nn.Module:
    """Insert NLCE modules after the chosen encoder levels of the smp network in ``model``.

    ``model`` is modified in place and returned (deep-copy it first to keep the original).
    It may be the smp network itself or a wrapper holding it (e.g. the pixel-space model a
    loader returns). ``levels`` index ``model.encoder.out_channels``: 1 is the first
    (stride 2) stage, ``-1`` the deepest; None takes levels 2 and deeper. The new modules
    are initialised from ``seed`` (without touching the global random state; None uses
    it), put on the encoder's device and dtype, and are trainable; with ``freeze_base``
    every other parameter gets ``requires_grad=False``. The modules' mode (train/eval)
    follows the network's.
    """
    net = find_smp_model(model)
    if isinstance(net.encoder, NLCEEncoder):
        raise ValueError(f"the model already has NLCE modules at levels {net.encoder.levels}")
    out_channels = list(net.encoder.out_channels)
    chosen = resolve_levels(levels, out_channels)
    reference = next(net.encoder.parameters(), None)

    def build() -> dict[int, NLCE]:
        return {
            level: NLCE(out_channels[level], codewords, reduction, encoding_channels=encoding_channels,
                        subsample=subsample, attention=attention)
            for level in chosen
        }

    if seed is None:
        blocks = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            blocks = build()
    if reference is not None:
        blocks = {level: block.to(device=reference.device, dtype=reference.dtype) for level, block in blocks.items()}
    for block in blocks.values():
        block.train(net.training)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    net.encoder = NLCEEncoder(net.encoder, blocks)
    return model


def nlce_modules(model: nn.Module) -> list[NLCE]:
    """Every NLCE module in ``model``."""
    return [m for m in model.modules() if isinstance(m, NLCE)]


def nlce_parameter_count(model: nn.Module) -> int:
    """Parameters added by NLCE modules (BatchNorm running statistics not counted)."""
    return sum(p.numel() for m in nlce_modules(model) for p in m.parameters())


# -- fine-tuning ----------------------------------------------------------------------


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy plus mean soft-Dice loss over the batch."""
    return dense_cross_entropy(logits, masks).mean() + soft_dice_loss(logits, masks).mean()


def dataset_loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 32) -> float:
    """:func:`segmentation_loss` over a whole set (batch-size weighted), in eval mode, no grad."""
    was_training = model.training
    model.eval()
    total = images.new_zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], masks[start : start + batch_size]
            total += segmentation_loss(model(x), y).double() * len(x)
    model.train(was_training)
    return float(total) / len(images)


def fine_tune(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    train_base: bool = False,
    flip: bool = True,
    weight_decay: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune ``model`` (pixel-space input in [0, 1], logits out) on ``images``
    (``N x C x H x W``) and label maps ``masks`` (``N x H x W``) with cross-entropy + soft
    Dice and Adam.

    Each step draws ``batch_size`` cases with replacement from ``generator`` (and, with
    ``flip``, flips each left-right with probability 1/2), so the run is deterministic
    for a given generator state and initial weights. With ``train_base=False`` only the
    NLCE modules train (the rest stays in eval mode, so its BatchNorm statistics do not
    move); ``train_base=True`` trains every parameter. The model ends in eval mode with
    every parameter frozen (``requires_grad=False``), ready to audit.

    Returns ``steps``, ``batch_size``, ``lr``, ``trainable_parameters``,
    ``initial_loss``/``final_loss`` (the loss over the whole training set in eval mode
    before and after), ``first_batch_loss``/``last_batch_loss`` and ``seconds`` (the
    training loop only).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    if images.dim() < 4 or masks.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match (N x C x *S, N x *S)")
    blocks = nlce_modules(model)
    if train_base:
        params = list(model.parameters())
    else:
        if not blocks:
            raise ValueError("the model has no NLCE modules to train (insert_nlce first, or set train_base)")
        params = [p for block in blocks for p in block.parameters()]
    reference = next(model.parameters())
    images, masks = images.to(reference.device), masks.to(reference.device).long()

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    initial = dataset_loss(model, images, masks)
    optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    model.train(train_base)
    for block in blocks:
        block.train()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator).to(images.device)
        x, y = images[index], masks[index]
        if flip:
            mirrored = (torch.rand(batch_size, generator=generator) < 0.5).to(images.device)
            x = torch.where(mirrored.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
            y = torch.where(mirrored.view(-1, *([1] * (y.dim() - 1))), y.flip(-1), y)
        loss = segmentation_loss(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.detach())
    if reference.device.type == "cuda":
        torch.cuda.synchronize(reference.device)
    seconds = time.perf_counter() - start
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    batch_losses = torch.stack(losses).cpu()
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "train_base": train_base,
        "trainable_parameters": sum(p.numel() for p in params),
        "initial_loss": initial,
        "final_loss": dataset_loss(model, images, masks),
        "first_batch_loss": float(batch_losses[0]),
        "last_batch_loss": float(batch_losses[-1]),
        "seconds": seconds,
    }


# -- params for a defense -------------------------------------------------------------


def apply_nlce(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, params: NLCEParams) -> dict[str, Any]:
    """Insert NLCE modules into ``model`` (in place) and fine-tune it on ``images`` and
    ``masks`` as ``params`` say; returns :func:`fine_tune`'s facts plus the levels and the
    number of parameters added. Give it training cases, never the evaluation set."""
    insert_nlce(model, **params.insert_kwargs())
    facts = fine_tune(model, images, masks, **params.fine_tune_kwargs())
    return dict(facts, levels=find_smp_model(model).encoder.levels, parameters_added=nlce_parameter_count(model))
