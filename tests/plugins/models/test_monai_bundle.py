"""The monai-bundle loader: a network built from a real inference config, its weights
loaded strictly, what the bundle's preprocessing would do stated, config code refused
unless trusted, clear errors for missing files, never the network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from medaudit.core.components import Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.host import get_host
from medaudit.core.models import SlidingWindow, file_sha256

HOST = get_host(load_entry_points=False)
LOADER = HOST.get("model", "monai-bundle")

#: A tiny 2D U-Net as a bundle writes it: its output channels by reference, as bundles often do.
UNET_2D = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": "@num_classes",
           "channels": [4, 8], "strides": [2], "num_res_units": 0}
PREPROCESSING = {"_target_": "Compose", "transforms": [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
     "clip": True},
]}
POSTPROCESSING = {"_target_": "Compose", "transforms": [
    {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
]}


def inference_config(network_def: dict | None = None, **extra) -> dict:
    """An inference.json shaped like the MONAI model zoo's."""
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "num_classes": 3,
        "network_def": network_def or UNET_2D,
        "network": "$@network_def.to(@device)",
        "preprocessing": PREPROCESSING,
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": POSTPROCESSING,
        **extra,
    }


def build(network_def: dict, num_classes: int = 3) -> torch.nn.Module:
    """The network the definition describes (references filled in), built directly."""
    import monai.networks.nets as nets

    kwargs = {k: (num_classes if v == "@num_classes" else v) for k, v in network_def.items() if k != "_target_"}
    return getattr(nets, network_def["_target_"])(**kwargs)


def write_bundle(folder: Path, config: dict, state: dict | None, *, fmt: str = "json", seed: int = 0) -> Path:
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    text = json.dumps(config) if fmt == "json" else yaml.safe_dump(config)
    (folder / "configs" / f"inference.{fmt}").write_text(text, encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps({"name": "Tiny test bundle", "version": "0.1.0"}))
    if state is not None:
        torch.save(state, folder / "models" / "model.pt")
    return folder


def unet_bundle(folder: Path, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build(UNET_2D).eval()
    write_bundle(folder, inference_config(**extra), {"model": net.state_dict()})  # wrapped, as CheckpointSaver does
    return net


def load(task: Task = Task.SEGMENTATION, **params):
    return LOADER(LOADER.Params.model_validate(params)).load(task)


def test_segmentation_bundle_gives_the_networks_logits(tmp_path):
    net = unet_bundle(tmp_path)
    loaded = load(path=str(tmp_path))
    x = torch.rand(2, 1, 32, 32)
    out = loaded.module(x)
    assert out.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-6)
    assert loaded.num_classes == 3 and loaded.in_channels == 1  # read from the network definition
    assert loaded.fingerprint == file_sha256(tmp_path / "models" / "model.pt")
    assert load(path=str(tmp_path)).fingerprint == loaded.fingerprint
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    text = loaded.description
    assert "Tiny test bundle" in text and "UNet" in text
    assert "preprocessing LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged" in text
    assert "postprocessing Activationsd, AsDiscreted not applied" in text
    assert "maps [-57, 164] to [0, 1]: give the data set that window" in text


def test_other_weights_other_fingerprint(tmp_path):
    unet_bundle(tmp_path / "a", seed=0)
    unet_bundle(tmp_path / "b", seed=1)
    assert load(path=str(tmp_path / "a")).fingerprint != load(path=str(tmp_path / "b")).fingerprint


def test_intensity_scaling_advice_and_mean_std(tmp_path):
    preprocessing = json.loads(json.dumps(PREPROCESSING))
    preprocessing["transforms"][2].update(b_min=-1.0, b_max=1.0)
    net = unet_bundle(tmp_path, preprocessing=preprocessing)
    advice = "to [-1.0, 1.0]: give the data set that window and set mean: [0.5], std: [0.5]"
    assert advice in load(path=str(tmp_path)).description
    loaded = load(path=str(tmp_path), mean=[0.5], std=[0.5])
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(2 * x - 1), atol=1e-6)  # [0, 1] -> [-1, 1], as the bundle scales


def test_sliding_window_inferer_is_kept(tmp_path):
    from monai.inferers import sliding_window_inference

    inferer = {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4, "overlap": 0.5}
    net = unet_bundle(tmp_path, inferer=inferer, roi=[16, 16])
    loaded = load(path=str(tmp_path))
    assert isinstance(loaded.module, SlidingWindow) and loaded.module.patch_size == (16, 16)
    assert loaded.module.overlap == 0.5 and "sliding window [16, 16]" in loaded.description
    x = torch.rand(1, 1, 40, 40)
    with torch.no_grad():
        expected = sliding_window_inference(x, (16, 16), 4, net, overlap=0.5, mode="gaussian")
        assert torch.allclose(loaded.module(x), expected, atol=1e-5)
    assert not isinstance(load(path=str(tmp_path), sliding_window=False).module, SlidingWindow)
    assert load(path=str(tmp_path), patch_size=[24, 24]).module.patch_size == (24, 24)


