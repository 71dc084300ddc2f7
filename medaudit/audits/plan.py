"""Planning: a spec becomes a list of jobs (defense x attack x epsilon) with stable ids."""

from __future__ import annotations

import hashlib
import json

from medaudit.core.components import Access, LoadedModel
from medaudit.core.errors import SpecError
from medaudit.core.host import Host
from medaudit.core.jobs import CLEAN, NAIVE, Job, view_label
from medaudit.core.spec import NO_DEFENSE, Spec, attack_levels

def _job_id(slug: str, config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def plan_jobs(spec: Spec, host: Host) -> list[Job]:
    """Every job of the audit, clean jobs first, in a stable order. A defense with views
    (:meth:`Defense.view_names`) gets each gradient attack once more per view:
    ``<label>@<view>``, after the naive one. An attack sized by its own budget runs at its
    levels (:func:`attack_levels`) instead of the threat model's epsilons."""
    jobs: list[Job] = []
    defenses = [(NO_DEFENSE, None)] + [(d.label, d) for d in spec.defenses]
    for d_label, d_ref in defenses:
        d_config = None if d_ref is None else {"name": d_ref.name, "params": d_ref.params}
        config = {"task": spec.task.value, "defense": d_config, "attack": None}
        jobs.append(Job(_job_id(f"{d_label}.clean", config), d_label, CLEAN, None, 0.0, config))
        views = host.get("defense", d_ref.name).view_names() if d_ref is not None else {}
        for a_ref in spec.attacks:
            gradient = host.get("attack", a_ref.name).needs is Access.GRADIENTS
            budget, levels = attack_levels(spec, host, a_ref.label)
            size = {"budget": budget.name} if budget else {"norm": spec.threat_model.norm.value}
            for view in [NAIVE, *(views if gradient else ())]:
                label = view_label(a_ref.label, view)
                for i, eps in enumerate(levels):
                    config = {
                        "task": spec.task.value,
                        "defense": d_config,
                        "attack": {"name": a_ref.name, "params": a_ref.params},
                        **size,
                        "epsilon": eps,
                    }
                    if view != NAIVE:  # "adaptive": True keeps the ids of runs made before views had names
                        config.update({"adaptive": True} if view == "adaptive" else {"view": view})
                    slug = f"{d_label}.{label}.{'level' if budget else 'eps'}{i}"
                    jobs.append(Job(_job_id(slug, config), d_label, label, a_ref.name, eps, config, view, a_ref.label,
                                    budget.name if budget else ""))
    return jobs


def check_model_access(spec: Spec, host: Host, model: LoadedModel | None = None) -> None:
    """Refuse attacks that need more from the model than it gives (e.g. gradients of ONNX).
    Without ``model``, checks the access its loader declares (``ModelLoader.access``), so
    that ``validate`` refuses before anything loads; a loader that declares none passes."""
    if model is None:
        loader = host.get("model", spec.model.loader)
        if loader.access is None:
            return
        access, reason = loader.access, loader.access_reason
    else:
        access, reason = model.access, model.access_reason
    problems = []
    for i, ref in enumerate(spec.attacks):
        cls = host.get("attack", ref.name)
        if cls.needs not in access:
            offered = ", ".join(sorted(a.value for a in access)) or "nothing"
            hint = ""
            if Access.GRADIENTS not in access:
                usable = sorted(name for name, a in host.components["attack"].items() if a.needs in access
                                and spec.task in a.tasks and spec.threat_model.norm in a.norms)
                hint = "; use a score- or decision-based attack" + (
                    f": {', '.join(usable)}" if usable else f" (none is registered for this task and the {spec.threat_model.norm.value} norm)")
            problems.append(
                f"attacks[{i}]: attack {ref.label!r} needs {cls.needs.value} but the model gives {offered}"
                + (f" ({reason})" if reason else "") + hint
            )
    if problems:
        raise SpecError(problems, source="plan")
