"""``medaudit run SPEC --dry-run``: what a run would do and roughly what it would cost, without
running it.

It loads as the run does (:meth:`Runner.load`: data, model, fitted defenses and the same
checks), plans the jobs, runs each defense's clean job (whose predictions decide which cases
the attack jobs perturb), then probes every distinct attack (per defense and view) on
:data:`PROBE_CASES` of those cases at its first nonzero budget: the model's forward and
backward passes are counted (samples through the model, :class:`PassCounter`) and the attack
is timed. Each attack job's numbers are that probe scaled linearly to the job's cases, an
estimate: a minimum-norm attack searches once per batch for all budgets and an early-exit
attack stops querying fooled cases, so theirs are upper bounds. Nothing is written: no run
directory, no records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from medaudit.audits.execute import execute
from medaudit.audits.runner import Runner
from medaudit.core.adaptive import bind_labels
from medaudit.core.components import NO_SCREEN, Facet, MinimumNormAttack
from medaudit.core.host import Host
from medaudit.core.jobs import Job
from medaudit.core.model_wrappers import CallCounter
from medaudit.core.spec import Spec

#: Cases each distinct attack is probed on: a few, so that the model's fixed cost per call
#: (which a batch of 2 is mostly made of) does not inflate the per-case time scaled up.
PROBE_CASES = 8


class PassCounter(CallCounter):
    """:class:`CallCounter` (samples through the forward pass) that also counts the samples
    whose gradient flows back through the model: an attack's backward passes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__(inner)
        self.backward_samples = 0

    def forward(self, x):
        out = super().forward(x)
        if torch.is_tensor(out) and out.requires_grad:
            n = len(x)
            out.register_hook(lambda grad: self._backward(n))
        return out

    def _backward(self, n: int) -> None:
        self.backward_samples += n


@dataclasses.dataclass
class Probe:
    """One attack (on one defense's view) run on a few cases: passes and seconds per case."""

    cases: int
    epsilon: float
    forward_per_case: float
    backward_per_case: float
    seconds_per_case: float
    error: str | None = None


@dataclasses.dataclass
class PlannedJob:
    """A planned job with what it would cost."""

    id: str
    defense: str
    view: str
    attack: str
    epsilon: str
    cases: int
    forward: float | None
    backward: float | None
    seconds: float | None
    #: ``measured`` (a clean job, run here), ``estimate`` or ``upper bound`` (scaled from the probe).
    basis: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dry_run(spec: Spec, host: Host) -> dict[str, Any]:
    """Load, plan and probe as described above; the plan as a JSON-ready dict."""
    runner = Runner(spec, host, show_progress=False)
    runner.load()
    session, data = runner.session, runner.data
    n = len(data)
    planned: list[PlannedJob] = []
    probes: dict[tuple[str, str, str], Probe] = {}
    attacked: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    for job in runner.order:  # the strategy's order (verdict: cheapest first at each budget)
        if job.is_clean:
            start = time.perf_counter()
            clean = execute(session, job, 0, n)
            seconds = _synced(session.device, start)
            attacked[job.defense] = _attacked_cases(session, job.defense, clean)
            planned.append(PlannedJob(job.id, job.defense, job.view, job.attack, job.epsilon_label, n, float(n), 0.0,
                                      seconds, "measured"))
            continue
        count, x, y = attacked[job.defense]
        key = (job.defense, job.view, job.spec_attack)
        if key not in probes:
            probes[key] = _probe(session, _probe_job(runner.jobs, job), x, y)
        probe = probes[key]
        attack = session.attacks[job.spec_attack]
        bound = isinstance(attack, MinimumNormAttack) or bool(getattr(attack.params, "early_exit", False))
        if probe.error is not None:
            planned.append(PlannedJob(job.id, job.defense, job.view, job.attack, job.epsilon_label, count, None, None,
                                      None, "unknown", f"the probe failed: {probe.error}"))
            continue
        planned.append(PlannedJob(
            job.id, job.defense, job.view, job.attack, job.epsilon_label, count,
            probe.forward_per_case * count, probe.backward_per_case * count, probe.seconds_per_case * count,
            "upper bound" if bound else "estimate",
        ))
    known = [j.seconds for j in planned if j.seconds is not None]
    return {
        "audit": spec.audit.name,
        "device": str(session.device),
        "cases": n,
        "probe_cases": PROBE_CASES,
        "jobs": [j.as_dict() for j in planned],
        "total": {
            "jobs": len(planned),
            "forward": sum(j.forward or 0.0 for j in planned),
            "backward": sum(j.backward or 0.0 for j in planned),
            "seconds": sum(known),
            "unknown": sum(j.seconds is None for j in planned),
        },
        "notes": [
            "clean jobs were run here (measured); attack jobs are estimates: each distinct attack was run on "
            f"{PROBE_CASES} cases at its first nonzero budget and scaled linearly to the job's cases",
            "passes count samples through the model (forward) and samples whose gradient flowed back (backward)",
            "minimum-norm and early-exit attacks are upper bounds (one search per batch serves every budget; "
            "fooled cases stop being queried)",
            "times are for this machine and device, without the report, figures and validity checks",
            *(["runtime.strategy verdict: jobs are listed in the order they run; each attack job will attack only the "
               "cases still robust, and the run stops once the blocking criteria are decided, so the figures are upper "
               "bounds"] if spec.runtime.strategy == "verdict" else []),
        ],
    }


