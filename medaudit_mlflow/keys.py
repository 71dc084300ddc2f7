"""What the tracker logs, as plain data: metric keys, flattened params, the metrics of results.json.

Nothing here imports MLflow, so the naming rules are testable without it and the plugin
costs nothing when tracking is off.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

from medaudit.core.spec import epsilon_label

#: Characters MLflow accepts in metric, param and tag keys on every platform (Windows forbids
#: the colon that POSIX allows); "/" is kept out of parts as it separates them.
_ILLEGAL = re.compile(r"[^A-Za-z0-9_.\- ]")

#: The share of a metric logged next to its value, when the metric has it (proportions' intervals).
INTERVAL_FIELDS = ("ci_low", "ci_high")


def key_part(text: Any) -> str:
    """One part of a key: each character MLflow refuses (``@``, ``/``, ``=``...) becomes ``_``,
    and a part that a path would read as ``.`` or ``..`` is escaped, as MLflow refuses those too."""
    part = _ILLEGAL.sub("_", str(text)).strip() or "_"
    return "_" + part if set(part) == {"."} else part


def key(*parts: Any) -> str:
    return "/".join(key_part(p) for p in parts)


def group_parts(defense: str, attack: str, budget_label: str, *, budget: str = "") -> tuple[str, ...]:
    """The key's parts that name one (defense, attack, epsilon) group, from labels that
    results.json and :class:`~medaudit.core.jobs.Job` share: ``none/pgd@adaptive/4/255`` becomes
    ``none, pgd_adaptive, eps_4_255``; a level of an attack's own budget (``severity 3``) keeps
    its label, and a clean group has no budget part."""
    if attack == "clean":
        return defense, attack
    return defense, attack, budget_label if budget else f"eps_{budget_label}"


def metric_entries(parts: tuple[str, ...], metrics: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """``(key, value)`` for each metric of one group, with its confidence bounds where it
    has them (``.../robust_accuracy.ci_low``); values that are not finite numbers are left out."""
    for name, entry in metrics.items():
        if not isinstance(entry, dict):
            continue
        base = key(*parts, name)
        for field, suffix in (("value", ""), *((f, f".{f}") for f in INTERVAL_FIELDS)):
            value = entry.get(field)
            if isinstance(value, (int, float)) and math.isfinite(value):
                yield base + suffix, float(value)


def results_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every metric row of results.json (clean accuracy per defense, then each row, the worst
    case included) under the same keys as the jobs' metrics."""
    out: dict[str, float] = {}
    for defense, metrics in (results.get("clean") or {}).items():
        out.update(metric_entries(group_parts(defense, "clean", "0"), metrics))
    for row in results.get("rows") or []:
        parts = group_parts(row["defense"], row["attack"], row["epsilon_label"], budget=row.get("budget", ""))
        out.update(metric_entries(parts, row.get("metrics") or {}))
    return out


def acceptance_entries(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The verdict as a metric (1 for PASS, else 0) and a tag, and the same for each criterion,
    with the estimate it was judged on."""
    verdict = str(results.get("verdict", ""))
    metrics = {"verdict_pass": float(verdict == "PASS")}
    tags = {"medaudit.verdict": verdict, "medaudit.exit_code": str(results.get("exit_code", ""))}
    for criterion in (results.get("acceptance") or {}).get("criteria") or []:
        cid = key_part(criterion.get("id", ""))
        tags[f"medaudit.criterion.{cid}"] = str(criterion.get("verdict", ""))
        metrics[key("acceptance", cid, "pass")] = float(criterion.get("verdict") == "PASS")
        estimate = criterion.get("estimate")
        if isinstance(estimate, (int, float)) and math.isfinite(estimate):
            metrics[key("acceptance", cid, "estimate")] = float(estimate)
    return metrics, tags


def spec_params(spec_json: dict[str, Any]) -> dict[str, str]:
    """The resolved spec as MLflow params: dotted keys, lists of scalars joined by commas
    (epsilons as people write them, ``0, 1/255, 4/255``), list items that have a label
    (attacks, defenses, criteria) keyed by it, and summary params ``attacks`` and ``defenses``
    that list the labels. Unset (null) and empty values are left out."""
    params: dict[str, str] = {}
    norm = (spec_json.get("threat_model") or {}).get("norm", "linf")
    for name in ("attacks", "defenses"):
        params[name] = ", ".join(_label(item) for item in spec_json.get(name) or []) or "none"
    for path, value in _flatten(spec_json, ()):
        if path == ("threat_model", "epsilons"):
            value = ", ".join(epsilon_label(float(e), norm) for e in value)
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        params[".".join(key_part(p) for p in path)] = str(value)
    return params


def _label(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("id") or item.get("name") or "")
    return str(item)


def _flatten(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from _flatten(inner, (*path, str(name)))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, inner in enumerate(value):
            yield from _flatten(inner, (*path, _label(inner) if isinstance(inner, dict) and _label(inner) else str(i)))
    elif value is not None and value != [] and value != "":
        yield path, value
