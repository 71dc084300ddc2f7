"""Every registered component, of every kind, keeps the contract of its base class in
:mod:`medaudit.core.components`: the class data the planner, validation and the report read
without instantiating anything.

Parametrized over the host's registry, so a new built-in component is checked as soon as it
is registered. What attacks do when run (budget, range, determinism) is checked by
tests/plugins/attacks/test_conformance.py.
"""

from __future__ import annotations

import math
import re
import sys

import jinja2
import pytest
from pydantic import ValidationError

from medaudit.core.components import (
    KINDS, Access, Attack, AttackFamily, Defense, Facet, Metric, Norm, Params, ReportSection, Task,
)
from medaudit.core.host import get_host
from medaudit.reports.html import make_environment

HOST = get_host(load_entry_points=False)
COMPONENTS = [(kind, name) for kind in KINDS for name in sorted(HOST.components[kind])]
IDS = [f"{kind}-{name}" for kind, name in COMPONENTS]


def of_kind(kind: str) -> list[str]:
    return [name for k, name in COMPONENTS if k == kind]


def test_every_kind_has_components():
    assert {kind for kind, _ in COMPONENTS} == set(KINDS)


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=IDS)
def test_shape(kind, name):
    cls = HOST.get(kind, name)
    assert issubclass(cls, KINDS[kind][0]) and cls.name == name
    summary = cls.summary()
    assert summary and "\n" not in summary, f"{name}: no one-line summary (the class docstring's first paragraph)"
    assert cls.tasks and set(cls.tasks) <= set(Task), f"{name}: tasks must be a non-empty set of Task"
    assert cls.dims and set(cls.dims) <= {2, 3}, f"{name}: dims must be a non-empty subset of {{2, 3}}"
    module_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    first_line = module_doc.splitlines()[0] if module_doc else ""
    assert name in re.findall(r"[\w-]+", first_line), (
        f"{name}: the first line of {cls.__module__}'s docstring must name it: {first_line!r}"
    )


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=IDS)
def test_params_closed_and_default_or_documented(kind, name):
    params = HOST.get(kind, name).Params
    assert issubclass(params, Params) and params.model_config.get("extra") == "forbid"
    with pytest.raises(ValidationError):
        params.model_validate({"no_such_param_anywhere": 1})
    try:
        params()
    except ValidationError:
        required = [f for f, info in params.model_fields.items() if info.is_required()]
        undocumented = [f for f in required if not params.model_fields[f].description]
        assert not undocumented, f"{name}: required params without a description: {undocumented}"


@pytest.mark.parametrize("name", of_kind("attack"))
def test_attack_class_data(name):
    cls = HOST.get("attack", name)
    assert issubclass(cls, Attack)
    assert all(isinstance(n, Norm) for n in cls.norms)
    assert bool(cls.norms) != (cls.budget is not None), f"{name}: bounded by norms or by its own budget, exactly one"
    if cls.budget is not None:
        budget = cls.budget
        assert budget.name and budget.measure in cls.extra_names and budget.description.strip()
        assert budget.levels and list(budget.levels) == sorted(budget.levels) and min(budget.levels) > 0
    assert isinstance(cls.needs, Access) and isinstance(cls.family, AttackFamily)
    assert isinstance(cls.targeted, bool)


@pytest.mark.parametrize("name", of_kind("defense"))
def test_defense_views(name):
    cls = HOST.get("defense", name)
    assert issubclass(cls, Defense)
    views = cls.view_names()
    assert isinstance(views, dict) and "naive" not in views  # naive is implicit: the deployed module
    for view, text in views.items():
        assert isinstance(view, str) and view and "@" not in view
        assert isinstance(text, str) and text.strip(), f"{name}: view {view!r} needs a description for the report"


@pytest.mark.parametrize("name", of_kind("metric"))
def test_metric_class_data(name):
    cls = HOST.get("metric", name)
    assert issubclass(cls, Metric)
    assert cls.better in {"higher", "lower"}
    low, high = cls.bounds
    assert low < high and not math.isnan(low) and not math.isnan(high)
    assert isinstance(cls.needs, frozenset) and all(isinstance(f, Facet) for f in cls.needs)
    assert isinstance(cls.clean, bool) and isinstance(cls.scores_cases, bool)
    if cls.scores_cases:
        assert cls.score_cases is not Metric.score_cases, f"{name} says it scores cases but has no score_cases"
        assert Facet.CASE_SCORES in cls.needs


@pytest.mark.parametrize("name", of_kind("report_section"))
def test_report_section_class_data(name):
    cls = HOST.get("report_section", name)
    assert issubclass(cls, ReportSection)
    assert isinstance(cls.order, int) and isinstance(cls.title, str) and cls.title.strip()
    if cls.render is ReportSection.render:  # the default renders ``template``: it must be found
        env = make_environment([cls.template_dir] if cls.template_dir else [])
        try:
            env.get_template(cls.template)
        except jinja2.TemplateNotFound:
            pytest.fail(f"{name}: template {cls.template!r} not found")


def test_section_orders_are_unique():
    orders = [HOST.get("report_section", name).order for name in of_kind("report_section")]
    assert len(orders) == len(set(orders))
