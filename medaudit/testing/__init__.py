"""Conformance tests for medaudit components, for plugin authors and for medaudit's own tests.

The same checks the built-in components pass, shipped with the package so that a vendor
tests its attack, defense, metric, loader, dataset or report section in its own CI:

- plain functions that raise AssertionError with a message naming the component and the
  rule (:mod:`medaudit.testing.checks`; no pytest needed), e.g.
  ``check_attack(MyAttack, {"steps": 2}, model=model, data=data)``;
- tiny models, data and records to run them on (:mod:`medaudit.testing.tiny`), and
  :class:`Records`, the record list with its facets that a metric computes on;
- a pytest plugin (:mod:`medaudit.testing.pytest_plugin`) with fixtures and one base class
  per kind (``AttackConformance``...) that a test class subclasses with ``component`` and
  ``cheap_params``.
"""

from medaudit.core.jobs import Records
from medaudit.testing.checks import (
    BUDGETS,
    attack_context,
    check_attack,
    check_attack_class,
    check_attack_run,
    check_budget_attack_run,
    check_class,
    check_component,
    check_dataset,
    check_dataset_class,
    check_defense,
    check_defense_class,
    check_metric,
    check_metric_class,
    check_model_loader,
    check_model_loader_class,
    check_module_names_component,
    check_params,
    check_report_section,
    check_report_section_class,
    check_unique_section_orders,
    kind_of,
    make_attack,
)
from medaudit.testing.tiny import DEMO, DEMO_UNET_2D, DEMO_UNET_3D, demo_model, demo_unet, example_records, phantom_data

__all__ = [
    "BUDGETS",
    "DEMO",
    "DEMO_UNET_2D",
    "DEMO_UNET_3D",
    "Records",
    "attack_context",
    "check_attack",
    "check_attack_class",
    "check_attack_run",
    "check_budget_attack_run",
    "check_class",
    "check_component",
    "check_dataset",
    "check_dataset_class",
    "check_defense",
    "check_defense_class",
    "check_metric",
    "check_metric_class",
    "check_model_loader",
    "check_model_loader_class",
    "check_module_names_component",
    "check_params",
    "check_report_section",
    "check_report_section_class",
    "check_unique_section_orders",
    "demo_model",
    "demo_unet",
    "example_records",
    "kind_of",
    "make_attack",
    "phantom_data",
]
