"""Fast Adaptive Boundary attack: fab, fab-t.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020, https://arxiv.org/abs/1907.02044, and its targeted version FAB-T as
AutoAttack runs it (Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690). Written from
the papers; the reference code (fra31/auto-attack) was read to check the results, no code
was copied.

FAB is a minimum-norm attack: each step linearises the classifier at the current iterate,
projects both the iterate and the original input onto the linearised decision boundary
intersected with the box [0, 1] (:func:`project_on_hyperplane`), and moves to a convex
combination of the two projections biased towards the original input; an iterate that
fools the model is recorded and pulled back towards the original input. Native torch,
batched, on the model's device for the whole loop: no numpy and no host synchronisation in
the steps (samples are selected on the host once per call). Images are in [0, 1]; any
input shape (2D images and 3D volumes: every sample is flattened).
"""

from __future__ import annotations

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import MARGIN, MinimumNormAttack, Norm, Params
from medaudit.core.lazy import torch
from medaudit.plugins.attacks._apgd import col

#: Half of these radii is where a random restart starts for a sample with no adversarial
#: found yet: the reference's defaults when it is given no epsilon.
UNFOUND_RESTART_RADIUS = {Norm.LINF: 0.3, Norm.L2: 1.0}


def _size(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The norm of each row (or sample) of ``delta``."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)


def _dual_size(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The dual norm of each sample's gradient (L1 for L-inf, L2 for L2): the distance to a
    linearised boundary is ``|f| / dual``."""
    flat = grad.flatten(1)
    return flat.abs().sum(1) if norm is Norm.LINF else flat.norm(dim=1)


def _level(weight: torch.Tensor, cap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest ``lam >= 0`` with ``sum_i weight_i * min(lam, cap_i) >= target``
    (``weight``, ``cap`` >= 0 of shape N x D, ``target`` >= 0 of shape N), or the largest cap
    where no ``lam`` reaches the target.

    The sum is piecewise linear and non-decreasing in ``lam``, with a kink at every cap: sort
    the caps, evaluate the sum at every kink with cumulative sums, count the kinks where it is
    still below the target, and solve the linear piece after them. Vectorised: one sort, no
    loop over coordinates or samples.
    """
    cap_sorted, order = cap.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    total = weight_sorted.sum(1, keepdim=True)
    # At the kink cap_k: the coordinates with caps <= cap_k are saturated (they give
    # weight * cap), the others give weight * cap_k.
    saturated = (weight_sorted * cap_sorted).cumsum(1)
    free = total - weight_sorted.cumsum(1)
    at_kink = saturated + cap_sorted * free
    passed = (at_kink < target[:, None]).sum(1, keepdim=True)
    # Between kinks k - 1 and k the sum is saturated[k - 1] + lam * free[k - 1] (k = 0: 0 + lam * total).
    saturated_before = torch.cat([torch.zeros_like(total), saturated], 1).gather(1, passed).squeeze(1)
    free_before = torch.cat([total, free], 1).gather(1, passed).squeeze(1)
    lam = (target - saturated_before) / free_before.clamp_min(torch.finfo(free_before.dtype).tiny)
    unreachable = passed.squeeze(1) == cap.shape[1]
    return torch.where(unreachable, cap_sorted[:, -1], lam.clamp(min=0).minimum(cap_sorted[:, -1]))


def project_on_hyperplane(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The smallest ``d`` (in ``norm``, L-inf or L2) with ``<w, d> = c`` and ``t + d`` in [0, 1], per row.

    ``t`` and ``w`` are N x D, ``c`` is N: ``t + d`` is the projection of the point ``t`` onto
    the hyperplane ``<w, z> = <w, t> + c`` intersected with the box (the paper's projection,
    Section 3.1). Where the hyperplane misses the box, ``d`` moves every coordinate as far as
    the box allows in the direction that brings ``<w, d>`` towards ``c`` (the box corner
    closest to the hyperplane), as the paper does.

    Flipping the signs makes ``c >= 0``. A coordinate moved by ``d_i`` along ``sign(w_i)``
    has ``room_i`` (``1 - t_i`` upwards, ``t_i`` downwards). L-inf: ``d_i = sign(w_i) min(lam,
    room_i)``, so ``<w, d> = sum |w_i| min(lam, room_i)``; L2 (KKT: ``d`` is ``lam * w``
    clipped to the box): ``d_i = w_i min(lam, room_i / |w_i|)``, so ``<w, d> = sum w_i^2
    min(lam, room_i / |w_i|)``. Both are solved for the smallest ``lam`` by :func:`_level`.
    """
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip
    room = torch.where(w > 0, 1 - t, t).clamp_min(0)
    magnitude = w.abs()
    if norm is Norm.LINF:
        lam = _level(magnitude, room, c)
        return w.sign() * torch.minimum(lam[:, None], room)
    moves = magnitude > 1e-12
    cap = torch.where(moves, room / magnitude.clamp_min(1e-12), torch.zeros_like(room))
    lam = _level(torch.where(moves, magnitude**2, torch.zeros_like(magnitude)), cap, c)
    return w * torch.minimum(lam[:, None], cap)


class FABParams(Params):
    steps: int = Field(
        100, ge=1, le=10_000, description="Iterations per run (per restart, and per target class for fab-t)."
    )
    restarts: int = Field(
        1, ge=1, le=100,
        description="Runs per target; the first starts at the input, the others at a random point at half the "
        "smallest perturbation found so far (see the attack's description).",
    )
    alpha_max: float = Field(
        0.1, ge=0, le=1,
        description="Largest weight of the projection of the original input in each step: the bias towards the "
        "input that keeps the perturbation small.",
    )
    eta: float = Field(
        1.05, ge=1, le=2, description="Overshoot: how far past the linearised boundary each step goes (1: onto it)."
    )
    beta: float = Field(
        0.9, gt=0, lt=1,
        description="Backward step: an iterate that fools the model is pulled back to x + beta (x' - x).",
    )


class FAB(MinimumNormAttack):
    """Fast Adaptive Boundary attack: steps to the projection onto the linearised boundary, biased towards the input.

    Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
    attack", ICML 2020, https://arxiv.org/abs/1907.02044. Untargeted, white box (gradients),
    L-inf and L2; minimum norm (each sample's smallest fooling perturbation, projected onto
    every budget by the runner). Each step linearises ``f_k - f_y`` at the iterate for every
    class ``k != y`` (one backward pass per class), takes the class whose linearised boundary
    is closest, projects the iterate and the input onto that boundary within [0, 1] and moves
    to ``(1 - a)(x' + eta d') + a (x + eta d)``, with ``a = min(|d'| / (|d'| + |d|),
    alpha_max)``; a fooling iterate is recorded and pulled back to ``x + beta (x' - x)``.
    Defaults as the reference: 100 iterations, 1 restart, alpha_max = 0.1, eta = 1.05,
    beta = 0.9. Samples the model already gets wrong, and those where no adversarial is
    found, are returned unchanged. Classification; 2D images and 3D volumes.

    Deviations from the reference: every restart (and target class) runs on every sample
    the model classifies correctly, and the smallest adversarial over them is kept (the
    reference stops a sample once it is fooled within its epsilon, which a minimum-norm
    attack does not have); a restart starts at a random point on the sphere of half the
    smallest perturbation found so far for that sample (the reference: half its epsilon),
    or of half the reference's default epsilon (0.3 L-inf, 1.0 L2) where none was found yet;
    the gradients of ``f_k - f_y`` are taken directly (C - 1 backward passes, the closest
    class kept as they go, instead of C passes and their differences); and the result is
    checked with one more forward pass over the whole batch.
    """

    name = "fab"
    loss_kinds = frozenset({MARGIN})  # the linearised distance to the decision boundary
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = FABParams

    def targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """The target class of each run, per sample; None: untargeted (the closest boundary)."""
        return [None]

    def minimal(self, model, x, y, *, norm, generator):
        p: FABParams = self.params
        x = x.detach()
        with torch.no_grad():
            logits = model(x).float()
        best = x.clone()
        idx = (logits.argmax(1) == y).nonzero().squeeze(1)  # the one host sync: attack the correct ones only
        if len(idx) == 0:
            return best
        xs, ys = x[idx], y[idx]
        best_s, best_size = xs.clone(), torch.full(ys.shape, float("inf"), device=x.device)
        for target in self.targets(logits[idx], ys):
            for restart in range(p.restarts):
                start = xs if restart == 0 else self._random_start(xs, best_size, norm, generator)
                found, size = self._run(model, xs, ys, start, target, norm)
                smaller = size < best_size
                best_s = torch.where(col(smaller, xs), found, best_s)
                best_size = torch.where(smaller, size, best_size)
        best[idx] = best_s
        with torch.no_grad():
            fooled = model(best).argmax(1) != y
        return torch.where(col(fooled, x), best, x)

    @staticmethod
    def _random_start(x, best_size, norm, generator):
        """A random point on the sphere of radius half the smallest perturbation found (half
        the reference's default epsilon where none was), clipped to [0, 1]."""
        radius = torch.where(best_size.isinf(), UNFOUND_RESTART_RADIUS[norm], best_size) / 2
        if norm is Norm.LINF:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = noise / col(_size(noise, norm).clamp_min(1e-12), x)
        return (x + col(radius, x) * noise).clamp(0.0, 1.0)

    def _boundary(self, model, x_adv, y, target, norm):
        """The linearised boundary at ``x_adv``: per sample ``f = z_s - z_y`` (negative while
        correct) and its gradient, for the target ``s`` or, untargeted, the class whose
        linearised boundary is closest in ``norm``."""
        xg = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xg).float()
            f_y = logits.gather(1, y[:, None]).squeeze(1)
            if target is not None:
                f = logits.gather(1, target[:, None]).squeeze(1) - f_y
                (grad,) = torch.autograd.grad(f.sum(), xg)
                return f.detach(), grad
            n_classes = logits.shape[1]
            best_f, best_grad, best_dist = None, None, None
            for j in range(n_classes - 1):
                other = j + (j >= y).long()  # the j-th class other than y
                f = logits.gather(1, other[:, None]).squeeze(1) - f_y
                (grad,) = torch.autograd.grad(f.sum(), xg, retain_graph=j < n_classes - 2)
                f = f.detach()
                dist = f.abs() / (_dual_size(grad, norm) + 1e-12)
                if best_f is None:
                    best_f, best_grad, best_dist = f, grad, dist
                    continue
                closer = dist < best_dist
                best_f = torch.where(closer, f, best_f)
                best_grad = torch.where(col(closer, grad), grad, best_grad)
                best_dist = torch.where(closer, dist, best_dist)
            return best_f, best_grad

    def _run(self, model, x, y, start, target, norm):
        """One FAB run from ``start``: per sample the smallest adversarial iterate (``x``
        where none) and its size (inf where none)."""
        p: FABParams = self.params
        n = x.shape[0]
        x0 = x.flatten(1)
        x1 = start.flatten(1)
        best, best_size = x0.clone(), torch.full((n,), float("inf"), device=x.device)
        for _ in range(p.steps):
            f, grad = self._boundary(model, x1.view_as(x), y, target, norm)
            w = grad.flatten(1)
            # The boundary f(x1) + <w, z - x1> = 0, seen from x1 and from x0.
            c1 = -f
            c0 = -f - (w * (x0 - x1)).sum(1)
            with torch.no_grad():
                d = project_on_hyperplane(torch.cat([x1, x0]), torch.cat([w, w]), torch.cat([c1, c0]), norm)
                d1, d0 = d[:n], d[n:]
                size1, size0 = _size(d1, norm).clamp_min(1e-8), _size(d0, norm).clamp_min(1e-8)
                alpha = (size1 / (size1 + size0)).clamp(max=p.alpha_max)[:, None]
                x1 = ((1 - alpha) * (x1 + p.eta * d1) + alpha * (x0 + p.eta * d0)).clamp(0.0, 1.0)
                fooled = model(x1.view_as(x)).argmax(1) != y
                size = _size(x1 - x0, norm)
                smaller = fooled & (size < best_size)
                best = torch.where(smaller[:, None], x1, best)
                best_size = torch.where(smaller, size, best_size)
                x1 = torch.where(fooled[:, None], x0 + p.beta * (x1 - x0), x1)
        return best.view_as(x), best_size


class FABTParams(FABParams):
    n_target_classes: int = Field(
        9, ge=1, le=1000,
        description="Target classes: those with the highest clean logits after the true one (at most C - 1).",
    )


class FABT(FAB):
    """Targeted FAB over the top-k other classes, keeping each sample's smallest adversarial (FAB-T of AutoAttack).

    Croce & Hein, ICML 2020, https://arxiv.org/abs/1907.02044 and
    https://arxiv.org/abs/2003.01690. White box (gradients), L-inf and L2, minimum norm. For
    each of the ``n_target_classes`` classes with the highest clean logits after the true
    one, FAB (see ``fab``) steps towards the linearised boundary between the true class and
    that target only (one backward pass per step instead of one per class), and each sample
    keeps its smallest adversarial over the targets. Success is any misclassification, so
    the attack is untargeted for medaudit (``targeted = False``), as ``apgd-t``. Defaults as
    the AutoAttack standard version: 100 iterations, 1 restart, 9 targets (capped at
    num_classes - 1), alpha_max = 0.1, eta = 1.05, beta = 0.9. Classification; 2D images
    and 3D volumes. Deviations: those of ``fab``; every target runs on every correctly
    classified sample (the reference only on those not fooled yet within its epsilon), and
    2-class models get their one target (the reference indexes past the classes when
    n_target_classes exceeds num_classes - 1).
    """

    name = "fab-t"
    Params = FABTParams

    def targets(self, logits, y):
        p: FABTParams = self.params
        ranking = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        return [ranking[:, k] for k in range(min(p.n_target_classes, logits.shape[1] - 1))]


@hookimpl
def register_attacks(register):
    register(FAB)
    register(FABT)
