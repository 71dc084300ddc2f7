"""DeepFool's loop as earlier versions ran it (every sample on every step), the reference
the loop over the samples not fooled yet is checked against: by the tests
(tests/plugins/attacks/test_minimum_norm.py) and by benchmarks/deepfool_calls.py."""

from __future__ import annotations

import torch

from medaudit.core.components import Norm
from medaudit.core.perturbation import per_sample_l2


def deepfool_every_sample(model, x, y, *, norm, steps=50, overshoot=0.02, candidates=10):
    """DeepFool as it was before it left the fooled samples out: every step runs the model,
    forward and backward, on the whole batch and masks the fooled samples' steps. The
    reference that the loop over the samples not fooled yet must match exactly."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    r_total = torch.zeros_like(x)
    x_adv = x.clone()
    for _ in range(steps):
        xg = x_adv.detach().requires_grad_(True)
        logits = model(xg).float()
        active = logits.argmax(1) == y
        if not bool(active.any()):
            break
        k = min(candidates, logits.shape[1])
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        f_y = logits.gather(1, y[:, None]).squeeze(1)
        best_dist = torch.full_like(f_y, float("inf"))
        best_step = torch.zeros_like(x)
        for j in range(k - 1):
            f = logits.gather(1, others[:, j : j + 1]).squeeze(1) - f_y
            (w,) = torch.autograd.grad(f.sum(), xg, retain_graph=j < k - 2)
            if norm is Norm.L2:
                w_norm = per_sample_l2(w).flatten()
                step = ((f.abs() + 1e-4) / w_norm**2).view(shape) * w
            else:
                w_norm = w.flatten(1).abs().sum(1).clamp_min(1e-12)
                step = ((f.abs() + 1e-4) / w_norm).view(shape) * w.sign()
            dist = f.abs() / w_norm
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_step = torch.where(closer.view(shape), step, best_step)
        r_total = r_total + torch.where(active.view(shape), best_step, torch.zeros_like(best_step))
        x_adv = (x + (1 + overshoot) * r_total).clamp(0.0, 1.0).detach()
    return x_adv
