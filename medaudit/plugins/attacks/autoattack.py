"""AutoAttack: apgd-ce, apgd-dlr, apgd-t, square, autoattack.

The AutoAttack family, ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``square``, and their ensemble
``autoattack`` (with ``fab`` and ``fab-t`` from :mod:`.fab`);
the building blocks shared with ``autoattack-seg`` are in :mod:`._apgd`.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690. Written from the
paper and from reading the reference code (fra31/auto-attack); no code was copied.

Native torch, batched, on the model's device for the whole loop: no numpy and no per-step
host synchronisation (the per-sample step-size and acceptance rules are masks). Samples
are only selected on the host between runs (restarts, target classes, ensemble members).
Gradients are taken w.r.t. the input only. Images are in [0, 1]; epsilon is in that unit.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

from pydantic import Field, model_validator

from medaudit import hookimpl
from medaudit.core.components import (
    CROSS_ENTROPY, MARGIN, Access, Attack, AttackFamily, AttackOutcome, Norm, Params,
)
from medaudit.core.lazy import F, torch
from medaudit.core.perturbation import margin, per_sample_l2, project
from medaudit.plugins.attacks._apgd import (
    apgd, col, dlr_loss, eot_objective, p_schedule, random_boxes, targeted_loss,
)

def _on_unfooled(
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    out: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor,
) -> None:
    """Run ``run(idx)`` on the samples not fooled yet and keep, per sample, its result where
    it fools the model or reaches a higher loss (updates ``out``, ``fooled``, ``loss``)."""
    idx = (~fooled).nonzero().squeeze(1)
    if len(idx) == 0:
        return
    x_new, fooled_new, loss_new = run(idx)
    take = fooled_new | (loss_new > loss[idx])
    out[idx] = torch.where(col(take, x_new), x_new, out[idx])
    loss[idx] = torch.where(take, loss_new, loss[idx])
    fooled[idx] = fooled_new


class APGDParams(Params):
    steps: int = Field(100, ge=1, le=10_000, description="Iterations per restart.")
    restarts: int = Field(1, ge=1, le=100, description="Random restarts, each on the samples not fooled yet.")
    rho: float = Field(0.75, gt=0, le=1, description="Step halving when fewer than rho of the steps raised the loss.")
    eot_samples: int = Field(
        1, ge=1, le=1000, description="Forward passes each gradient averages over (EOT), for randomised models and "
        "defenses; 1 for a deterministic model. AutoAttack's rand version uses 20.")


class APGDCE(Attack):
    """Auto-PGD on the cross-entropy loss: PGD with momentum and an automatic step-size schedule.

    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690. Untargeted, white box
    (gradients), L-inf (sign steps) or L2 (normalised-gradient steps). Defaults as in
    AutoAttack: 100 iterations, 1 restart, rho = 0.75. Initial step 2 * eps, momentum 0.75;
    at checkpoints after 22, 41, 57, 70, 80, 87, 93 and 99 % of the iterations a sample's
    step is halved and it restarts from its best point when its loss rose on fewer than
    rho of the steps, or when its step was kept last time and its best loss has not
    improved since. Each sample returns its first misclassified iterate, else its highest
    loss point. ``eot_samples`` > 1 averages every gradient over that many forward passes
    (EOT, for randomised models; AutoAttack's ``rand`` version). Classification; 2D images
    and 3D volumes. Deviations from the reference: the random start is medaudit's (uniform
    in the ball, not on its surface) and the first adversarial iterate is kept instead of
    the last.
    """

    name = "apgd-ce"
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({CROSS_ENTROPY})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = APGDParams

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, reduction="none")

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: APGDParams = self.params
        if eps == 0:
            return x.clone()
        out, fooled = x.clone(), torch.zeros_like(y, dtype=torch.bool)
        loss = torch.full(y.shape, float("-inf"), device=x.device)

        def run(idx):
            xs, ys = x[idx], y[idx]
            objective = eot_objective(model, lambda logits: self.loss(logits, ys), p.eot_samples)
            return apgd(objective, xs, ys, eps=eps, norm=norm, steps=p.steps, rho=p.rho, generator=generator)

        for _ in range(p.restarts):
            _on_unfooled(run, out, fooled, loss)
        return out


class APGDDLR(APGDCE):
    """Auto-PGD on the DLR loss (difference of logits ratio), a margin loss invariant to the logits' scale.

    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690: APGD as ``apgd-ce`` on
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, which a model that only rescales its
    logits (a saturated softmax, temperature) cannot flatten. Untargeted, white box, L-inf
    or L2; same defaults and ``eot_samples`` as ``apgd-ce``. Part of AutoAttack's ``plus``
    and ``rand`` versions. Classification; 2D images and 3D volumes. Deviation: the
    reference needs 3 classes; on 2-class models the loss is the unscaled margin (CW).
    """

    name = "apgd-dlr"
    loss_kinds = frozenset({MARGIN})

    def loss(self, logits, y):
        return dlr_loss(logits, y)


class APGDTParams(APGDParams):
    n_target_classes: int = Field(
        9, ge=1, le=1000, description="Target classes: those ranked 2nd, 3rd... by the clean logits (at most C - 1)."
    )


class APGDT(Attack):
    """Targeted Auto-PGD on the DLR-targeted loss, over the top-k other classes, to find untargeted errors.

    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690. White box (gradients),
    L-inf or L2. For each of the ``n_target_classes`` classes with the highest clean logits
    after the first, APGD (see ``apgd-ce``) maximises the targeted loss towards that class
    on the samples still classified correctly. Success is any misclassification, so the
    attack is untargeted for medaudit (``targeted = False``). Defaults as in AutoAttack:
    100 iterations, 1 restart per target, 9 targets (capped at num_classes - 1).
    Classification; 2D images and 3D volumes. Deviation: the reference needs at least 4
    classes (DLR-targeted divides by z_pi1 - (z_pi3 + z_pi4) / 2) and fails on binary
    models. Here 3-class models use the scale z_pi1 - z_pi3, and 2-class models, where no
    third logit exists, use the unscaled logit margin z_t - z_y (the CW loss).
    """

    name = "apgd-t"
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({MARGIN})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = APGDTParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        p: APGDTParams = self.params
        if eps == 0:
            return x.clone()
        with torch.no_grad():
            ranking = model(x).argsort(1, descending=True)
        out, fooled = x.clone(), torch.zeros_like(y, dtype=torch.bool)
        loss = torch.full(y.shape, float("-inf"), device=x.device)
        for rank in range(1, min(p.n_target_classes, ranking.shape[1] - 1) + 1):

            def run(idx, rank=rank):
                xs, ys, target = x[idx], y[idx], ranking[idx, rank]
                objective = eot_objective(model, lambda logits: targeted_loss(logits, ys, target), p.eot_samples)
                return apgd(objective, xs, ys, eps=eps, norm=norm, steps=p.steps, rho=p.rho, generator=generator)

            for _ in range(p.restarts):
                _on_unfooled(run, out, fooled, loss)
        return out


# -- Square Attack ----------------------------------------------------------------------


def _rings(shape: tuple[int, ...], device) -> torch.Tensor:
    """The reference's concentric-squares pattern: ring k around the centre (Chebyshev
    distance k) weighs sum_{j >= k} 1 / (j + 1)^2."""
    dist = torch.zeros((), dtype=torch.long, device=device)
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        dist = torch.maximum(dist, (torch.arange(size, device=device) - size // 2).abs().view(view))
    weights = 1 / (torch.arange(max(s // 2 + 1 for s in shape), device=device) + 1.0) ** 2
    return weights.flip(0).cumsum(0).flip(0)[dist]


def _l2_patterns(side: int, dims: int, device) -> torch.Tensor:
    """Square Attack's L2 update shapes: rings of opposite signs on the two halves of the
    cube (each half, then the whole, of unit L2 norm), one per axis the cube is split along
    (``dims x side^dims``)."""
    rest = (side,) * (dims - 1)
    top, bottom = _rings((side // 2, *rest), device), _rings((side - side // 2, *rest), device)
    split = torch.cat([top / top.norm().clamp_min(1e-12), -bottom / bottom.norm()])
    split = split / split.norm()
    return torch.stack([split.movedim(0, axis) for axis in range(dims)])


class SquareParams(Params):
    queries: int = Field(5000, ge=1, le=1_000_000, description="Model queries per sample, the first included.")
    p_init: float = Field(0.8, gt=0, le=1, description="Initial fraction of the pixels each square covers.")
    rescale_schedule: bool = Field(
        True, description="Fit the schedule of p (written for 10,000 queries) to `queries`; AutoAttack turns it off."
    )
    early_exit: bool = Field(
        True, description="Query only the samples not fooled yet, as the reference does (the same result in fewer "
        "queries; one host sync per iteration to select them). False: every sample on every iteration, no sync.")


class Square(Attack):
    """Square Attack: score-based random search with square-shaped updates on the margin loss.

    Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020, https://arxiv.org/abs/1912.00049.
    Untargeted, black box (scores only, no gradients), L-inf and L2. Defaults: 5000 queries,
    p_init = 0.8, the reference schedule of the square size (halved after 10, 50, 200...
    of 10,000 queries) rescaled to the number of queries. L-inf starts from vertical
    stripes of +-eps and sets a random square, per channel, to +-eps; L2 starts from a grid
    of ring patterns and moves the perturbation's mass between two random squares. A
    candidate is kept when it lowers the margin z_y - max_{i != y} z_i; a sample stops
    changing once misclassified, and (``early_exit``, the default) is no longer queried: each
    iteration queries only the samples not fooled yet, as the reference does, and the search
    stops once every sample is fooled. Candidates are drawn for every sample either way, so
    the search is the same with and without the early exit and only the model calls differ,
    except that the model's floating-point results can differ in the last bits with the
    batch's size and turn a near-tie (on ``examples/attacks.yaml``, 1 of 128 cases at
    0.5/255 and at 1/255 ended unbroken where the full-batch search broke it).
    Classification; 2D images, and 3D volumes with cubes instead of squares. Deviation from
    the reference: every sample draws its own square positions and signs.
    """

    name = "square"
    family = AttackFamily.SCORE_BASED
    loss_kinds = frozenset({MARGIN})
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    needs = Access.SCORES
    Params = SquareParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        if eps == 0:
            return x.clone()
        with torch.no_grad():
            return self._search(model, x.detach(), y, eps, norm, generator)

    def _search(self, model, x, y, eps, norm, generator):
        p: SquareParams = self.params
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        dims, n_pix, device = len(spatial), math.prod(x.shape[2:]), x.device

        def signs(*shape):
            return torch.where(torch.rand(shape, generator=generator, device=device) < 0.5, -1.0, 1.0).to(x.dtype)

        if norm is Norm.LINF:
            x_best = (x + eps * signs(n, c, *([1] * (dims - 1)), spatial[-1])).clamp(0, 1)
        else:
            x_best = project(x + eps * self._l2_init(x, signs, generator), x, eps, norm)
        best = margin(model(x_best).float(), y)
        for i in range(p.queries - 1):
            frac = p_schedule(i, p.queries, p.p_init, p.rescale_schedule)
            side = max(round((frac * n_pix) ** (1 / dims)), 1)
            if norm is Norm.LINF:
                side = min(side, *spatial)
                box, _ = random_boxes(n, spatial, side, generator, device)
                # x_best + 2 eps * sign, projected: the square's pixels go to x +- eps.
                x_new = torch.where(box, x + eps * signs(n, c, *([1] * dims)), x_best).clamp(0, 1)
            else:
                side = max(side, 3)
                side = min(side + 1 - side % 2, *spatial)  # odd, at least 3, as the reference
                x_new = project(x + self._l2_move(x_best - x, side, eps, signs, generator), x, eps, norm)
            if p.early_exit:  # query the samples not fooled yet (a host sync, as in the reference)
                active = (best > 0).nonzero().squeeze(1)
                if len(active) == 0:
                    break
                cand = best.clone()
                cand[active] = margin(model(x_new[active]).float(), y[active])
            else:
                cand = margin(model(x_new).float(), y)
            accept = (best > 0) & (cand < best)
            x_best = torch.where(col(accept, x), x_new, x_best)
            best = torch.where(accept, cand, best)
        return x_best

    @staticmethod
    def _l2_init(x, signs, generator):
        """A grid of ring patterns (side min(H, W) // 5) with random signs per tile and
        channel, centred in the image, of unit L2 norm."""
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        side = max(min(spatial) // 5, 1)
        counts = [size // side for size in spatial]
        tiles, local, inside = [], [], None
        for axis, (size, count) in enumerate(zip(spatial, counts)):
            shape = [1] * len(spatial)
            shape[axis] = size
            pos = (torch.arange(size, device=x.device) - (size - count * side) // 2).view(shape)
            ok = (pos >= 0) & (pos < count * side)
            inside = ok if inside is None else inside & ok
            tiles.append((pos // side).clamp(0, count - 1))
            local.append(pos % side)
        axis = torch.randint(0, len(spatial), (n, *counts), generator=generator, device=x.device)
        rings = _l2_patterns(side, len(spatial), x.device)[(axis[(slice(None), *tiles)], *local)]
        tile_signs = signs(n, c, *counts)[(slice(None), slice(None), *tiles)]
        delta = rings.unsqueeze(1).to(x.dtype) * tile_signs * inside
        return delta / per_sample_l2(delta)

    @staticmethod
    def _l2_move(delta, side, eps, signs, generator):
        """Move the perturbation's mass of two random squares into the first, plus a new
        ring pattern there; return the candidate perturbation rescaled to norm eps."""
        n, c, spatial = delta.shape[0], delta.shape[1], delta.shape[2:]
        box1, local = random_boxes(n, spatial, side, generator, delta.device)
        box2, _ = random_boxes(n, spatial, side, generator, delta.device)
        patterns = _l2_patterns(side, len(spatial), delta.device)
        axis = torch.randint(0, len(spatial), (n,), generator=generator, device=delta.device)
        fresh = patterns[(axis.view(n, *([1] * len(spatial))), *local)].unsqueeze(1) * box1
        fresh = fresh * signs(n, c, *([1] * len(spatial)))

        spatial_dims = tuple(range(2, delta.dim()))
        old = delta * box1
        old = old / (old.pow(2).sum(spatial_dims, keepdim=True).sqrt() + 1e-12)
        union = box1 | box2
        budget = (eps**2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0) / c + (delta * union).flatten(1).pow(2).sum(1)
        new = fresh + old
        new = new / (new.pow(2).sum(spatial_dims, keepdim=True).sqrt() + 1e-12) * col(budget.sqrt(), delta)
        delta = torch.where(union, 0.0, delta) + new * box1
        return delta / per_sample_l2(delta) * eps


# -- the ensemble -----------------------------------------------------------------------


#: The members of each version, in the order they run (as the reference's ``set_version``).
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
MEMBERS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class AutoAttackParams(Params):
    version: Literal["standard", "plus", "rand", "custom"] = Field(
        "standard", description="standard: apgd-ce, apgd-t, fab-t, square. plus: apgd-ce and apgd-dlr with 5 restarts, "
        "fab with 5 restarts, square, apgd-t, fab-t. rand (randomised models and defenses): apgd-ce and apgd-dlr, "
        "each gradient averaged over 20 draws (EOT). custom: the members listed in `attacks`.")
    attacks: list[Literal[MEMBERS]] | None = Field(  # type: ignore[valid-type]
        None, description="The members of version custom, in the order they run.")
    apgd_steps: int = Field(100, ge=1, le=10_000, description="Iterations of the apgd members (apgd-t: per target).")
    n_target_classes: int = Field(9, ge=1, le=1000, description="Target classes of apgd-t and fab-t.")
    fab_steps: int = Field(100, ge=1, le=10_000, description="Iterations of fab and fab-t (fab-t: per target).")
    square_queries: int = Field(5000, ge=1, le=1_000_000, description="Queries of square per sample.")
    restarts: int | None = Field(
        None, ge=1, le=100, description="Restarts of apgd-ce, apgd-dlr and fab; default the version's (plus 5, else 1).")
    eot_samples: int | None = Field(
        None, ge=1, le=1000, description="Forward passes each apgd gradient averages over (EOT); default the "
        "version's (rand 20, else 1).")

    @model_validator(mode="after")
    def _members_match_version(self):
        if self.version == "custom" and not self.attacks:
            raise ValueError("version custom needs `attacks`: the members to run, e.g. [apgd-ce, square]")
        if self.version != "custom" and self.attacks is not None:
            raise ValueError(f"`attacks` is for version custom; version {self.version} runs "
                             f"{', '.join(VERSIONS[self.version])}")
        return self


class AutoAttack(Attack):
    """AutoAttack: an ensemble of parameter-free attacks, each on the samples the ones before left robust.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690. Untargeted, white
    box (gradients), L-inf or L2. Each member attacks only the samples that are correctly
    classified after the previous ones; a sample keeps the first adversarial example found,
    the others are returned unchanged. Versions as the reference's ``set_version``:
    ``standard`` runs apgd-ce (100 iterations, 1 restart), apgd-t (100 iterations, 9
    targets), fab-t (100 iterations, 9 targets) and square (5000 queries, p_init = 0.8, the
    schedule of p not rescaled); ``plus`` adds apgd-dlr and untargeted fab with 5 restarts
    each (and apgd-ce with 5); ``rand``, for randomised models and defenses, runs apgd-ce and
    apgd-dlr with every gradient averaged over 20 forward passes (EOT); ``custom`` runs the
    members listed in ``attacks``. ``apgd_steps``, ``fab_steps``, ``n_target_classes`` and
    ``square_queries`` scale it down for small budgets. Classification; 2D images and 3D
    volumes. Deviations: apgd-t and apgd-dlr work on 2- and 3-class models with margin
    fallbacks (see ``apgd-t``, ``apgd-dlr``), and the reference's L1 variant is not built.
    """

    name = "autoattack"
    family = AttackFamily.ITERATIVE
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = AutoAttackParams
    effort_params = ("apgd_steps", "fab_steps", "square_queries")

    def member_names(self) -> tuple[str, ...]:
        p: AutoAttackParams = self.params
        return tuple(p.attacks) if p.version == "custom" else VERSIONS[p.version]

    def eot_samples(self) -> int:
        p: AutoAttackParams = self.params
        return p.eot_samples or (20 if p.version == "rand" else 1)

    def losses(self):
        return frozenset().union(*(m.losses() for m in self.members()))

    def cost(self, num_classes: int) -> float:
        """The members' costs added up (each runs on what the ones before left robust: an upper figure)."""
        return sum(m.cost(num_classes) for m in self.members())

    def members(self) -> list[Attack]:
        from medaudit.plugins.attacks.fab import FAB, FABT, FABParams, FABTParams

        p: AutoAttackParams = self.params
        restarts = p.restarts or (5 if p.version == "plus" else 1)
        apgd_params = dict(steps=p.apgd_steps, eot_samples=self.eot_samples())
        make = {
            "apgd-ce": lambda: APGDCE(APGDParams(restarts=restarts, **apgd_params)),
            "apgd-dlr": lambda: APGDDLR(APGDParams(restarts=restarts, **apgd_params)),
            "apgd-t": lambda: APGDT(APGDTParams(n_target_classes=p.n_target_classes, **apgd_params)),
            "fab": lambda: FAB(FABParams(steps=p.fab_steps, restarts=restarts)),
            "fab-t": lambda: FABT(FABTParams(steps=p.fab_steps, n_target_classes=p.n_target_classes)),
            "square": lambda: Square(SquareParams(queries=p.square_queries, rescale_schedule=False)),
        }
        return [make[name]() for name in self.member_names()]

    def perturb(self, model, x, y, *, eps, norm, generator):
        if eps == 0:
            return x.clone()
        out = x.clone()
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        for attack in self.members():
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_adv = AttackOutcome.of(attack.perturb(model, x[idx], y[idx], eps=eps, norm=norm,
                                                    generator=generator)).adversarial
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y[idx]
            out[idx[fooled]] = x_adv[fooled]
            robust[idx[fooled]] = False
        return out


@hookimpl
def register_attacks(register):
    register(APGDCE)
    register(APGDDLR)
    register(APGDT)
    register(Square)
    register(AutoAttack)
