"""The huggingface loader: local timm/transformers folders, normalisation from the config,
weights fingerprinted and pinned, clear errors for missing files, never the network."""

from __future__ import annotations

import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from medaudit.core.components import Task
from medaudit.core.errors import EnvironmentProblem, ModelLoadError
from medaudit.core.host import get_host
from medaudit.core.models import file_sha256

HOST = get_host(load_entry_points=False)
LOADER = HOST.get("model", "huggingface")


def save_timm_folder(folder: Path, *, in_chans: int = 1, num_classes: int = 3, mean=(0.3,), std=(0.2,),
                     safe_serialization=True, seed: int = 0) -> torch.nn.Module:
    """A tiny timm network saved as timm's save_for_hf writes it (what push_to_hf_hub uploads)."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", in_chans=in_chans, num_classes=num_classes).eval()
    timm.models.save_for_hf(net, folder, safe_serialization=safe_serialization,
                            data_config={"mean": tuple(mean), "std": tuple(std)})
    return net


def load(task: Task = Task.CLASSIFICATION, **params):
    return LOADER(LOADER.Params.model_validate(params)).load(task)


def test_timm_folder_gives_the_saved_logits_with_the_configs_normalisation(tmp_path):
    net = save_timm_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["pretrained_cfg"]["mean"] == [0.3]
    loaded = load(path=str(tmp_path))
    x = torch.rand(4, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net((x - 0.3) / 0.2), atol=1e-6)
    assert loaded.num_classes == 3 and loaded.in_channels == 1 and loaded.task is Task.CLASSIFICATION
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.fingerprint == file_sha256(tmp_path / "model.safetensors")
    assert load(path=str(tmp_path)).fingerprint == loaded.fingerprint  # stable
    assert "test_resnet" in loaded.description


def test_other_weights_other_fingerprint_and_mean_std_overrides(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    save_timm_folder(first, seed=0)
    net = save_timm_folder(second, seed=1)
    assert load(path=str(first)).fingerprint != load(path=str(second)).fingerprint
    loaded = load(path=str(second), mean=[0.5], std=[0.25])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net((x - 0.5) / 0.25), atol=1e-6)


def test_rgb_network_takes_grey_images_replicated(tmp_path):
    net = save_timm_folder(tmp_path, in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    loaded = load(path=str(tmp_path))
    assert loaded.in_channels == 3
    x = torch.rand(2, 1, 32, 32)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net((x.expand(-1, 3, -1, -1) - mean) / std), atol=1e-6)


def test_pytorch_model_bin_is_read_safely(tmp_path):
    net = save_timm_folder(tmp_path, safe_serialization=False)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load(path=str(tmp_path))
    assert loaded.fingerprint == file_sha256(tmp_path / "pytorch_model.bin")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net((x - 0.3) / 0.2), atol=1e-6)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValidationError, match="folder not found: .*nowhere"):
        LOADER.Params.model_validate({"path": str(tmp_path / "nowhere")})
    with pytest.raises(ValidationError, match=f"{tmp_path / 'config.json'} not found"):
        LOADER.Params.model_validate({"path": str(tmp_path)})
    save_timm_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValidationError, match=r"no weights file: expected .*model\.safetensors or .*pytorch_model"):
        LOADER.Params.model_validate({"path": str(tmp_path)})


def test_relative_path_resolves_against_the_spec_folder(tmp_path):
    save_timm_folder(tmp_path / "model")
    params = LOADER.Params.model_validate({"path": "model"}, context={"base_dir": tmp_path})
    assert params.path == tmp_path / "model"


def test_pin_and_mismatched_weights(tmp_path):
    save_timm_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert load(path=str(tmp_path), sha256=file_sha256(weights)).fingerprint == file_sha256(weights)
    with pytest.raises(ModelLoadError, match="but the spec pins"):
        load(path=str(tmp_path), sha256="a" * 64)
    other = tmp_path / "other"
    save_timm_folder(other, num_classes=4)
    weights.write_bytes((other / "model.safetensors").read_bytes())  # weights of another head
    mismatch = r"does not fit timm test_resnet .*shape mismatches: .*fc.weight \(4, 96\) vs \(3, 96\)"
    with pytest.raises(ModelLoadError, match=mismatch):
        load(path=str(tmp_path))


def test_unknown_architecture_is_named(tmp_path):
    save_timm_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "test_resnett"}))
    with pytest.raises(ModelLoadError, match=r"config.json: timm has no architecture 'test_resnett'; did you mean"):
        load(path=str(tmp_path))


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_loading_never_touches_the_network_and_restores_the_offline_switches(tmp_path, monkeypatch):
    save_timm_folder(tmp_path)
    _no_network(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(AssertionError, match="network"):  # the guard works
        socket.create_connection(("example.org", 443))
    loaded = load(path=str(tmp_path))
    assert loaded.num_classes == 3
    assert "HF_HUB_OFFLINE" not in os.environ


# -- transformers folders ------------------------------------------------------------------


def fake_transformers(monkeypatch, net: torch.nn.Module, seen: dict):
    """A stand-in for transformers (not a dependency): records how the model is asked for."""

    class Auto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            import huggingface_hub.constants

            seen.update(path=path, offline=os.environ.get("HF_HUB_OFFLINE"),
                        hub_offline=huggingface_hub.constants.HF_HUB_OFFLINE, **kwargs)
            return net

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModelForImageClassification=Auto))


class TinyHFClassifier(torch.nn.Module):
    """Answers like a transformers classifier: an output with ``.logits``; takes ``pixel_values``."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_labels=2, num_channels=3)
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, pixel_values):
        return types.SimpleNamespace(logits=self.conv(pixel_values).mean((2, 3)))


