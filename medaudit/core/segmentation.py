"""Dense outputs (segmentation, 2D and 3D): overlap and distance metrics, losses, masks.

Label maps are integer tensors ``N x H x W`` (or ``N x D x H x W``); logits are
``N x K x H x W`` (or ``N x K x D x H x W``). Everything is batched torch on the maps'
device, except the 95th-percentile Hausdorff distance, which MONAI computes with
distance transforms on the host (it runs once per case and job, never inside an attack).

Empty-mask convention (stated in every report): a class absent from both the truth and
the prediction scores Dice 1, IoU 1 and HD95 0 (nothing to find, nothing found); a class
present in exactly one of them scores Dice 0, IoU 0 and HD95 equal to the image diagonal
(the largest distance possible). So a lesion an attack makes appear in a healthy case
counts as an error, which a convention that skips empty truths would hide.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from medaudit.core.lazy import F, torch


def is_dense(y: torch.Tensor) -> bool:
    """Whether ``y`` holds label maps (segmentation) rather than one label per sample."""
    return y.dim() > 1


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``N x *S`` integer maps to ``N x K x *S`` boolean channels."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).bool()


def _counts(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-case, per-class true positives, false positives and false negatives (``N x K``),
    from one count of (case, truth, prediction) triples: no one-hot maps in memory. The
    count is a scatter-add into the ``N x K x K`` bins, not ``torch.bincount``, whose output
    size depends on the data: on CUDA it reads the largest index back to the host, a sync
    attacks would pay on every step."""
    n, k = pred.shape[0], num_classes
    case = torch.arange(n, device=pred.device).view(-1, *([1] * (pred.dim() - 1)))
    index = ((case * k + truth.long()) * k + pred.long()).flatten()
    confusion = torch.zeros(n * k * k, dtype=torch.long, device=pred.device)
    confusion.scatter_add_(0, index, index.new_ones(()).expand_as(index))
    confusion = confusion.view(n, k, k).double()  # [case, truth, pred]
    tp = confusion.diagonal(dim1=1, dim2=2)
    return tp, confusion.sum(1) - tp, confusion.sum(2) - tp


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``N x K`` Dice coefficients ``2|P&T| / (|P| + |T|)``; 1 where both are empty."""
    tp, fp, fn = _counts(pred, truth, num_classes)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom)).float()


def iou_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``N x K`` intersection over union; 1 where both are empty."""
    tp, fp, fn = _counts(pred, truth, num_classes)
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.ones_like(denom)).float()


def pixel_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``N`` fractions of pixels (voxels) whose class is right."""
    return (pred == truth).flatten(1).float().mean(1)


def foreground_mean(per_class: torch.Tensor) -> torch.Tensor:
    """Mean over the foreground classes 1..K-1 (all classes when there is only one)."""
    return per_class[:, 1:].mean(1) if per_class.shape[1] > 1 else per_class[:, 0]


def case_mean(per_class: Sequence[float]) -> float:
    """Foreground mean of one case's per-class values from a record (plain lists)."""
    values = per_class[1:] if len(per_class) > 1 else per_class
    return sum(values) / len(values)


def hd95_per_class(
    pred: torch.Tensor,
    truth: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """``N x K`` 95th-percentile symmetric Hausdorff distances between boundaries, in
    the units of ``spacing`` (pixels when None; one spacing for all cases, or one per case),
    with the empty-mask convention above."""
    from monai.metrics import compute_hausdorff_distance

    p, t = one_hot(pred, num_classes), one_hot(truth, num_classes)
    spatial = pred.shape[1:]
    if spacing is None:
        units = [[1.0] * len(spatial)] * len(pred)
    elif isinstance(spacing[0], (list, tuple)):
        units = [list(s) for s in spacing]
    else:
        units = [list(spacing)] * len(pred)
    diagonal = torch.tensor(
        [[math.sqrt(sum((s * u) ** 2 for s, u in zip(spatial, unit)))] for unit in units], dtype=torch.float64
    )
    dims = tuple(range(2, p.dim()))
    p_any, t_any = p.any(dims), t.any(dims)
    out = torch.zeros(p.shape[:2], dtype=torch.float64)
    both = (p_any & t_any).cpu()
    if bool(both.any()):
        with warnings.catch_warnings():
            # MONAI warns about empty classes; the convention above replaces their values.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside MONAI itself
            hd = compute_hausdorff_distance(
                p.cpu().float(), t.cpu().float(), include_background=True, percentile=95, spacing=units
            ).double()
        out = torch.where(both, hd, out)
    out = torch.where((p_any ^ t_any).cpu(), diagonal.expand_as(out), out)
    return out.float()


# -- losses ---------------------------------------------------------------------------


def dense_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy averaged over pixels (voxels): ROG's volumetric loss."""
    return F.cross_entropy(logits.float(), y.long(), reduction="none").flatten(1).mean(1)


def soft_dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - soft Dice`` of the softmax against the truth, averaged over the
    foreground classes (classes absent from the truth count through their false positives)."""
    prob = logits.float().softmax(1)
    target = one_hot(y, logits.shape[1]).float()
    dims = tuple(range(2, prob.dim()))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return 1 - foreground_mean((2 * inter + 1) / (denom + 1))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``N x *S`` boolean maps by a (2r+1)-wide square (cube)."""
    if radius <= 0:
        return mask
    pool = F.max_pool3d if mask.dim() == 4 else F.max_pool2d
    return pool(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def dense_scores(
    pred: torch.Tensor, truth: torch.Tensor, num_classes: int, spacing=None, *, distances: bool = True
) -> dict[str, list]:
    """Per-case scores of label maps, rounded as records keep them: per-class ``dice``,
    ``iou`` (and ``hd95``), and ``pixel_accuracy``."""
    out: dict[str, list] = {
        "dice": _rounded(dice_per_class(pred, truth, num_classes)),
        "iou": _rounded(iou_per_class(pred, truth, num_classes)),
    }
    if distances:
        out["hd95"] = _rounded(hd95_per_class(pred, truth, num_classes, spacing))
    out["pixel_accuracy"] = [round(v, 6) for v in pixel_accuracy(pred, truth).tolist()]
    return out


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in t.tolist()]
