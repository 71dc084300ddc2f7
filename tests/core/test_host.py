"""The plugin host: built-ins, entry points, broken plugins, clashes, controls, docs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import medaudit
from medaudit.cli import cli
from medaudit.core import hookspecs
from medaudit.core.components import KINDS, Attack, Norm, Params
from medaudit.core.errors import PluginError
from medaudit.core.host import BUILTIN_PLUGINS, get_host

VENDOR_DIR = Path(__file__).parents[1] / "vendor_plugins"


def install_entry_point(site: Path, dist: str, name: str, module: str) -> None:
    """Make ``module`` discoverable in the ``medaudit`` group, as pip would."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[medaudit]\n{name} = {module}\n")


@pytest.fixture
def vendor_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_entry_point(site, "medaudit-example-vendor", "example", "medaudit_example_vendor")
    install_entry_point(site, "medaudit-broken-vendor", "broken", "medaudit_broken_vendor")
    monkeypatch.syspath_prepend(str(VENDOR_DIR))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_builtins_register_every_kind(host):
    assert set(BUILTIN_PLUGINS) <= set(host.plugins)
    assert {"phantom"} <= set(host.components["dataset"])
    assert {"timm", "demo"} <= set(host.components["model"])
    assert {"fgsm", "pgd"} <= set(host.components["attack"])
    assert {"clean_accuracy", "robust_accuracy", "attack_success_rate"} <= set(host.components["metric"])
    assert host.components["attack"]["pgd"].plugin == "medaudit.plugins.attacks.gradient"


def test_hookimpl_is_reexported():
    assert medaudit.hookimpl is hookspecs.hookimpl


def test_entry_point_plugin_is_discovered_and_usable(vendor_site, write_spec, tmp_path):
    host = get_host()
    assert "random-sign" in host.components["attack"]
    assert host.plugins["example"].distribution == "medaudit-example-vendor"
    assert host.plugins["example"].version == "0.1.0"
    # the broken one is reported by name and skipped
    assert [(f.name, f.distribution) for f in host.failed] == [("broken", "medaudit-broken-vendor")]
    assert "not installed" in host.failed[0].error

    spec = write_spec(attacks="attacks:\n  - name: random-sign")
    result = CliRunner().invoke(cli, ["run", str(spec), "--output-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["attacks"][0]["distribution"] == "medaudit-example-vendor"
    assert any(r["attack"] == "random-sign" for r in results["rows"])
    assert "failed to load and was skipped" in result.output  # the CLI warned and kept working


def test_plugins_json_lists_components_with_provenance(vendor_site):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    for row in rows:
        assert {"kind", "name", "plugin", "version", "params"} <= set(row)
    pgd = next(r for r in rows if r["kind"] == "attack" and r["name"] == "pgd")
    assert "steps" in pgd["params"]["properties"]
    assert pgd["version"] == medaudit.__version__
    vendor = next(r for r in rows if r["name"] == "random-sign")
    assert (vendor["plugin"], vendor["distribution"], vendor["needs"]) == ("example", "medaudit-example-vendor", "decisions")


def test_load_and_disable_controls(vendor_site, monkeypatch):
    monkeypatch.setenv("MEDAUDIT_LOAD_PLUGINS", "")
    host = get_host()
    assert "random-sign" not in host.components["attack"] and not host.failed
    monkeypatch.setenv("MEDAUDIT_LOAD_PLUGINS", "example")
    host = get_host()
    assert "random-sign" in host.components["attack"] and not host.failed
    monkeypatch.delenv("MEDAUDIT_LOAD_PLUGINS")
    monkeypatch.setenv("MEDAUDIT_DISABLE_PLUGINS", "broken,example")
    host = get_host()
    assert "random-sign" not in host.components["attack"] and not host.failed
    assert "pgd" in host.components["attack"]  # built-ins cannot be disabled


class _Dup(Attack):
    name = "pgd"
    norms = frozenset({Norm.LINF})
    Params = Params

    def perturb(self, model, x, y, *, eps, norm, generator):
        return x


class DuplicatePlugin:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(_Dup)


def test_duplicate_component_name_stops_startup_naming_both():
    with pytest.raises(PluginError) as info:
        get_host(load_entry_points=False, extra_plugins=[("acme-dup", DuplicatePlugin())])
    message = str(info.value)
    assert "'pgd'" in message and "acme-dup" in message and "medaudit.plugins.attacks.gradient" in message


class MisspelledHook:
    @medaudit.hookimpl
    def register_atacks(self, register):
        pass


def test_misspelled_hook_fails_loudly():
    with pytest.raises(PluginError, match="register_atacks"):
        get_host(load_entry_points=False, extra_plugins=[("typo", MisspelledHook())])


class NotAComponent:
    @medaudit.hookimpl
    def register_attacks(self, register):
        register(object)


def test_registering_a_non_component_names_the_plugin():
    with pytest.raises(PluginError, match="'bad'.*not a subclass of Attack"):
        get_host(load_entry_points=False, extra_plugins=[("bad", NotAComponent())])


def test_every_hook_is_documented_for_plugin_authors():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "medaudit_spec")]
    assert {f.__name__ for f in specs} >= {hook for _, hook in KINDS.values()} | {"audit_started", "job_finished", "audit_finished"}
    for f in specs:
        doc = inspect.getdoc(f) or ""
        for arg in inspect.signature(f).parameters:
            assert f":param {arg}:" in doc, f"{f.__name__} does not document {arg}"
