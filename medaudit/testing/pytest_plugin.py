"""The pytest side of :mod:`medaudit.testing`: fixtures and a conformance base class per kind.

Enable it with ``pytest -p medaudit.testing.pytest_plugin`` (or ``addopts`` in your
pytest configuration) where medaudit's ``pytest11`` entry point does not load it already.
Then a vendor's test module needs only::

    from medaudit.testing.pytest_plugin import AttackConformance
    from medaudit_acme import ContrastShift

    class TestContrastShift(AttackConformance):
        component = ContrastShift
        cheap_params = {"steps": 2}

Each base class runs the class checks, checks that the installed package registers the
component through its entry point, and runs the component on the tiny fixtures below. A
test class overrides a fixture (``medaudit_model``, ``medaudit_data``, ``medaudit_records``)
to run on something else, e.g. ``medaudit_unet`` for a segmentation attack.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from medaudit.core.components import Component, Norm, Task
from medaudit.testing import checks, tiny


@pytest.fixture(scope="session")
def medaudit_host():
    """The plugin host as ``medaudit run`` builds it: built-ins and every installed entry point."""
    from medaudit.core.host import get_host

    return get_host()


@pytest.fixture(scope="session")
def medaudit_model():
    """The demo classifier (2 classes, one grey channel, 64 px), trained once and cached."""
    return tiny.demo_model()


@pytest.fixture(scope="session")
def medaudit_unet():
    """The 2D demo U-Net (5 phantom structures, 64 px), trained once and cached."""
    return tiny.demo_unet()


@pytest.fixture(scope="session")
def medaudit_data():
    """96 phantom slices at 64 px with labels and structure masks."""
    return tiny.phantom_data()


@pytest.fixture(scope="session")
def medaudit_records():
    """Records of a classification attack job, as a metric gets them."""
    return tiny.example_records()


@pytest.fixture
def medaudit_results():
    """A results.json dict for :class:`ReportSectionConformance` to render; override it (none by default)."""
    return None


class Conformance:
    """What every kind checks: the class contract and the registration."""

    #: The component class under test.
    component: ClassVar[type[Component]]
    #: Params that make it quick (few steps, queries or cases); validated like a spec's.
    cheap_params: ClassVar[dict[str, Any]] = {}
    #: Check that the installed package registers ``component`` through its entry point;
    #: False for a class the test builds but no plugin registers.
    registered: ClassVar[bool] = True

    def test_class_contract(self):
        checks.check_class(self.component)

    def test_cheap_params_validate(self):
        checks.build(self.component, self.cheap_params)

    def test_registered_under_its_name(self, medaudit_host):
        if not self.registered:
            pytest.skip("registered = False: the class is not provided by a plugin")
        kind = checks.kind_of(self.component)
        failed = "; ".join(f"{f.name} ({f.distribution}): {f.error}" for f in medaudit_host.failed)
        hint = f"plugins that failed to load: {failed}" if failed else "is the package installed (pip install -e .)?"
        assert medaudit_host.components[kind].get(self.component.name) is self.component, (
            f"no plugin registers {self.component.__name__} as {kind} {self.component.name!r}; {hint}"
        )


#: The run-check case of an attack sized by its own :class:`~medaudit.core.components.Budget`.
OWN_BUDGET = "own-budget"


class AttackConformance(Conformance):
    """An attack keeps its budget (each norm, or its own budget's levels), the [0, 1] range,
    the input at budget 0 and its result under a fixed seed."""

    #: The epsilon checked per norm (images in [0, 1]).
    budgets: ClassVar[dict[Norm, float]] = checks.BUDGETS
    #: The cases of ``medaudit_data`` it attacks.
    cases: ClassVar[int] = 8

    def pytest_generate_tests(self, metafunc):
        """One run per norm the attack bounds (that :attr:`budgets` covers), or one over the
        levels of its own budget."""
        if "budget" in metafunc.fixturenames:
            norms = sorted(self.component.norms & set(self.budgets), key=lambda n: n.value)
            cases = [OWN_BUDGET] if self.component.budget is not None else norms
            metafunc.parametrize("budget", cases, ids=[getattr(c, "value", c) for c in cases])

    def test_budget_range_identity_and_determinism(self, budget, medaudit_model, medaudit_data):
        context = checks.attack_context(medaudit_data, medaudit_model)
        model = medaudit_model.module
        _, x, y = next(medaudit_data.batches(0, self.cases, self.cases, task=medaudit_model.task))
        if budget == OWN_BUDGET:
            checks.check_budget_attack_run(self.component, self.cheap_params, model, x, y, context=context)
        else:
            checks.check_attack_run(self.component, self.cheap_params, model, x, y, norm=budget,
                                    eps=self.budgets[budget], context=context)


class MetricConformance(Conformance):
    """A metric computes None or a value within its bounds on whole and partial records."""

    def test_computes_within_bounds(self, medaudit_records):
        checks.check_metric(self.component, medaudit_records, self.cheap_params)


class DefenseConformance(Conformance):
    """A defense returns a model ready to audit, with every view it declares."""

    def test_applies(self, medaudit_model, medaudit_data):
        checks.check_defense(self.component, self.cheap_params, model=medaudit_model, data=medaudit_data)


class ModelLoaderConformance(Conformance):
    """A loader returns a model in eval mode, frozen, with logits of the declared shape."""

    #: The task to load for (default: the first the loader supports).
    task: ClassVar[Task | None] = None
    #: Height and width (and depth first, for 3D) of the test inputs.
    spatial: ClassVar[tuple[int, ...]] = (64, 64)

    def test_loads(self):
        checks.check_model_loader(self.component, self.cheap_params, task=self.task, spatial=self.spatial)


class DatasetConformance(Conformance):
    """A dataset gives unique case ids, int64 labels and float32 images in [0, 1]."""

    task: ClassVar[Task | None] = None

    def test_loads(self):
        checks.check_dataset(self.component, self.cheap_params, task=self.task)


class ReportSectionConformance(Conformance):
    """A section has an order, a title and a template; it renders the ``medaudit_results``
    fixture when a test overrides it with a results.json dict."""

    def test_renders(self, medaudit_results):
        if medaudit_results is None:
            pytest.skip("override the medaudit_results fixture with a results.json dict to render the section")
        checks.check_report_section(self.component, medaudit_results)