def _synced(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _attacked_cases(session, defense: str, clean: list[dict]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """How many cases the attack jobs on ``defense`` perturb, and the first
    :data:`PROBE_CASES` of them (images and labels, on the device)."""
    spec, p = session.spec, session.protocol
    rejection = Facet.REJECTION in (session.models[defense].screen or NO_SCREEN).facets
    count, xs, ys = 0, [], []
    for b, x, y in session.data.batches(0, len(session.data), spec.runtime.batch_size, task=spec.task):
        mask = p.attacked(y, clean[b : b + len(x)], rejection)
        count += int(mask.sum())
        taken = sum(len(t) for t in xs)
        if taken < PROBE_CASES:
            idx = mask.nonzero().flatten()[: PROBE_CASES - taken]
            xs.append(x[idx])
            ys.append(y[idx])
    x, y = torch.cat(xs), torch.cat(ys)
    return count, x.to(session.device), y.to(session.device)


def _probe_job(jobs: list[Job], job: Job) -> Job:
    """The job of the same defense, view and attack at the first nonzero budget (``job`` when
    every budget is 0)."""
    same = [j for j in jobs if (j.defense, j.view, j.spec_attack) == (job.defense, job.view, job.spec_attack)]
    return next((j for j in same if j.epsilon > 0), job)


def _probe(session, job: Job, x: torch.Tensor, y: torch.Tensor) -> Probe:
    """Run ``job``'s attack on ``x`` as an attack job does (same view, seed and labels bound),
    counting the passes through the view and timing it."""
    if len(x) == 0:
        return Probe(0, job.epsilon, 0.0, 0.0, 0.0)
    spec = session.spec
    attack = session.attacks[job.spec_attack]
    view = session.models[job.defense].view(job.view)
    counter = PassCounter(view)
    seed = spec.runtime.seed
    generator = torch.Generator(device=session.device).manual_seed(seed)
    bind_labels(view, x, y)
    try:
        with torch.enable_grad():  # one warm-up pass, so the first probe does not pay for lazy set-up alone
            view(x.clone().requires_grad_()).float().sum().backward()
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.enable_grad():
            attack.perturb(counter, x, y, eps=job.epsilon, norm=spec.threat_model.norm, generator=generator)
        seconds = _synced(session.device, start)
    except Exception as exc:  # the run would meet it too; the plan says so instead of stopping
        return Probe(len(x), job.epsilon, math.nan, math.nan, math.nan, f"{type(exc).__name__}: {exc}")
    finally:
        bind_labels(view, None, None)
    k = len(x)
    return Probe(k, job.epsilon, counter.samples / k, counter.backward_samples / k, seconds / k)


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a text table, one row per job, with the totals and what the numbers mean."""
    header = ("defense", "view", "attack", "epsilon", "cases", "forward", "backward", "time", "basis")
    rows = [header]
    for j in plan["jobs"]:
        rows.append((j["defense"], j["view"], j["attack"], j["epsilon"], str(j["cases"]), _count(j["forward"]),
                     _count(j["backward"]), _duration(j["seconds"]), j["basis"] + (f" ({j['note']})" if j["note"] else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) + "  " + r[-1]
             for r in rows]
    total = plan["total"]
    unknown = f", {total['unknown']} jobs unknown" if total["unknown"] else ""
    lines.append(f"{plan['audit']}: {total['jobs']} jobs on {plan['cases']} cases ({plan['device']}): about "
                 f"{_count(total['forward'])} forward and {_count(total['backward'])} backward passes, "
                 f"{_duration(total['seconds'])}{unknown} (an estimate)")
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
