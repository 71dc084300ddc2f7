"""Shared fixtures: a private model cache, a plugin host, tiny specs and a trained model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from medaudit.core.host import get_host
from medaudit.testing import tiny
# The demo models' configs live with their builders in medaudit.testing; tests import them from here too.
from medaudit.testing.tiny import DEMO, DEMO_UNET_2D, DEMO_UNET_3D  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def model_cache(tmp_path_factory):
    """Keep trained demo models out of the user's cache; shared by the whole session."""
    path = tmp_path_factory.mktemp("model-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDAUDIT_CACHE_DIR", str(path))
    mp.delenv("MEDAUDIT_LOAD_PLUGINS", raising=False)
    mp.delenv("MEDAUDIT_DISABLE_PLUGINS", raising=False)
    yield path
    mp.undo()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def host():
    return get_host(load_entry_points=False)


@pytest.fixture(scope="session")
def demo_model():
    """The example's demo classifier, trained once per test session."""
    return tiny.demo_model()


@pytest.fixture(scope="session")
def seg_model():
    """The 2D segmentation example's demo U-Net (smp, 5 phantom classes, 64 px)."""
    return tiny.demo_unet(DEMO_UNET_2D)


@pytest.fixture(scope="session")
def seg_data():
    """32 phantom slices at 64 px with their 5-class masks."""
    return tiny.phantom_data(n=32)


@pytest.fixture(scope="session")
def demo_data():
    """96 phantom slices at 64 px, labelled normal or nodule."""
    return tiny.phantom_data()


def spec_text(**overrides: str) -> str:
    """A small valid spec; keyword arguments replace whole top-level sections (YAML text)."""
    sections = {
        "audit": "audit:\n  name: tiny\n  title: Tiny audit",
        "model": "model:\n  loader: demo",
        "data": "data:\n  dataset: phantom\n  params: {n: 48, size: 64, seed: 0}",
        "threat_model": "threat_model:\n  norm: linf\n  epsilons: [0, 1/255, 4/255]",
        "attacks": "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 5}",
        "acceptance": textwrap.dedent(
            """\
            acceptance:
              criteria:
                - id: AC-01
                  metric: clean_accuracy
                  op: ">="
                  threshold: 0.5"""
        ),
        "runtime": "runtime:\n  device: cpu\n  batch_size: 32\n  seed: 0",
        # The re-runs of the validity checks on fewer cases than their defaults: the suite runs many audits.
        "validity": "validity: {convergence_cases: 8, trace_cases: 1, noise_cases: 16}",
    }
    sections.update(overrides)
    return "\n".join(v for v in sections.values() if v) + "\n"


@pytest.fixture
def write_spec(tmp_path):
    def write(text: str | None = None, name: str = "spec.yaml", **overrides: str) -> Path:
        path = tmp_path / name
        path.write_text(text if text is not None else spec_text(**overrides), encoding="utf-8")
        return path

    return write
