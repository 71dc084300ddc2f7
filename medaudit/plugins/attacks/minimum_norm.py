"""Minimum-norm attacks: deepfool, cw.

DeepFool and Carlini-Wagner L2.

They search for each sample's smallest fooling perturbation; the runner projects it onto
every budget of the threat model and records its size, so one run gives the whole curve
of robust accuracy against epsilon (see :class:`~medaudit.core.components.MinimumNormAttack`).
"""

from __future__ import annotations

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import MARGIN, AttackFamily, MinimumNormAttack, Norm, Params
from medaudit.core.lazy import torch
from medaudit.core.perturbation import margin, per_sample_l2


class DeepFoolParams(Params):
    steps: int = Field(50, ge=1, le=1000, description="Maximum linearisation steps.")
    overshoot: float = Field(0.02, ge=0.0, le=1.0, description="Relative overshoot past the linearised boundary.")
    candidates: int = Field(10, ge=2, le=1000, description="Classes considered: the top-scoring ones, true class included.")


class DeepFool(MinimumNormAttack):
    """DeepFool: repeatedly steps to the nearest linearised decision boundary (minimum norm).

    Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
    deep neural networks", CVPR 2016, https://arxiv.org/abs/1511.04599. Untargeted, white
    box (gradients), L2 and L-inf (the L-inf step uses the dual L1 norm, as in the paper's
    l_p variant). Defaults: 50 steps, overshoot 0.02, the 10 top classes (as ART's
    ``nb_grads``). Each step runs the model forward, and once backward per candidate
    class, on the samples still classified correctly only: a sample leaves the loop once it
    is fooled, with the perturbation that fooled it (as the reference implementations do),
    and the loop stops once every sample is fooled (one host synchronisation per step, to
    select the samples left). The result is that of stepping every sample on every step and
    masking the fooled ones (earlier versions), in fewer model calls, except that a model's
    floating-point results can differ in the last bits with the batch's size (on the demo
    model: some adversarials by under 3e-8). Any input shape (2D images and 3D volumes).
    """

    name = "deepfool"
    family = AttackFamily.MINIMUM_NORM
    loss_kinds = frozenset({MARGIN})
    norms = frozenset({Norm.L2, Norm.LINF})
    dims = frozenset({2, 3})
    Params = DeepFoolParams

    def minimal(self, model, x, y, *, norm, generator):
        p: DeepFoolParams = self.params
        shape = (-1,) + (1,) * (x.dim() - 1)
        r_total = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))  # the steps' precision
        x_adv = x.detach().clone()
        # The samples not seen fooled yet. A fooled sample's perturbation never changes again,
        # so leaving it out of the later steps changes no result, only the model calls.
        todo = torch.arange(x.shape[0], device=x.device)
        for _ in range(p.steps):
            xg = x_adv[todo].requires_grad_(True)
            y_todo = y[todo]
            logits = model(xg).float()
            active = logits.argmax(1) == y_todo
            still = todo[active]  # the one host sync per step
            if len(still) == 0:
                break
            k = min(p.candidates, logits.shape[1])
            others = logits.scatter(1, y_todo[:, None], float("-inf")).topk(k - 1, dim=1).indices
            f_y = logits.gather(1, y_todo[:, None]).squeeze(1)
            best_dist = torch.full_like(f_y, float("inf"))
            best_step = torch.zeros_like(xg)
            for j in range(k - 1):
                f = logits.gather(1, others[:, j : j + 1]).squeeze(1) - f_y  # < 0 while correct
                (w,) = torch.autograd.grad(f.sum(), xg, retain_graph=j < k - 2)
                if norm is Norm.L2:
                    w_norm = per_sample_l2(w).flatten()
                    dist = f.abs() / w_norm
                    step = ((f.abs() + 1e-4) / w_norm**2).view(shape) * w
                else:
                    w_norm = w.flatten(1).abs().sum(1).clamp_min(1e-12)
                    dist = f.abs() / w_norm
                    step = ((f.abs() + 1e-4) / w_norm).view(shape) * w.sign()
                closer = dist < best_dist
                best_dist = torch.where(closer, dist, best_dist)
                best_step = torch.where(closer.view(shape), step, best_step)
            with torch.no_grad():
                r_todo = r_total[todo] + torch.where(active.view(shape), best_step, torch.zeros_like(best_step))
                r_total[todo] = r_todo
                x_adv[todo] = (x[todo] + (1 + p.overshoot) * r_todo).clamp(0.0, 1.0)
            todo = still
        return x_adv.detach()


class CWParams(Params):
    steps: int = Field(100, ge=1, le=100_000, description="Adam steps per value of the constant c.")
    search_steps: int = Field(5, ge=1, le=50, description="Binary-search steps over c.")
    initial_const: float = Field(0.1, gt=0, description="Starting c, the weight of the misclassification term.")
    learning_rate: float = Field(0.01, gt=0, description="Adam learning rate in tanh space.")
    confidence: float = Field(0.0, ge=0, description="Logit margin kappa required past the boundary.")


class CarliniWagnerL2(MinimumNormAttack):
    """Carlini-Wagner L2: optimises the smallest L2 perturbation that flips the decision.

    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P
    2017, https://arxiv.org/abs/1608.04644. Untargeted, white box (gradients), L2 only.
    Minimises ``||x' - x||^2 + c * max(z_y - max_{i!=y} z_i + kappa, 0)`` over
    ``x' = (tanh(w) + 1) / 2`` with Adam, and binary-searches ``c`` per sample (x10 until
    the first success, then bisection). Keeps each sample's smallest successful x'.
    Defaults: 5 search steps x 100 Adam steps, c0 = 0.1, lr 0.01, kappa 0 (the paper used
    9 x 10000 steps and c0 = 1e-3; raise them for a final audit). Any input shape.
    """

    name = "cw"
    family = AttackFamily.MINIMUM_NORM
    loss_kinds = frozenset({MARGIN})
    norms = frozenset({Norm.L2})
    dims = frozenset({2, 3})
    Params = CWParams

    def minimal(self, model, x, y, *, norm, generator):
        p: CWParams = self.params
        n = x.shape[0]
        shape = (-1,) + (1,) * (x.dim() - 1)
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), p.initial_const, device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best = x.clone()
        for _ in range(p.search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=p.learning_rate)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(p.steps):
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv).float()
                gap = margin(logits, y)
                l2sq = (x_adv - x).flatten(1).pow(2).sum(1)
                loss = (l2sq + const * (gap + p.confidence).clamp_min(0)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    fooled = -gap > p.confidence
                    better = fooled & (l2sq < best_l2)
                    best_l2 = torch.where(better, l2sq, best_l2)
                    best = torch.where(better.view(shape), x_adv.detach(), best)
                    succeeded |= fooled
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper.isinf(), const * 10, (lower + upper) / 2)
        return best


@hookimpl
def register_attacks(register):
    register(DeepFool)
    register(CarliniWagnerL2)
