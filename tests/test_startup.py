"""Reading a spec stays light: ``medaudit validate`` and ``medaudit --help`` import none of the
heavy libraries (torch, numpy, the model zoos, ART, MONAI, scikit-learn, matplotlib...). The
built-in plugin modules are all imported to register their components, so each one defers
those imports to the code that runs an audit (:mod:`medaudit.core.lazy`). Not timed: the
wall time is what ``benchmarks/startup.py`` measures; this checks what is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from medaudit.core.lazy import LazyModule
from tests.conftest import spec_text

#: Libraries whose import costs from a tenth of a second (numpy) to seconds (torch).
HEAVY = (
    "torch", "numpy", "torchvision", "timm", "segmentation_models_pytorch", "art", "monai", "sklearn",
    "scipy", "matplotlib", "captum", "PIL", "pydicom", "nibabel", "onnxruntime", "jinja2",
)

#: Runs the command line in-process, then prints which heavy top-level packages were imported.
PROBE = textwrap.dedent(
    """\
    import json, sys
    from medaudit.cli import main
    sys.argv = ["medaudit", *json.loads(sys.argv[1])]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    heavy = set({heavy})
    print(json.dumps({{"code": code, "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & heavy)}}))
    """
).format(heavy=json.dumps(HEAVY))


def probe(args: list[str], cwd) -> dict:
    # Only the built-in plugins: an installed vendor plugin may import torch at its top level.
    env = dict(os.environ, MEDAUDIT_LOAD_PLUGINS="")
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), stderr=done.stderr)


def spec_with_missing_files(tmp_path):
    """A spec that names a model file and a data folder that do not exist, with attacks and
    defenses of several families so their params are checked too."""
    path = tmp_path / "audit.yaml"
    path.write_text(spec_text(
        model="model:\n  loader: onnx\n  params: {path: missing.onnx}",
        data="data:\n  dataset: image-folder\n  params: {path: no-such-folder, classes: [normal, nodule]}",
        attacks="attacks:\n  - name: pgd\n    params: {steps: 5}\n  - name: square\n  - name: autoattack",
        defenses="defenses:\n  - name: jpeg\n  - name: randomized-smoothing",
    ), encoding="utf-8")
    return path


def test_validate_imports_no_heavy_library(tmp_path):
    result = probe(["validate", str(spec_with_missing_files(tmp_path))], tmp_path)
    assert result["code"] == 4, result["stderr"]  # the missing files are found...
    assert "not found" in result["stderr"] and "no-such-folder" in result["stderr"]
    assert result["heavy"] == []  # ...without importing any of these


def test_help_imports_no_heavy_library(tmp_path):
    result = probe(["--help"], tmp_path)
    assert result["code"] == 0, result["stderr"]
    assert result["heavy"] == []


def test_lazy_module_imports_on_first_use_and_forwards_writes(tmp_path, monkeypatch):
    (tmp_path / "startup_probe_module.py").write_text("VALUE = 1\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = LazyModule("startup_probe_module")
    assert "startup_probe_module" not in sys.modules
    assert lazy.VALUE == 1 and "startup_probe_module" in sys.modules
    real = sys.modules["startup_probe_module"]
    monkeypatch.setattr(lazy, "VALUE", 2)  # a patch through the stand-in reaches the module...
    assert real.VALUE == 2
    monkeypatch.setattr(real, "VALUE", 3)  # ...and one of the module is seen through it
    assert lazy.VALUE == 3
    with pytest.raises(AttributeError):
        lazy.MISSING
    monkeypatch.delitem(sys.modules, "startup_probe_module")
