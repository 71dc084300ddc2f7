"""The onnx model loader: onnxruntime as a black box with scores only, and the planner's
refusal of gradient attacks on it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from medaudit.core.spec import load_spec
from medaudit.cli import cli
from medaudit.core.components import Access, Task
from medaudit.core.errors import DataError, ExitCode, ModelLoadError, SpecError
from medaudit.core.models import file_sha256
from medaudit.plugins.models.onnx import OnnxLoader, OnnxParams, export_onnx
from tests.helpers import run_audit


@pytest.fixture(scope="module")
def onnx_file(demo_model, tmp_path_factory):
    """The demo classifier (normalisation included) as ONNX, with a dynamic batch axis."""
    return export_onnx(demo_model.module, torch.rand(2, 1, 64, 64), tmp_path_factory.mktemp("onnx") / "demo.onnx")


def load(**params):
    return OnnxLoader(OnnxParams.model_validate(params)).load(Task.CLASSIFICATION)


def test_logits_equal_torch_for_any_batch_size(onnx_file, demo_model, demo_data):
    loaded = load(path=onnx_file)
    assert loaded.access == {Access.SCORES, Access.DECISIONS} and "onnxruntime" in loaded.access_reason
    assert (loaded.num_classes, loaded.in_channels) == (2, 1)  # read from the graph's shapes
    assert loaded.fingerprint == file_sha256(onnx_file)
    assert list(loaded.module.parameters()) == []
    for n in (1, 5, 96):
        x = demo_data.images[:n]
        with torch.inference_mode():
            expected, got = demo_model.module(x), loaded.module(x)
        assert got.dtype == torch.float32 and got.shape == (n, 2)
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_backward_through_the_graph_says_why_it_cannot(onnx_file):
    model = load(path=onnx_file).module
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="ONNX graph run by onnxruntime: no gradients"):
        model(x).sum().backward()


def test_fixed_batch_graph_runs_in_chunks_and_probabilities_become_log_probabilities(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1),
    ).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(net, (torch.rand(4, 3, 16, 16),), str(path), external_data=False, verbose=False)
    loaded = load(path=path, scores="probabilities", mean=[0.5], std=[0.25])
    assert (loaded.num_classes, loaded.in_channels) == (3, 3) and loaded.module.net.batch == 4
    for n in (0, 3, 9):
        x = torch.rand(n, 1, 16, 16)  # grey images are replicated to the graph's 3 channels
        with torch.inference_mode():
            got = loaded.module(x)
            expected = net((x.expand(-1, 3, -1, -1) - 0.5) / 0.25).log()
        assert got.shape == (n, 3) and torch.allclose(got, expected, atol=1e-4)
    with pytest.raises(DataError, match=r"takes input of shape \[4, 3, 16, 16\], got \[2, 3, 32, 32\]"):
        loaded.module(torch.rand(2, 3, 32, 32))
    with pytest.raises(ModelLoadError, match="the graph has 3 classes but the params say classes: 2"):
        load(path=path, classes=2)


def test_pin_and_corrupt_file(onnx_file, tmp_path):
    assert load(path=onnx_file, sha256=file_sha256(onnx_file)).fingerprint == file_sha256(onnx_file)
    with pytest.raises(ModelLoadError, match=f"{onnx_file}: sha256 is .* but the spec pins {'e' * 64}"):
        load(path=onnx_file, sha256="e" * 64)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as info:
        load(path=corrupt)
    message = str(info.value)
    assert message.startswith(f"{corrupt}: onnxruntime cannot load it as an ONNX model") and "\n" not in message


def _model(path) -> str:
    return f"model:\n  loader: onnx\n  params: {{path: '{path}'}}"


def test_run_with_square_writes_results(onnx_file, write_spec, tmp_path):
    spec = write_spec(
        model=_model(onnx_file),
        data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}",
        attacks="attacks:\n  - name: square\n    params: {queries: 20}",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(spec), "--output-dir", str(out), "-q"])
    assert result.exit_code == ExitCode.PASS, result.output
    [path] = list(out.rglob("results.json"))
    results = json.loads(path.read_text())
    assert results["model"]["access"] == ["decisions", "scores"]
    assert results["model"]["sha256"] == file_sha256(onnx_file)
    assert results["clean"]["none"]["clean_accuracy"]["value"] >= 0.75
    gradients = [c for c in results["validity"] if c["id"] == "gradients_usable"]
    assert all(c["status"] != "FAIL" for c in gradients)


def test_gradient_attack_is_refused_before_a_run_dir_exists(onnx_file, write_spec, tmp_path):
    spec = write_spec(model=_model(onnx_file), attacks="attacks:\n  - name: square\n  - name: pgd")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(spec), "--output-dir", str(out), "-q"])
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert (
        "attacks[1]: attack 'pgd' needs gradients but the model gives decisions, scores (the model is an ONNX graph "
        "run by onnxruntime: no gradients); use a score- or decision-based attack: " in result.output
    )
    assert "square" in result.output.split("decision-based attack: ")[1]
    assert not out.exists()


def test_training_defense_is_refused_on_a_black_box(onnx_file, write_spec, tmp_path, host):
    defenses = "defenses:\n  - name: pgd-at\n    params: {train_data: {dataset: phantom, params: {n: 16, size: 64, seed: 7}}}"
    spec = write_spec(model=_model(onnx_file), attacks="attacks:\n  - name: square\n    params: {queries: 5}\n" + defenses,
                      runtime=f"runtime:\n  device: cpu\n  output_dir: {tmp_path / 'out'}")
    with pytest.raises(SpecError, match="defense 'pgd-at': it trains the model's weights, and this model gives no gradients"):
        run_audit(load_spec(spec, host), host)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_onnx_dicom_example_end_to_end(tmp_path):
    """examples/onnx-dicom: make_files.py writes the model, DICOM slices and a pinned spec
    that audits them (fewer slices and queries than the example's, to stay quick)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[3] / "examples" / "onnx-dicom" / "make_files.py"
    module_spec = importlib.util.spec_from_file_location("make_files", script)
    make_files = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(make_files)
    out = tmp_path / "files"
    assert make_files.main([str(out), "--n", "32"]) == 0
    spec = (out / "audit.yaml").read_text()
    assert f"sha256: {file_sha256(out / 'demo-classifier.onnx')}" in spec
    assert len(list((out / "dicom").rglob("*.dcm"))) == 32
    (out / "audit.yaml").write_text(spec.replace("queries: 500", "queries: 20"))
    result = CliRunner().invoke(cli, ["run", str(out / "audit.yaml"), "--run-dir", str(tmp_path / "run"), "-q"])
    assert result.exit_code in (ExitCode.PASS, ExitCode.FAIL), result.output  # 32 cases: the verdict may go either way
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["loader"] == "onnx" and results["data"]["dataset"] == "dicom-folder"
    assert results["clean"]["none"]["clean_accuracy"]["value"] >= 0.9
    assert "Fakename" not in (tmp_path / "run" / "report.html").read_text()