def write_transformers_folder(folder: Path, net: torch.nn.Module, preprocessor: dict | None):
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    config = {"model_type": "tiny", "architectures": ["TinyForImageClassification"]}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def test_transformers_folder_loads_offline_with_the_processors_normalisation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = TinyHFClassifier().eval()
    write_transformers_folder(tmp_path, net, {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                              "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.25]})
    seen: dict = {}
    fake_transformers(monkeypatch, net, seen)
    _no_network(monkeypatch)
    loaded = load(path=str(tmp_path))
    assert seen["local_files_only"] is True and seen["trust_remote_code"] is False
    assert seen["offline"] == "1" and seen["hub_offline"] is True and seen["path"] == str(tmp_path)
    assert loaded.num_classes == 2 and loaded.in_channels == 3
    assert loaded.fingerprint == file_sha256(tmp_path / "model.safetensors")
    x = torch.rand(2, 1, 16, 16)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.2, 0.25]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net((x.expand(-1, 3, -1, -1) - mean) / std).logits, atol=1e-6)


def test_transformers_processor_without_rescale_works_on_0_255(tmp_path, monkeypatch):
    net = TinyHFClassifier().eval()
    write_transformers_folder(tmp_path, net, {"do_rescale": False, "do_normalize": True,
                                              "image_mean": [127.5], "image_std": [51.0]})
    fake_transformers(monkeypatch, net, {})
    loaded = load(path=str(tmp_path))
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():  # the processor would compute (255 x - 127.5) / 51
        assert torch.allclose(loaded.module(x), net((255 * x.expand(-1, 3, -1, -1) - 127.5) / 51).logits, atol=1e-5)


def test_transformers_folder_without_processor_needs_mean_and_std(tmp_path, monkeypatch):
    net = TinyHFClassifier().eval()
    write_transformers_folder(tmp_path, net, None)
    fake_transformers(monkeypatch, net, {})
    with pytest.raises(ModelLoadError, match=r"preprocessor_config.json not found: give mean and std"):
        load(path=str(tmp_path))
    assert load(path=str(tmp_path), mean=[0.5], std=[0.5]).in_channels == 3


def test_transformers_folder_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    write_transformers_folder(tmp_path, TinyHFClassifier(), None)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(EnvironmentProblem, match=r"is a transformers config \(tiny\).*pip install transformers"):
        load(path=str(tmp_path))


# -- through the spec ---------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_audit_through_the_spec(tmp_path):
    from medaudit.core.spec import load_spec
    from tests.conftest import spec_text
    from tests.helpers import run_audit

    save_timm_folder(tmp_path / "hf-model", num_classes=2)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(
        model="model:\n  loader: huggingface\n  params: {path: hf-model}",
        data="data:\n  dataset: phantom\n  params: {n: 8, size: 32, seed: 0}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 1/255]",
        attacks="attacks:\n  - name: fgsm",
        acceptance="acceptance:\n  criteria:\n    - {id: AC-01, metric: clean_accuracy, op: '>=', threshold: 0.01}",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 8\n  seed: 0\n  output_dir: {tmp_path / 'runs'}",
        validity="validity: {convergence_cases: 0, trace_cases: 0, noise_cases: 0}\nreport: {formats: [json]}",
    ), encoding="utf-8")
    outcome = run_audit(load_spec(spec, HOST), HOST)
    fingerprints = json.loads((outcome.run_dir / "fingerprints.json").read_text())
    assert fingerprints["model_sha256"] == file_sha256(tmp_path / "hf-model" / "model.safetensors")
    assert outcome.results["rows"], "no results"
