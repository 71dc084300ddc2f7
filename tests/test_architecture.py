"""The package layout shows the architecture: imports point one way, and every built-in
plugin module says in its first docstring line what it registers.

Layers, lowest first: ``medaudit.core`` (contracts, data, maths), then
``medaudit.plugins.<kind>`` (each kind on its own), ``medaudit.audits`` (plan, run,
results) and ``medaudit.reports``, with ``medaudit.cli`` and ``medaudit.api`` (the command line
and its Python twin) and ``medaudit.testing`` (the vendor kit) on top. Imports are read with
``ast``, so imports inside functions and under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import medaudit
from medaudit.core.host import BUILTIN_PLUGINS, get_host

PACKAGE = Path(medaudit.__file__).parent

#: Imports that break the rules, each with the reason it is allowed for now (none: the
#: command line orchestrates run -> results -> reports, so the engine renders nothing).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every ``medaudit`` module ``path`` imports, anywhere in the file; ``from a import b``
    counts as ``a.b`` when ``b`` is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return {m for m in found if m == "medaudit" or m.startswith("medaudit.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for source, targets in graph.items():
        for target in targets:
            if within(source, "medaudit.core"):
                allowed = not any(
                    within(target, p) for p in ("medaudit.audits", "medaudit.plugins", "medaudit.reports", "medaudit.cli")
                )
            elif within(source, "medaudit.plugins") and source.count(".") >= 3:
                kind = ".".join(source.split(".")[:3])
                allowed = target == "medaudit" or within(target, "medaudit.core") or within(target, kind)
            elif within(source, "medaudit.audits"):
                allowed = not within(target, "medaudit.plugins") and not within(target, "medaudit.reports")
            elif within(source, "medaudit.reports"):
                allowed = not within(target, "medaudit.plugins")
            else:
                allowed = True
            if not allowed:
                bad.add((source, target))
    return bad


def test_imports_point_down_the_layers():
    found = violations(import_graph())
    assert found - KNOWN_EXCEPTIONS == set(), "imports against the layering:\n" + "\n".join(
        f"  {s} -> {t}" for s, t in sorted(found - KNOWN_EXCEPTIONS)
    )
    assert KNOWN_EXCEPTIONS - found == set(), "stale KNOWN_EXCEPTIONS (remove them): " + str(sorted(KNOWN_EXCEPTIONS - found))


def test_the_checker_sees_imports_in_functions_and_type_checking(tmp_path, monkeypatch):
    # The rules must catch what matters most: a lazy import and a typing-only one.
    graph = {
        "medaudit.core.x": {"medaudit.audits.plan"},
        "medaudit.plugins.attacks.y": {"medaudit.plugins.models.timm", "medaudit.plugins.attacks._apgd", "medaudit"},
        "medaudit.audits.z": {"medaudit.plugins.defenses._detectors"},
        "medaudit.reports.w": {"medaudit.plugins.report.sections", "medaudit.audits.figures"},
    }
    assert violations(graph) == {
        ("medaudit.core.x", "medaudit.audits.plan"),
        ("medaudit.plugins.attacks.y", "medaudit.plugins.models.timm"),
        ("medaudit.audits.z", "medaudit.plugins.defenses._detectors"),
        ("medaudit.reports.w", "medaudit.plugins.report.sections"),
    }
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from medaudit.audits.plan import plan_jobs\n"
        "def f():\n    from medaudit.plugins.defenses import _detectors\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "module_name", lambda path: "medaudit.core.m")
    assert imported_modules(source) == {"medaudit.audits.plan", "medaudit.plugins.defenses._detectors"}


KIND_PACKAGES = sorted(p for p in (PACKAGE / "plugins").iterdir() if (p / "__init__.py").is_file())


def test_plugins_are_one_package_per_kind_with_a_docstring():
    assert {p.name for p in KIND_PACKAGES} == {"attacks", "datasets", "defenses", "metrics", "models", "report"}
    assert sorted(p.name for p in (PACKAGE / "plugins").glob("*.py")) == ["__init__.py"]
    for package in KIND_PACKAGES:
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))), package.name


def test_every_plugin_module_is_built_in_and_helpers_register_nothing():
    modules = {module_name(p): p for package in KIND_PACKAGES for p in package.glob("*.py") if p.name != "__init__.py"}
    registering = {m for m, p in modules.items() if "@hookimpl" in p.read_text(encoding="utf-8")}
    assert registering == set(BUILTIN_PLUGINS)
    assert all(not m.rpartition(".")[2].startswith("_") for m in registering)


@pytest.mark.parametrize("module", BUILTIN_PLUGINS)
def test_docstring_first_line_names_every_component_the_module_registers(module):
    registered = [
        name for table in get_host().components.values() for name, cls in table.items() if cls.plugin == module
    ]
    assert registered, f"{module} registers nothing"
    path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    first_line = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))).splitlines()[0]
    named = set(re.findall(r"[\w-]+", first_line))
    assert set(registered) <= named, f"{module}: first docstring line {first_line!r} misses {set(registered) - named}"
