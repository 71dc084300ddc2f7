"""Figures drawn after the run (``medaudit report RUN_DIR --figures``): the model-explaining
ones a spec left out (``report.figures``), from what the run directory kept and the audited
model, loaded again from the run's resolved spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medaudit.core.host import Host
from medaudit.core.jobs import Job


def jobs_of(results: dict[str, Any]) -> list[Job]:
    """The jobs that ran, as :class:`Job` objects, from results.json."""
    names = {a["label"]: a["name"] for a in results["attacks"]}
    norm = results["threat_model"]["norm"]
    return [Job(j["id"], j["defense"], j["attack"], names.get(j["spec_attack"]), j["epsilon"], {"norm": norm},
                j.get("view") or "naive", j["spec_attack"], j.get("budget", ""))
            for j in results["jobs"] if "skipped" not in j]


def draw_explaining_figures(run_dir: Path, results: dict[str, Any], host: Host, names: list[str]) -> list[dict]:
    """Draw the figures ``names`` (:data:`~medaudit.audits.figures.EXPLAINING`) into
    ``run_dir/figures`` and put them in ``results["figures"]`` in place of any earlier ones
    of the same id; returns the figures drawn."""
    from medaudit.audits.figures import explaining_figures
    from medaudit.core.errors import MedauditError
    from medaudit.core.spec import load_spec

    if results["audit"]["task"] != "classification":
        raise MedauditError(f"{run_dir}: the explaining figures ({', '.join(names)}) are drawn for classification audits")
    spec = load_spec(run_dir / "spec.resolved.yaml", host)
    model = host.get("model", spec.model.loader)(host.get("model", spec.model.loader).Params.model_validate(
        spec.model.params)).load(spec.task)
    if model.fingerprint != results["fingerprints"]["model_sha256"]:
        raise MedauditError(f"{run_dir}: the model {spec.model.loader!r} loads now is not the one audited (its sha256 "
                            "differs): the figures would explain another model")
    jobs = jobs_of(results)
    epsilons = [j.epsilon for j in jobs if not j.is_clean and not j.budget]
    if not epsilons:
        return []
    added = explaining_figures(run_dir, jobs, max(epsilons), results["data"].get("class_names", []), model, names)
    ids = {f["id"] for f in added}
    results["figures"] = [f for f in results["figures"] if f["id"] not in ids] + added
    return added
