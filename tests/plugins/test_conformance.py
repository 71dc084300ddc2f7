"""Every registered component, of every kind, keeps the contract of its base class in
:mod:`medaudit.core.components`: the class data the planner, validation and the report read
without instantiating anything.

The checks are :mod:`medaudit.testing`'s, the ones vendors run on their own components;
here they are parametrized over the host's registry, so a new built-in component is checked
as soon as it is registered. What attacks do when run (budget, range, determinism) is
checked by tests/plugins/attacks/test_conformance.py.
"""

from __future__ import annotations

import pytest

from medaudit.core.components import KINDS, Metric, MetricValue, ReportSection, Task
from medaudit.core.host import get_host
from medaudit.testing import (
    check_class, check_dataset, check_defense, check_metric, check_model_loader, check_module_names_component,
    check_unique_section_orders, example_records,
)

HOST = get_host(load_entry_points=False)
COMPONENTS = [(kind, name) for kind in KINDS for name in sorted(HOST.components[kind])]
IDS = [f"{kind}-{name}" for kind, name in COMPONENTS]


def test_every_kind_has_components():
    assert {kind for kind, _ in COMPONENTS} == set(KINDS)


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=IDS)
def test_class_contract(kind, name):
    cls = HOST.get(kind, name)
    assert cls.name == name
    check_class(cls)
    check_module_names_component(cls)  # the built-ins' convention; optional for vendors


def test_section_orders_are_unique():
    sections = HOST.components["report_section"].values()
    assert sections and all(issubclass(cls, ReportSection) for cls in sections)
    check_unique_section_orders(sections)


# -- the run checks vendors use, on built-ins of each kind (cheap: an untrained network, 8 phantoms)

CLASSIFICATION_METRICS = sorted(
    name for name, cls in HOST.components["metric"].items()
    if Task.CLASSIFICATION in cls.tasks and cls.needs <= example_records().facets
)


@pytest.fixture(scope="module")
def untrained():
    """A timm network with random weights (the loader's run check) and 8 phantom slices (the dataset's)."""
    model = check_model_loader(HOST.get("model", "timm"), {"arch": "test_resnet"})
    data = check_dataset(HOST.get("dataset", "phantom"), {"n": 8, "size": 64})
    return model, data


@pytest.mark.parametrize("name", ["bit-depth", "median"])
def test_defense_run_check_passes_on_built_ins(name, untrained):
    model, data = untrained
    defended = check_defense(HOST.get("defense", name), {}, model=model, data=data)
    assert defended.module is not model.module


@pytest.mark.parametrize("name", CLASSIFICATION_METRICS)
def test_metric_run_check_passes_on_built_ins(name):
    check_metric(HOST.get("metric", name))


def test_the_checks_name_the_component_and_the_rule():
    """They can fail: a metric outside its bounds and a component without a summary are caught, by name."""

    class Overfull(Metric):
        """A share that can exceed one."""

        name = "overfull"
        bounds = (0.0, 1.0)

        def compute(self, records):
            return MetricValue(value=1.5, n=len(records))

    with pytest.raises(AssertionError, match="overfull = 1.5 on all records, outside its bounds"):
        check_metric(Overfull)
    class Undocumented(Overfull):  # a class's docstring is not inherited
        name = "undocumented"

    with pytest.raises(AssertionError, match="metric 'undocumented': no one-line summary"):
        check_class(Undocumented)
