"""The validity checks that run the model again (Carlini et al. 2019, methods.md 12).

:mod:`medaudit.audits.validity` judges findings; this module makes the ones that need the
models: how each deployed model behaves on a few cases (randomised? probabilities? an
optimisation inside its forward pass?), random noise of the threat model's norm against the
attacks' worst case (C7), and the strongest attack re-run longer with fresh restarts, with
its loss at every model call (C6 and the report's convergence figures). Classification
only for C6 and C7: they compare per-case correctness.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from medaudit.core.components import AttackFamily, LoadedModel, Norm
from medaudit.core.perturbation import margin

#: Forward passes compared for randomness (AutoAttack's ``check_randomized``) and the largest
#: difference of L2-normalised outputs two deterministic passes may show.
RANDOMNESS_PASSES, RANDOMNESS_TOLERANCE = 5, 1e-4
#: Functions whose call inside a forward pass means the model optimises at test time
#: (AutoAttack's ``check_dynamic``): torch.autograd.grad and Tensor.backward.
AUTOGRAD_CALLS = frozenset({"grad", "backward", "_make_grads"})
#: Points a loss trace keeps (evenly spaced model calls), so results.json stays small.
TRACE_POINTS = 200


def model_behaviour(models: dict[str, LoadedModel], x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per deployed model (the undefended one and each defense's), on the cases ``x``: whether
    :data:`RANDOMNESS_PASSES` forward passes differ (C9), whether it returns probabilities
    rather than logits (C8), and whether its forward pass calls autograd (C11)."""
    found = {}
    for label, loaded in models.items():
        module = loaded.module
        with torch.no_grad():
            passes = [module(x).float().flatten(1) for _ in range(RANDOMNESS_PASSES)]
        unit = [p / (p.norm(dim=1, keepdim=True) + 1e-10) for p in passes]
        difference = max(float((unit[0] - u).norm(dim=1).max()) for u in unit[1:])
        predictions_differ = any(bool((p.argmax(1) != passes[0].argmax(1)).any()) for p in passes[1:]) \
            if passes[0].shape[1] > 1 else False
        first = passes[0]
        probabilities = first.shape[1] > 1 and bool(((first >= 0) & (first <= 1)).all()) \
            and bool(((first.sum(1) - 1).abs() <= 1e-4).all())
        found[label] = {
            "cases": len(x),
            "randomized": predictions_differ or difference > RANDOMNESS_TOLERANCE,
            "max_difference": difference,
            "probabilities": probabilities,
            "autograd_in_forward": calls_autograd(module, x[:1]),  # one case shows it, at the least memory
        }
    return found


def calls_autograd(module: torch.nn.Module, x: torch.Tensor) -> int:
    """How many times one forward pass (with gradients enabled, as an attack runs it) calls
    ``torch.autograd.grad`` or ``Tensor.backward``: test-time optimisation or a dynamic
    defense, which fixed attacks underestimate. Traced with ``sys.settrace``."""
    calls = 0

    def trace(frame, event, arg):
        nonlocal calls
        code = frame.f_code
        if event == "call" and code.co_name in AUTOGRAD_CALLS and "torch" in code.co_filename:
            calls += 1
        return None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        with torch.enable_grad():
            module(x.detach().clone())
    finally:
        sys.settrace(previous)
    return calls


