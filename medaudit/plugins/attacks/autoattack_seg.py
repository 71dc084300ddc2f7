"""AutoAttack for segmentation: autoattack-seg.

AutoAttack adapted to (volumetric) segmentation, after ROG; its members (not registered on
their own) reuse the building blocks of :mod:`._apgd`.

Daza, Pérez & Arbeláez, "Towards Robust General Medical Image Segmentation", MICCAI 2021,
https://arxiv.org/abs/2107.04263 (ROG), which adapts the four members of AutoAttack
(Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690) to label maps: APGD-CE,
APGD-DLR, FAB-T and Square. Written from the papers and from the description of their
code in ``methods.md`` section 3; no code was copied.

A case's score is the foreground Dice of the argmax prediction against the truth
(:func:`medaudit.core.perturbation.attacker_score`); every member returns, per case, the
input in the budget on which it found the lowest Dice. Native torch, batched, on the
input's device: per-case rules are masks, and cases are selected on the host only between
runs (restarts, target classes). Gradients are taken w.r.t. the input only.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Attack, AttackFamily, Norm, Params, Task
from medaudit.core.lazy import torch
from medaudit.core.perturbation import attacker_score, project
from medaudit.core.segmentation import dense_cross_entropy
from medaudit.plugins.attacks._apgd import apgd_search, col, p_schedule, random_boxes

Member = Literal["apgd-ce", "apgd-dlr", "fab-t", "square"]
MEMBERS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "fab-t", "square")


def dice(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-case foreground Dice of the argmax prediction (the attacker minimises it)."""
    return attacker_score(logits.detach(), y)