def test_classification_bundle_in_yaml(tmp_path):
    definition = {"_target_": "DenseNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                  "init_features": 4, "growth_rate": 4, "block_config": [1, 1]}
    torch.manual_seed(0)
    net = build(definition).eval()
    write_bundle(tmp_path, inference_config(definition), {"state_dict": net.state_dict()}, fmt="yaml")
    loaded = load(Task.CLASSIFICATION, path=str(tmp_path))
    x = torch.rand(3, 1, 32, 32)
    out = loaded.module(x)
    assert out.shape == (3, 2) and loaded.num_classes == 2 and loaded.task is Task.CLASSIFICATION
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_3d_torchscript_bundle(tmp_path):
    definition = {**UNET_2D, "spatial_dims": 3, "out_channels": 2}
    torch.manual_seed(0)
    net = build(definition).eval()
    write_bundle(tmp_path, inference_config(definition), None)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "models" / "model.ts"))  # no model.pt: the TorchScript
    loaded = load(path=str(tmp_path))
    x = torch.rand(1, 1, 16, 16, 16)
    out = loaded.module(x)
    assert out.shape == (1, 2, 16, 16, 16) and loaded.num_classes == 2
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5)
    assert loaded.fingerprint == file_sha256(tmp_path / "models" / "model.ts") and "TorchScript" in loaded.description
    with pytest.raises(ModelLoadError, match="but the spec pins"):
        load(path=str(tmp_path), sha256="b" * 64)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValidationError, match="bundle folder not found: .*nowhere"):
        LOADER.Params.model_validate({"path": str(tmp_path / "nowhere")})
    (tmp_path / "models").mkdir()
    with pytest.raises(ValidationError, match=r"bundle weights not found: .*models/model\.pt \(nor .*model\.ts\)"):
        LOADER.Params.model_validate({"path": str(tmp_path)})
    torch.save(build(UNET_2D).state_dict(), tmp_path / "models" / "model.pt")
    with pytest.raises(ValidationError, match=r"bundle config not found: .*configs/inference\.json or .*\.yaml"):
        LOADER.Params.model_validate({"path": str(tmp_path)})
    write_bundle(tmp_path, inference_config(), None)
    with pytest.raises(ValidationError, match=r"bundle weights not found: .*models/best\.pt \["):
        LOADER.Params.model_validate({"path": str(tmp_path), "weights": "models/best.pt"})
    with pytest.raises(ModelLoadError, match=r"inference\.json: no network definition 'net' \(set network_key\)"):
        load(path=str(tmp_path), network_key="net")


def test_weights_of_another_network_name_the_keys(tmp_path):
    unet_bundle(tmp_path)
    torch.save(build({**UNET_2D, "channels": [4, 16]}).state_dict(), tmp_path / "models" / "model.pt")
    with pytest.raises(ModelLoadError, match=r"model\.pt: checkpoint does not fit MONAI bundle network UNet.*shape"):
        load(path=str(tmp_path))


def test_config_code_is_refused_unless_trusted_and_unused_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    definition = {**UNET_2D, "channels": f"$open({str(marker)!r}, 'w').close() or [4, 8]"}
    torch.manual_seed(0)
    net = build(UNET_2D).eval()
    write_bundle(tmp_path, inference_config(definition, unused=f"$open({str(marker)!r}, 'w')"), net.state_dict())
    with pytest.raises(ModelLoadError, match=r"refused: the network definition runs code .*network_def::channels: "
                                             r"expression .*trust_config: true"):
        load(path=str(tmp_path))
    assert not marker.exists()
    loaded = load(path=str(tmp_path), trust_config=True)
    assert marker.exists()  # trusted: the expression ran, and built the same network
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-6)


@pytest.mark.parametrize("target", ["builtins.exec", "monai.apps.download_url", "$torch.nn.Identity"])
def test_targets_outside_the_network_classes_are_refused(tmp_path, target):
    unet_bundle(tmp_path)
    config = inference_config({**UNET_2D, "act": {"_target_": target}})
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"refused: .*network_def::act::_target_"):
        load(path=str(tmp_path))


def test_loading_never_touches_the_network(tmp_path, monkeypatch):
    unet_bundle(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert load(path=str(tmp_path)).num_classes == 3


@pytest.mark.slow
def test_tiny_segmentation_audit_through_the_spec(tmp_path):
    from medaudit.core.spec import load_spec
    from tests.helpers import run_audit

    definition = {**UNET_2D, "out_channels": 5}  # the phantom's five structures
    torch.manual_seed(0)
    write_bundle(tmp_path / "bundle", inference_config(definition), build(definition).state_dict())
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
audit: {{name: bundle, title: Tiny bundle audit}}
task: segmentation
model: {{loader: monai-bundle, params: {{path: bundle}}}}
data: {{dataset: phantom, params: {{n: 4, size: 32, seed: 0}}}}
threat_model: {{norm: linf, epsilons: [0, 1/255]}}
attacks: [{{name: fgsm}}]
acceptance:
  criteria:
    - {{id: AC-01, metric: clean_dice, op: ">=", threshold: 0.5}}
runtime: {{device: cpu, batch_size: 4, seed: 0, output_dir: {tmp_path / 'runs'}}}
validity: {{convergence_cases: 0, trace_cases: 0, noise_cases: 0}}
report: {{formats: [json]}}
""", encoding="utf-8")
    outcome = run_audit(load_spec(spec, HOST), HOST)
    fingerprints = json.loads((outcome.run_dir / "fingerprints.json").read_text())
    assert fingerprints["model_sha256"] == file_sha256(tmp_path / "bundle" / "models" / "model.pt")
    assert outcome.results["rows"] and outcome.exit_code in (0, 1)
