"""What a defense adds to each record (its :class:`Screen`) is the defense's, not the
engine's: a vendor's screen that only reports a value adds fields and changes no number; one
that rejects inputs gets the rejection rule through the facet it declares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import medaudit
from medaudit.audits.records import read_records
from medaudit.core.components import Defense, Facet, Params, Screen
from medaudit.core.host import get_host
from medaudit.core.spec import load_spec
from tests.helpers import run_audit


class Brightness(Screen):
    """Reports each input's mean intensity; rejects nothing."""

    fields = ("brightness",)

    def examine(self, x):
        return {"brightness": x.flatten(1).mean(1).tolist()}


class RejectBright(Screen):
    """Rejects inputs brighter than a threshold: a rejecting defense that is no detector."""

    facets = frozenset({Facet.REJECTION})
    fields = ("rejected",)

    def __init__(self, threshold: float):
        self.threshold = threshold

    def examine(self, x):
        return {"rejected": (x.flatten(1).mean(1) > self.threshold).tolist()}


class ScreenDefense(Defense):
    name = "screen"
    Params = Params
    screen: Screen = Brightness()

    def apply(self, model, data):
        return dataclasses.replace(model, screen=self.screen, description="screened")


class RejectDefense(ScreenDefense):
    name = "reject-bright"
    screen = RejectBright(threshold=-1.0)  # every input: all clean cases become errors


class Plugin:
    @medaudit.hookimpl
    def register_defenses(self, register):
        register(ScreenDefense)
        register(RejectDefense)


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    from tests.conftest import spec_text

    tmp = tmp_path_factory.mktemp("screens")
    host = get_host(load_entry_points=False, extra_plugins=[("screens", Plugin())])
    path = tmp / "spec.yaml"
    path.write_text(spec_text(
        data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
        attacks="attacks:\n  - name: fgsm\ndefenses:\n  - name: screen\n  - name: reject-bright",
        runtime=f"runtime:\n  device: cpu\n  output_dir: {tmp}"), encoding="utf-8")
    outcome = run_audit(load_spec(path, host), host)
    return outcome


def _records(audit, defense, attack):
    [job] = [j for j in audit.results["jobs"] if j["defense"] == defense and j["attack"] == attack]
    return read_records(audit.run_dir, job["id"])


def test_a_reporting_screen_adds_its_fields_and_moves_no_number(audit):
    rows = {(r["defense"], r["attack"]): r["metrics"] for r in audit.results["rows"]}
    assert rows["screen", "fgsm"] == rows["none", "fgsm"]
    assert audit.results["clean"]["screen"] == audit.results["clean"]["none"]
    clean, attacked = _records(audit, "screen", "clean"), _records(audit, "screen", "fgsm")
    assert Facet.REJECTION not in clean.facets and Facet.REJECTION not in attacked.facets
    assert all(0 < r["clean_brightness"] < 1 for r in clean)
    assert [r["clean_brightness"] for r in attacked] == [r["clean_brightness"] for r in clean]
    for r in attacked:  # measured on the adversarial input where there is one, else None
        assert (r["adv_brightness"] is not None) == r["attacked"]
    assert any(r["attacked"] and r["adv_brightness"] != r["clean_brightness"] for r in attacked)


def test_a_rejecting_screen_gets_the_rejection_rule(audit):
    clean = _records(audit, "reject-bright", "clean")
    assert Facet.REJECTION in clean.facets and all(r["clean_rejected"] for r in clean)
    assert audit.results["clean"]["reject-bright"]["clean_accuracy"]["value"] == 0.0  # a rejected clean input is an error
    assert not any(r["attacked"] for r in _records(audit, "reject-bright", "fgsm"))  # rejected: nothing to attack
    assert "rejects counts as an error" in " ".join(audit.results["conventions"])
    torch.testing.assert_close(torch.tensor(audit.results["clean"]["none"]["clean_accuracy"]["value"]),
                               torch.tensor(sum(r["clean_pred"] == r["label"] for r in clean) / len(clean)))