def random_directions(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """Random points on the surface of the eps-ball around ``x``, clipped to [0, 1]: random
    signs of size eps for L-inf (a vertex of the cube, the largest noise it allows), a
    Gaussian direction scaled to eps for L2."""
    if norm is Norm.LINF:
        signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return (x + eps * signs).clamp(0, 1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (x + eps * noise).clamp(0, 1)


def noise_fooled(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm, draws: int,
                 generator: torch.Generator, batch_size: int | None = None) -> list[bool]:
    """Per case, whether any of ``draws`` random perturbations of size eps (see
    :func:`random_directions`) changes the model's answer from the truth (C7)."""
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for _ in range(draws):
            noisy = random_directions(x, eps, norm, generator)
            for start in range(0, len(x), batch_size or len(x)):
                part = slice(start, start + (batch_size or len(x)))
                fooled[part] |= module(noisy[part]).argmax(1) != y[part]
    return fooled.tolist()


class MarginTrace(torch.nn.Module):
    """The model, recording at every call the margin ``z_y - max_{i != y} z_i`` of the one
    case it is traced on (negative once fooled): the loss curve of any attack, read the same way."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor):
        super().__init__()
        self.model, self.y, self.margins = model, y, []

    def forward(self, x):
        out = self.model(x)
        if x.shape[0] == len(self.y):
            self.margins.append(float(margin(out.detach().float(), self.y)[0]))
        return out


def thin(values: list[float], points: int = TRACE_POINTS) -> list[list[float]]:
    """``[call, value]`` pairs at most ``points`` evenly spaced calls (1-based), the last kept."""
    if not values:
        return []
    step = max(1, -(-len(values) // points))
    keep = list(range(0, len(values), step))
    if keep[-1] != len(values) - 1:
        keep.append(len(values) - 1)
    return [[i + 1, round(values[i], 6)] for i in keep]


def rerun(attack, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm,
          restarts: int, seed: int, trace_cases: int, batch_size: int | None = None) -> dict[str, Any]:
    """Run ``attack`` (already strengthened) ``restarts`` times with fresh seeds on ``x``:
    per case whether any restart fooled the model, the fraction still robust after each
    restart, and, on the first ``trace_cases`` cases, the margin at every model call of the
    first restart."""
    from medaudit.core.components import AttackOutcome

    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    robust_after, size = [], batch_size or len(x)
    for restart in range(restarts):
        for start in range(0, len(x), size):
            part = slice(start, start + size)
            generator = torch.Generator(device=x.device).manual_seed(seed + restart * 1_000_003 + start)
            x_adv = AttackOutcome.of(attack.perturb(module, x[part], y[part], eps=eps, norm=norm,
                                                    generator=generator)).adversarial
            with torch.no_grad():
                fooled[part] |= module(x_adv).argmax(1) != y[part]
        robust_after.append(1 - int(fooled.sum()) / len(x))
    traces = []
    for i in range(min(trace_cases, len(x))):
        traced = MarginTrace(module, y[i : i + 1])
        generator = torch.Generator(device=x.device).manual_seed(seed)
        attack.perturb(traced, x[i : i + 1], y[i : i + 1], eps=eps, norm=norm, generator=generator)
        traces.append(thin(traced.margins))
    return {"fooled": fooled.tolist(), "robust_after_restart": robust_after, "traces": traces}


def convergence_target(rows: list[dict], clean: dict, jobs: list, attacks: dict, headline: str,
                       clean_headline: str, defense: str) -> tuple[Any, float] | None:
    """The job the convergence check re-runs for ``defense``: at the budget where the worst
    case is nearest half the clean value (where more search can still change the answer),
    the iterative attack with the lowest robust value there. None without such a job."""
    from medaudit.core.spec import WORST_CASE

    clean_value = (clean.get(defense, {}).get(clean_headline) or {}).get("value")
    worst = {r["epsilon"]: (r["metrics"].get(headline) or {}).get("value") for r in rows
             if r["defense"] == defense and r["attack"] == WORST_CASE}
    worst = {e: v for e, v in worst.items() if v is not None}
    if not worst or clean_value is None:
        return None
    eps = min(worst, key=lambda e: (abs(worst[e] - clean_value / 2), e))
    candidates = [j for j in jobs if j.defense == defense and not j.is_clean and not j.budget and j.epsilon == eps
                  and attacks[j.spec_attack].family == AttackFamily.ITERATIVE]
    value = {r["attack"]: (r["metrics"].get(headline) or {}).get("value") for r in rows
             if r["defense"] == defense and r["epsilon"] == eps}
    candidates = [j for j in candidates if value.get(j.attack) is not None]
    if not candidates:
        return None
    return min(candidates, key=lambda j: (value[j.attack], j.attack)), eps


def noise_baseline(models: dict[str, LoadedModel], jobs: list, records: dict[str, list[dict]], x: torch.Tensor,
                   y: torch.Tensor, cases: list[str], spec, batch_size: int | None = None) -> dict[str, dict]:
    """C7 on the first cases ``x``: per model and budget, ``validity.noise_draws`` random
    perturbations on the eps-sphere against the attacks' worst case (a case robust only if
    every norm-bounded attack left it correct). Models that reject inputs are left out: a
    rejected input counts as robust, and the class alone says too little."""
    from medaudit.core.spec import epsilon_label

    n, draws = len(x), spec.validity.noise_draws
    generator = torch.Generator(device=x.device).manual_seed(spec.runtime.seed)
    found: dict[str, dict] = {}
    for label, loaded in models.items():
        if loaded.screen is not None:
            continue
        for eps in spec.threat_model.epsilons:
            ran = [j for j in jobs if j.defense == label and not j.is_clean and not j.budget and j.epsilon == eps]
            if eps == 0 or not ran:
                continue
            robust = [all(records[j.id][i]["adv_correct"] for j in ran) for i in range(n)]
            fooled = [False] * n  # noise can only matter where the attacks left a case robust
            if idx := [i for i in range(n) if robust[i]]:
                found_idx = noise_fooled(loaded.module, x[idx], y[idx], eps, spec.threat_model.norm, draws, generator,
                                         batch_size)
                for i, f in zip(idx, found_idx):
                    fooled[i] = f
            found.setdefault(label, {})[epsilon_label(eps, spec.threat_model.norm)] = {
                "cases": n, "draws": draws, "robust": sum(robust), "noise_fooled_robust": sum(fooled),
                "missed": [c for c, r, f in zip(cases, robust, fooled) if r and f],
            }
    return found


def sign_test(k: int, n: int) -> float:
    """The exact one-sided sign test: P(X >= k) for X ~ Binomial(n, 1/2) (1 when n is 0).
    What scipy's ``binomtest(k, n, 0.5, alternative="greater")`` gives, without importing
    scipy.stats (most of a second) for one number."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n else 1.0


def convergence(models: dict[str, LoadedModel], jobs: list, computed: dict, attacks: dict, protocol,
                x_all: torch.Tensor, y_all: torch.Tensor, spec, batch_size: int | None = None) -> dict[str, dict]:
    """C6 and the report's convergence figure: per model, the strongest iterative attack
    (:func:`convergence_target`) re-run with ``validity.convergence_factor`` times its
    iterations and ``convergence_restarts`` fresh restarts on the first cases (``x_all``) it
    attacked, against its own records on them: the cases newly broken and an exact one-sided
    binomial test on the cases the two runs disagree on. Models that reject inputs are left out."""
    from medaudit.audits.execute import view_modules
    from medaudit.core.spec import epsilon_label

    options, found = spec.validity, {}
    for label, loaded in models.items():
        if loaded.screen is not None:
            continue
        target = convergence_target(computed["rows"], computed["clean"], jobs, attacks, protocol.headline,
                                    protocol.clean_headline, label)
        if target is None:
            continue
        job, eps = target
        attack = attacks[job.spec_attack].strengthened(options.convergence_factor)
        if attack is None:
            found[label] = {"attack": job.attack, "skipped": f"{job.attack} has no steps or queries to raise"}
            continue
        records = computed["records"][job.id][: len(x_all)]
        ran = [r["attacked"] and not r.get("carried") for r in records]  # a carried case was not attacked by this job
        attacked = torch.tensor(ran, device=x_all.device)
        before = [bool(r["adv_correct"]) for r, a in zip(records, ran) if a]
        if not before:
            continue
        order = sorted(range(len(before)), key=lambda i: not before[i])  # robust cases first: their traces matter
        x, y = x_all[attacked][order], y_all[attacked][order]
        before = [before[i] for i in order]
        again = rerun(attack, view_modules(loaded)[job.view], x, y, eps, spec.threat_model.norm,
                      options.convergence_restarts, spec.runtime.seed, options.trace_cases, batch_size)
        after = [not f for f in again["fooled"]]
        newly = sum(b and not a for b, a in zip(before, after))
        recovered = sum(a and not b for b, a in zip(before, after))
        p_value = sign_test(newly, newly + recovered)
        found[label] = {
            "attack": job.attack, "epsilon": eps, "epsilon_label": epsilon_label(eps, spec.threat_model.norm),
            "cases": len(before), "factor": options.convergence_factor, "restarts": options.convergence_restarts,
            "robust_before": sum(before) / len(before), "robust_after": sum(after) / len(after),
            "robust_after_restart": again["robust_after_restart"], "newly_broken": newly,
            "no_longer_broken": recovered, "p_value": float(p_value), "traces": again["traces"],
        }
    return found
