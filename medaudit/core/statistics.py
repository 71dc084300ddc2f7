"""Detection statistics: a detector's threshold at a false-positive rate, its TPR there, and
AUROC. In core because detector defenses set thresholds with them and the results report
them for every attack."""

from __future__ import annotations

import math

from medaudit.core.lazy import torch


def threshold_at_fpr(clean_scores: torch.Tensor, fpr: float = 0.05) -> torch.Tensor:
    """The smallest clean score ``t`` such that at most ``floor(fpr * n)`` clean scores are
    ``> t`` (inputs are flagged when their score is strictly above ``t``). Ties can only
    lower the false-positive rate below ``fpr``; ``fpr >= 1`` gives ``-inf``."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    s = clean_scores.detach().flatten().float()
    if s.numel() == 0:
        raise ValueError("no clean scores")
    m = math.floor(fpr * s.numel() + 1e-9)
    if m >= s.numel():
        return torch.tensor(float("-inf"), device=s.device)
    return s.sort(descending=True).values[m]


def tpr_at_fpr(clean_scores: torch.Tensor, adv_scores: torch.Tensor, fpr: float = 0.05) -> float:
    """Fraction of adversarial scores above :func:`threshold_at_fpr` of the clean ones."""
    t = threshold_at_fpr(clean_scores, fpr)
    return float((adv_scores.detach().flatten().float().to(t.device) > t).float().mean())


def auroc(clean_scores: torch.Tensor, adv_scores: torch.Tensor) -> float:
    """Area under the ROC curve with adversarial as the positive class: the probability
    that an adversarial score exceeds a clean one, ties counting one half (the
    Mann-Whitney statistic with mid-ranks; equal to scikit-learn's ``roc_auc_score``)."""
    c = clean_scores.detach().flatten().double()
    a = adv_scores.detach().flatten().double().to(c.device)
    if c.numel() == 0 or a.numel() == 0:
        raise ValueError("auroc needs at least one clean and one adversarial score")
    both = torch.cat([c, a])
    if torch.isnan(both).any():
        raise ValueError("auroc got NaN scores")
    _, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    midranks = ends - (counts.double() - 1) / 2  # 1-based mean rank of each tied group
    rank_sum = midranks[inverse[c.numel() :]].sum()
    n_a, n_c = a.numel(), c.numel()
    return float((rank_sum - n_a * (n_a + 1) / 2) / (n_a * n_c))