def dense_dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR per voxel, ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` over the K
    logits of each voxel (``pi`` sorts them in decreasing order), averaged over the voxels
    of each case. Needs K >= 3."""
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    top = z.topk(3, dim=1).values
    return (-(true - other) / (top[:, 0] - top[:, 2] + 1e-12)).flatten(1).mean(1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": dense_cross_entropy,
    "dlr": dense_dlr,
}


def _clean(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)
    return logits, dice(logits, y)


# -- APGD -----------------------------------------------------------------------------


class APGDSegParams(Params):
    loss: Literal["ce", "dlr"] = Field("ce", description="Voxel-wise cross-entropy or DLR, averaged over the volume.")
    steps: int = Field(20, ge=1, le=10_000, description="Iterations per restart (ROG: 5).")
    restarts: int = Field(1, ge=1, le=100, description="Random restarts (ROG: 5).")
    rho: float = Field(0.75, gt=0, le=1, description="Step halving when fewer than rho of the steps raised the loss.")
    success_fraction: float = Field(
        0.5, gt=0, le=1,
        description="A case is broken below this fraction of its clean Dice; broken cases are not restarted.",
    )


class APGDSeg(Attack):
    """Volumetric APGD (member of ``autoattack-seg``): a voxel-averaged loss, keeping the lowest-Dice iterate.

    The APGD schedule of ``apgd-ce`` (step 2 * eps halved at the checkpoints, momentum
    0.75, rho = 0.75, restart from the highest-loss point) ascends the voxel-wise
    cross-entropy (``loss="ce"``) or DLR (``loss="dlr"``, K >= 3), averaged over the
    volume. Each case returns the iterate with the lowest Dice, not the highest loss.
    Restarts run on the cases whose Dice is still above ``success_fraction`` of their clean
    Dice, and a case keeps its lowest-Dice result over the restarts. L-inf only (the
    ensemble's other members are). As in ``apgd-ce``, the random start is medaudit's
    (uniform in the ball), not the reference's (on its surface).
    """

    name = "apgd-seg"
    family = AttackFamily.ITERATIVE
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset({Norm.LINF})
    Params = APGDSegParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: APGDSegParams = self.params
        if eps == 0:
            return x.clone()
        loss_fn = LOSSES[p.loss]
        _, clean = _clean(model, x, y)
        out, low = x.clone(), torch.full_like(clean, float("inf"))
        for _ in range(p.restarts):
            idx = (low >= p.success_fraction * clean).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xs, ys = x[idx], y[idx]

            def objective(x_adv, ys=ys):
                x_adv = x_adv.detach().requires_grad_(True)
                logits = model(x_adv)
                loss = loss_fn(logits, ys)
                (grad,) = torch.autograd.grad(loss.sum(), x_adv)
                return logits.detach(), loss.detach(), grad

            x_new, d_new, _ = apgd_search(
                objective, xs, eps=eps, norm=norm, steps=p.steps, rho=p.rho, generator=generator,
                score=lambda logits, loss, ys=ys: dice(logits, ys),
            )
            take = d_new < low[idx]
            out[idx] = torch.where(col(take, x_new), x_new, out[idx])
            low[idx] = torch.where(take, d_new, low[idx])
        return out


# -- FAB-T ----------------------------------------------------------------------------


def linf_to_hyperplane(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The smallest-L-inf ``d`` (per row) with ``w . d = c`` and ``p + d`` in [0, 1].

    ``p`` and ``w`` are ``N x d``, ``c`` is ``N``. Every coordinate moves by ``min(t, room)``
    towards the hyperplane, where ``room`` is its distance to the box in that direction;
    ``t`` solves the piecewise-linear equation exactly (sorting the rooms). Where the box
    cannot reach the hyperplane, every coordinate moves as far as the box allows.
    """
    p64, w64, c64 = p.double(), w.double(), c.double()
    direction = w64.sign() * c64.sign()[:, None]
    room = torch.where(direction > 0, 1 - p64, p64).clamp_min(0)
    rooms, order = room.sort(1)
    weights = w64.abs().gather(1, order)
    # Reach at t = rooms[k]: the coordinates below k are at their room, the others at t.
    spent = (weights * rooms).cumsum(1)
    before = spent - weights * rooms
    after = weights.flip(1).cumsum(1).flip(1)
    reach = before + rooms * after
    target = c64.abs()[:, None]
    k = (reach < target).sum(1, keepdim=True)
    feasible = k < p.shape[1]
    k = k.clamp(max=p.shape[1] - 1)
    t = (target - before.gather(1, k)) / after.gather(1, k).clamp_min(1e-30)
    t = torch.where(feasible, t, rooms[:, -1:])
    d = direction * torch.minimum(room, t)
    return torch.where(c64[:, None] == 0, 0.0, d).to(p.dtype)


class FABSegParams(Params):
    steps: int = Field(20, ge=1, le=10_000, description="Iterations per target class and restart (ROG: 5).")
    restarts: int = Field(1, ge=1, le=100, description="Restarts per target class (ROG: 5).")
    alpha_max: float = Field(0.1, ge=0, le=1, description="Largest weight of the step from the clean input.")
    eta: float = Field(1.05, ge=1, description="Overshoot of the projections.")
    beta: float = Field(0.9, gt=0, le=1, description="Step back towards the clean input after an adversarial iterate.")
    success_fraction: float = Field(
        0.5, gt=0, le=1, description="An iterate is adversarial below this fraction of its case's clean Dice."
    )


class FABTSeg(Attack):
    """Volumetric FAB-T (member of ``autoattack-seg``): FAB's L-inf projection steps onto one hyperplane per case.

    For target rank t = 2..K, each voxel's target is the class with its t-th largest clean
    logit. The decision function is ``g(x) = mean over voxels of z_target - z_true``; its
    linearisation at the iterate gives one hyperplane per case, and FAB steps (Croce & Hein,
    ICML 2020, https://arxiv.org/abs/1907.02044) as in the reference: the minimal-L-inf
    projections onto it (within [0, 1]) from the iterate (d1) and from the clean input
    (d2), ``x <- clip((1 - a)(x + eta d1) + a (x0 + eta d2))`` with
    ``a = min(|d1| / (|d1| + |d2|), alpha_max)``; an adversarial iterate (Dice below
    ``success_fraction`` of the case's clean Dice) steps back to ``x0 + beta (x - x0)``.
    The first restart of a target starts at the clean input, later ones at
    ``x0 + 0.5 eps u / |u|_inf``; later targets and restarts run on the cases with no
    adversarial iterate within eps yet. Defaults alpha_max 0.1, eta 1.05, beta 0.9 (ROG).

    Simplifications and one addition:

    - FAB is a minimum-norm attack. ROG accepts its result only when its L-inf norm is
      <= eps (else the case keeps its clean input). Here each iterate is projected onto the
      eps-ball (a no-op for iterates inside it), as medaudit does for every minimum-norm
      attack (:class:`~medaudit.core.components.MinimumNormAttack`), and each case returns
      the projected iterate with the lowest Dice. This includes FAB's accepted result (an
      in-budget adversarial iterate is its own projection), so it is never weaker. The
      addition matters: the voxel-mean hyperplane is far (the first projections moved 0.3
      to 0.6 in L-inf on phantom U-Nets), and in tens of iterations FAB's iterates do not
      shrink back inside an 8/255 ball. It costs one more forward pass per iteration.
    - The minimal norm itself is not reported.
    - Restarts start at radius 0.5 eps. The reference uses 0.5 min(best norm, eps), but
      restarts here only run on cases with no in-budget adversarial, and ROG accepts only
      those, so for them the best norm that counts is infinite.
    - ROG's threshold is half the mean clean Dice of the test set, which a batch cannot
      know. The per-case ``success_fraction`` of the clean Dice replaces it.
    """

    name = "fab-t-seg"
    family = AttackFamily.MINIMUM_NORM
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset({Norm.LINF})
    Params = FABSegParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: FABSegParams = self.params
        if eps == 0:
            return x.clone()
        clean_logits, clean = _clean(model, x, y)
        threshold = p.success_fraction * clean
        ranking = clean_logits.argsort(1, descending=True)
        out, low = x.clone(), torch.full_like(clean, float("inf"))
        for rank in range(1, ranking.shape[1]):
            for restart in range(p.restarts):
                idx = (low >= threshold).nonzero().squeeze(1)
                if len(idx) == 0:
                    return out
                target = ranking[idx, rank]
                x_new, d_new = self._run(model, x[idx], y[idx], target, threshold[idx], eps, restart, generator)
                take = d_new < low[idx]
                out[idx] = torch.where(col(take, x_new), x_new, out[idx])
                low[idx] = torch.where(take, d_new, low[idx])
        return out

    def _run(self, model, x0, y, target, threshold, eps, restart, generator):
        p: FABSegParams = self.params
        if restart == 0:
            x1 = x0.clone()
        else:
            u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
            u = u / u.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
            x1 = (x0 + 0.5 * eps * u).clamp(0, 1)
        x_low, low = x0.clone(), torch.full((x0.shape[0],), float("inf"), device=x0.device)
        flat0 = x0.flatten(1)
        for _ in range(p.steps):
            x1 = x1.detach().requires_grad_(True)
            z = model(x1).float()
            g = (z.gather(1, target[:, None]) - z.gather(1, y[:, None])).flatten(1).mean(1)
            (w,) = torch.autograd.grad(g.sum(), x1)
            g, w, flat1 = g.detach(), w.flatten(1), x1.detach().flatten(1)
            # The hyperplane w . v = w . x1 - g(x1), seen from the iterate and from x0.
            d1 = linf_to_hyperplane(flat1, w, -g)
            d2 = linf_to_hyperplane(flat0, w, (w * (flat1 - flat0)).sum(1) - g)
            a1 = d1.abs().amax(1).clamp_min(1e-8)
            a2 = d2.abs().amax(1).clamp_min(1e-8)
            a = (a1 / (a1 + a2)).clamp(0, p.alpha_max)[:, None]
            x1 = ((1 - a) * (flat1 + p.eta * d1) + a * (flat0 + p.eta * d2)).clamp(0, 1).view_as(x0)

            # FAB's adversarial test on the iterate; its projection onto the eps-ball (the
            # iterate itself when inside) is the in-budget candidate.
            inside = project(x1, x0, eps, Norm.LINF)
            with torch.no_grad():
                d, d_inside = dice(model(torch.cat([x1, inside])), torch.cat([y, y])).chunk(2)
            lower = d_inside < low
            x_low = torch.where(col(lower, x0), inside, x_low)
            low = torch.where(lower, d_inside, low)
            adversarial = d < threshold
            x1 = torch.where(col(adversarial, x0), x0 + p.beta * (x1 - x0), x1)
        return x_low.detach(), low


# -- Square ---------------------------------------------------------------------------


class SquareSegParams(Params):
    queries: int = Field(200, ge=1, le=1_000_000, description="Model queries per case, the first included (ROG: 5).")
    p_init: float = Field(0.8, gt=0, le=1, description="Initial fraction of the voxels each square (cube) covers.")
    rescale_schedule: bool = Field(
        False, description="Fit the schedule of p (written for 10,000 queries) to `queries`; ROG and AutoAttack do not."
    )


class SquareSeg(Attack):
    """Volumetric Square Attack (member of ``autoattack-seg``): random search on the case's Dice.

    Andriushchenko et al., ECCV 2020, https://arxiv.org/abs/1912.00049, as ROG adapts it.
    Starts from stripes of +-eps per channel: per image column in 2D (as the reference),
    per (H, W) position and constant along depth in 3D (as ROG). Each query sets a random
    square (2D) or cube (3D) of side ``round((p * voxels)^(1 / dims))``, per channel, to
    +-eps, and keeps it when the case's Dice decreases. p starts at ``p_init`` = 0.8 and
    halves after 10, 50, 200, 500... queries (not rescaled, as ROG and AutoAttack). Scores
    only, no gradients.
    """

    name = "square-seg"
    family = AttackFamily.SCORE_BASED
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset({Norm.LINF})
    Params = SquareSegParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: SquareSegParams = self.params
        if eps == 0:
            return x.clone()
        x = x.detach()
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        dims, n_vox, device = len(spatial), math.prod(spatial), x.device

        def signs(*shape):
            return torch.where(torch.rand(shape, generator=generator, device=device) < 0.5, -1.0, 1.0).to(x.dtype)

        with torch.no_grad():
            x_best = (x + eps * signs(n, c, 1, *spatial[1:])).clamp(0, 1)
            best = dice(model(x_best), y)
            for i in range(p.queries - 1):
                frac = p_schedule(i, p.queries, p.p_init, p.rescale_schedule)
                side = min(max(round((frac * n_vox) ** (1 / dims)), 1), *spatial)
                box, _ = random_boxes(n, spatial, side, generator, device)
                # x_best + 2 eps * sign, projected: the cube's voxels go to x +- eps.
                x_new = torch.where(box, x + eps * signs(n, c, *([1] * dims)), x_best).clamp(0, 1)
                cand = dice(model(x_new), y)
                accept = cand < best
                x_best = torch.where(col(accept, x), x_new, x_best)
                best = torch.where(accept, cand, best)
        return x_best


# -- the ensemble ---------------------------------------------------------------------


class AutoAttackSegParams(Params):
    attacks: list[Member] = Field(
        default_factory=lambda: list(MEMBERS), min_length=1,
        description="Members, each run from the clean input; apgd-dlr is skipped on models with fewer than 3 classes.",
    )
    steps: int = Field(
        20, ge=1, le=10_000, description="Iterations of APGD per restart and of FAB-T per target (ROG: 5)."
    )
    restarts: int = Field(1, ge=1, le=100, description="Restarts of APGD and of FAB-T per target (ROG: 5).")
    queries: int = Field(
        200, ge=1, le=1_000_000, description="Queries of square per case (ROG: 5; AutoAttack: 5000)."
    )
    success_fraction: float = Field(
        0.5, gt=0, le=1,
        description="A case is broken below this fraction of its clean Dice (FAB-T's adversarial test, restarts).",
    )


class AutoAttackSeg(Attack):
    """AutoAttack for segmentation (ROG): APGD-CE, APGD-DLR, FAB-T and Square; each case keeps its lowest Dice.

    Daza, Pérez & Arbeláez, MICCAI 2021, https://arxiv.org/abs/2107.04263, adapting
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690. Untargeted, white box
    (gradients; square uses scores only), L-inf, 2D images and 3D volumes. The objective is
    the case's foreground Dice of the argmax prediction.

    Ensemble rule (ROG's individual mode): every member runs on every case from the clean
    input, with the generator state the ensemble received (so a member alone, with the same
    seed, gives the same output), and each case keeps the member output with the lowest
    Dice (the first member on ties; the clean input if no member lowers its clean Dice).
    So the robust Dice of a case is the minimum over the members. Members:

    - ``apgd-ce``: APGD on the voxel-wise cross-entropy averaged over the volume; each
      case returns its lowest-Dice iterate;
    - ``apgd-dlr``: the same on the voxel-wise DLR loss; skipped when K < 3;
    - ``fab-t``: FAB-T with one target class per voxel (its t-th ranked clean logit,
      t = 2..K) and one hyperplane per case from the voxel mean of z_target - z_true;
      iterates count only within eps (see :class:`FABTSeg` for what is simplified);
    - ``square``: Square's random search with squares (2D) or cubes (3D) minimising Dice.

    Defaults for CPU-sized audits, all params: ``steps=20`` (ROG: 5, its ``--adv_iters``;
    20 gives APGD's checkpoint schedule room to act), ``restarts=1`` (ROG: 5; AutoAttack's
    standard version: 1), ``queries=200`` (ROG: 5, far too few for a random search;
    AutoAttack: 5000). ``success_fraction=0.5`` replaces ROG's threshold, half the mean
    clean Dice of the test set (a batch cannot know it), by half the case's own clean Dice;
    it decides FAB-T's adversarial test and which cases APGD and FAB-T restart.

    Differences from ROG: its inputs are not in [0, 1], so it clamps to each volume's
    intensity range [b_min, b_max] and scales eps by b_max - b_min. medaudit's inputs are
    windowed into [0, 1] and eps is already in that unit, so eps is used as given and
    the clamp is to [0, 1]. ROG's sequential mode overwrites the Dice of re-attacked cases;
    here the minimum is kept. ROG's PGD baseline is not a member (use ``pgd``).
    """

    name = "autoattack-seg"
    family = AttackFamily.ITERATIVE
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset({Norm.LINF})
    Params = AutoAttackSegParams

    def members(self, num_classes: int | None = None) -> dict[str, Attack]:
        """The members that run, by name, in order; ``apgd-dlr`` is left out when
        ``num_classes`` is known and below 3."""
        p: AutoAttackSegParams = self.params
        apgd = dict(steps=p.steps, restarts=p.restarts, success_fraction=p.success_fraction)
        make = {
            "apgd-ce": lambda: APGDSeg(APGDSegParams(loss="ce", **apgd)),
            "apgd-dlr": lambda: APGDSeg(APGDSegParams(loss="dlr", **apgd)),
            "fab-t": lambda: FABTSeg(FABSegParams(**apgd)),
            "square": lambda: SquareSeg(SquareSegParams(queries=p.queries)),
        }
        names = [n for n in MEMBERS if n in p.attacks]
        if num_classes is not None and num_classes < 3:
            names = [n for n in names if n != "apgd-dlr"]
        return {n: make[n]() for n in names}

    def perturb(self, model, x, y, *, eps, norm, generator):
        if eps == 0:
            return x.clone()
        clean_logits, low = _clean(model, x, y)
        out = x.clone()
        state = generator.get_state()
        for attack in self.members(clean_logits.shape[1]).values():
            own = torch.Generator(device=generator.device)
            own.set_state(state)
            x_adv = attack.perturb(model, x, y, eps=eps, norm=norm, generator=own)
            with torch.no_grad():
                d = dice(model(x_adv), y)
            take = d < low
            out = torch.where(col(take, x), x_adv, out)
            low = torch.where(take, d, low)
        # Move the caller's generator on, so the next batch draws other numbers.
        torch.rand(1, generator=generator, device=generator.device)
        return out.detach()


@hookimpl
def register_attacks(register):
    register(AutoAttackSeg)
