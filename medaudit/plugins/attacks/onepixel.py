"""One-pixel attack: onepixel.

The one-pixel (few-pixel) attack by differential evolution.

Su, Vargas & Sakurai, "One pixel attack for fooling deep neural networks", IEEE
Transactions on Evolutionary Computation 23(5), 2019, https://arxiv.org/abs/1710.08864;
used on lung-nodule CT by Paul et al., ISBI 2020. Written from the paper (methods.md
11.4); no code was copied.

Native torch, batched over samples and population on the model's device: no scipy, no
numpy. The only host synchronisation is one per generation, to select the samples that are
not fooled yet (early stopping); the model runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Access, Attack, AttackFamily, Norm, Params
from medaudit.core.lazy import torch
from medaudit.core.norms import L0


class OnePixelParams(Params):
    pixels: int = Field(1, ge=1, le=4096, description="Pixel positions that may change per image (the budget d).")
    population: int = Field(
        40, ge=4, le=100_000, description="Candidates per image (the paper uses 400; 40 keeps CPU runs short)."
    )
    generations: int = Field(
        30, ge=0, le=100_000, description="Differential-evolution generations (the paper uses at most 100)."
    )
    mutation: float = Field(0.5, gt=0, le=2, description="DE/rand/1 scale factor F (0.5 in the paper).")
    eval_batch: int = Field(1024, ge=1, le=1_000_000, description="Candidate images per model call.")


class OnePixel(Attack):
    """One-pixel attack: differential evolution over a few (row, col, value) pixel changes that minimise the true-class probability.

    Su, Vargas & Sakurai, "One pixel attack for fooling deep neural networks", IEEE TEVC
    2019, https://arxiv.org/abs/1710.08864 (as used by Paul et al., ISBI 2020). Untargeted,
    black box (scores only, no gradients), classification, 2D images only (``N x C x H x W``).

    Threat model: at most ``pixels`` pixel positions change per image; a changed pixel may
    take any value in [0, 1] in every channel. How ``eps`` is read depends on the norm:

    * ``linf``: bounded-intensity variant; every changed value is also clipped to
      ``x +- eps``, so ``||x_adv - x||_inf <= eps`` holds exactly (eps >= 1 is unbounded).
    * ``l0``: eps is the fraction of pixel positions that may change (a position counts once
      however many of its channels change, as :class:`medaudit.core.norms.L0` measures it);
      the attack requires ``pixels <= floor(eps * H * W)`` and raises ``ValueError``
      otherwise. The intensity is unbounded and ``pixels`` alone sets how many positions change.

    Under either norm ``eps == 0`` returns the inputs unchanged.

    Search: each candidate is ``pixels`` x (row, col, v_1..v_C), all genes encoded in
    [0, 1] (a position gene u maps to ``floor(u * H)``). Uniform random initial population,
    then DE/rand/1 with F = 0.5 and no crossover, as in the paper: ``c = c_r1 + F (c_r2 -
    c_r3)`` with r1, r2, r3 distinct and different from the parent, genes clipped to
    [0, 1]; a child replaces its parent when its fitness is strictly better. Fitness is the
    true-class softmax probability, minus 1 when the candidate is misclassified (so a fooling
    candidate always beats a non-fooling one). A sample stops evolving once its best
    candidate is misclassified (the early stop of torchattacks; Su et al. stop below 5 %).
    Samples misclassified before the attack are returned unchanged, and a sample keeps its
    clean input if no candidate beat it, so the true-class probability never goes up.

    Defaults vs the paper: population 40 (paper 400) and 30 generations (paper 100), so
    about 1,240 model queries per image instead of 40,400; raise both for a faithful
    reproduction. The paper's 1, 3 and 5 pixel settings are ``pixels``.
    """

    name = "onepixel"
    family = AttackFamily.SCORE_BASED
    norms = frozenset({Norm.L0, Norm.LINF})
    dims = frozenset({2})
    needs = Access.SCORES
    Params = OnePixelParams

    def cost(self, num_classes: int) -> float:
        """One query per candidate and generation, the first population included."""
        return float(self.params.population * (self.params.generations + 1))

    def perturb(self, model, x, y, *, eps, norm, generator):
        norm = Norm(norm)
        if norm not in self.norms:
            raise ValueError(f"onepixel bounds the l0 or linf norm, not {norm.value}")
        if x.dim() != 4:
            raise ValueError(f"onepixel supports 2D images (N x C x H x W) only, got shape {tuple(x.shape)}")
        if eps == 0:
            return x.clone()
        p: OnePixelParams = self.params
        h, w = x.shape[-2:]
        if norm is Norm.L0 and p.pixels > L0.budget(eps, h * w):  # the rule the budget check measures
            raise ValueError(
                f"onepixel under l0 reads eps as the fraction of pixels that may change: pixels={p.pixels} "
                f"needs eps >= {p.pixels}/{h * w} = {p.pixels / (h * w):.6g}, got eps={eps}"
            )
        with torch.no_grad():
            return self._search(model, x.detach(), y, eps if norm is Norm.LINF else None, generator)

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _apply(xs: torch.Tensor, cand: torch.Tensor, eps: float | None) -> torch.Tensor:
        """Images ``xs`` (B x C x H x W) with the pixels of ``cand`` (B x d x (2 + C)) set;
        values clipped to ``x +- eps`` when eps is given. Later pixels win on collisions."""
        b, c, h, w = xs.shape
        rows = (cand[..., 0] * h).long().clamp_(0, h - 1)
        cols = (cand[..., 1] * w).long().clamp_(0, w - 1)
        index = (rows * w + cols)[:, None, :].expand(b, c, cand.shape[1])  # B x C x d
        vals = cand[..., 2:].transpose(1, 2).to(xs.dtype)  # B x C x d, in [0, 1]
        flat = xs.reshape(b, c, h * w)
        if eps is not None:
            orig = flat.gather(2, index)
            vals = torch.minimum(torch.maximum(vals, orig - eps), orig + eps).clamp_(0.0, 1.0)
        out = flat.clone()
        for j in range(cand.shape[1]):  # one pixel at a time: deterministic on collisions
            out.scatter_(2, index[..., j : j + 1], vals[..., j : j + 1])
        return out.view(b, c, h, w)

    def _search(self, model, x, y, eps, generator):
        p: OnePixelParams = self.params
        n, c = x.shape[:2]
        pop_size, d, genes, dev = p.population, p.pixels, 2 + x.shape[1], x.device

        def fitness(idx: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
            """Fitness (lower is better) of candidates ``cand`` (m x P x d x genes) of samples ``idx``."""
            flat = cand.reshape(-1, d, genes)
            sample = idx.repeat_interleave(pop_size)
            out = []
            for start in range(0, flat.shape[0], p.eval_batch):
                s = sample[start : start + p.eval_batch]
                logits = model(self._apply(x[s], flat[start : start + p.eval_batch], eps)).float()
                out.append(_score(logits, y[s]))
            return torch.cat(out).view(idx.shape[0], pop_size)

        clean_score = _score(model(x).float(), y)
        clean_correct = clean_score >= 0
        pop = torch.rand((n, pop_size, d, genes), generator=generator, device=dev)
        score = torch.full((n, pop_size), float("inf"), device=dev)
        idx = clean_correct.nonzero().squeeze(1)
        if idx.numel():
            score[idx] = fitness(idx, pop[idx])
        for _ in range(p.generations):
            # Drawn for every sample, so a sample's search does not depend on the others.
            keys = torch.rand((n, pop_size, pop_size), generator=generator, device=dev)
            keys.diagonal(dim1=1, dim2=2).fill_(2.0)  # never pick the parent itself
            parents = keys.topk(3, dim=2, largest=False).indices  # n x P x 3, distinct
            active = clean_correct & (score.amin(1) >= 0)
            idx = active.nonzero().squeeze(1)  # the one host sync per generation
            if idx.numel() == 0:
                break
            sub, r = pop[idx], parents[idx]
            rows = torch.arange(idx.shape[0], device=dev)[:, None]
            child = (sub[rows, r[..., 0]] + p.mutation * (sub[rows, r[..., 1]] - sub[rows, r[..., 2]])).clamp_(0, 1)
            child_score = fitness(idx, child)
            better = child_score < score[idx]
            pop[idx] = torch.where(better[..., None, None], child, sub)
            score[idx] = torch.where(better, child_score, score[idx])

        best_score, best = score.min(1)
        x_adv = self._apply(x, pop[torch.arange(n, device=dev), best], eps)
        keep = best_score < clean_score
        return torch.where(keep.view(n, 1, 1, 1), x_adv, x)


def _score(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class probability, minus 1 when misclassified (negative iff fooled)."""
    prob = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    return prob - (logits.argmax(1) != y).to(prob.dtype)


@hookimpl
def register_attacks(register):
    register(OnePixel)
