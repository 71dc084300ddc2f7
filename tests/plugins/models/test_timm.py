"""Model loading: local checkpoints only, safe unpickling, clear mismatch errors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from medaudit.core.components import Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import PixelSpaceModel, file_sha256
from medaudit.plugins.models.timm import TimmLoader, TimmParams, build_timm


def params(**kw) -> TimmParams:
    return TimmParams.model_validate({"arch": "test_resnet", "in_chans": 1, "num_classes": 2, **kw})


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    net = build_timm(params()).net
    path = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    assert torch.allclose(loaded.module(x), net(x))
    again = TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    assert loaded.fingerprint == again.fingerprint and len(loaded.fingerprint) == 64
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    net = build_timm(params()).net
    path = tmp_path / "model.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    assert loaded.fingerprint


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_timm(params(num_classes=3)).net.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"does not fit .* shape mismatches: .*\(3,"):
        TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match=r"missing keys: .*unexpected keys: conv.weight"):
        TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)


def test_normalisation_and_channel_replication_live_in_the_model():
    class Probe(torch.nn.Module):
        def forward(self, x):
            return x

    model = PixelSpaceModel(Probe(), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], in_channels=3)
    out = model(torch.ones(1, 1, 2, 2))
    assert out.shape == (1, 3, 2, 2) and torch.allclose(out, torch.full_like(out, 2.0))


def test_unknown_architecture_is_a_validation_error():
    with pytest.raises(ValueError, match="timm has no architecture 'resnet1008'"):
        params(arch="resnet1008")


def test_broken_torchvision_gives_install_advice():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "from medaudit.core.environment import require_torchvision\n"
        "from medaudit.core.errors import EnvironmentProblem\n"
        "try:\n    require_torchvision()\nexcept EnvironmentProblem as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    minor = int(torch.__version__.split(".")[1])
    assert "torchvision cannot be imported" in out and f"pip install 'torchvision==0.{minor + 15}.*'" in out


def test_a_loader_that_fails_on_a_broken_torchvision_gets_the_same_advice_at_load_time(write_spec, host, monkeypatch):
    """The run no longer imports torchvision eagerly (only timm and smp models need it): a
    loader that fails on it is answered with the pip command that fixes the pair."""
    from medaudit.audits.runner import Runner
    from medaudit.core.errors import EnvironmentProblem
    from medaudit.core.spec import load_spec
    from medaudit.plugins.models.demo import DemoModel

    def broken(self, task):
        raise RuntimeError("operator torchvision::nms does not exist")

    spec = load_spec(write_spec(), host)
    monkeypatch.setattr(DemoModel, "load", broken)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what a mismatched pair gives on import
    with pytest.raises(EnvironmentProblem, match="torchvision cannot be imported.*pip install 'torchvision=="):
        Runner(spec, host, show_progress=False).load()


@pytest.mark.parametrize("torch_version,command", [
    ("2.4.1", "pip install 'torchvision==0.19.*'"), ("2.11.0+cu130", "pip install 'torchvision==0.26.*'"),
    ("2.14.1", "pip install 'torchvision==0.29.*'"), (None, "pip install 'torch>=2.4' 'torchvision>=0.19'"),
])
def test_install_advice_names_the_torchvision_of_this_torch(torch_version, command):
    from medaudit.core.environment import matching_torchvision

    assert matching_torchvision(torch_version) == command


# -- checkpoint safety: sha256 pins and pickled code ------------------------------------


class CreatesMarker:
    """Unpickling this runs ``open(marker, "w")``: the file's existence shows code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "code-ran"
    torch.save({"state_dict": CreatesMarker(marker)}, path)
    return path, marker


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match=r"refused: the checkpoint holds pickled Python objects.*io.open.*arbitrary code.*trust_checkpoint: true") as info:
        TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_wrong_pin_is_refused_before_the_file_is_parsed(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    actual = file_sha256(path)
    wrong = "0" * 63 + "1"
    # trusted, so only the pin stands between the file and its code running
    with pytest.raises(ModelLoadError) as info:
        TimmLoader(params(checkpoint=path, sha256=wrong, trust_checkpoint=True)).load(Task.CLASSIFICATION)
    message = str(info.value)
    assert str(path) in message and f"sha256 is {actual}" in message and f"pins {wrong}" in message
    assert not marker.exists()


def test_correct_pin_loads_and_is_the_fingerprint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_timm(params()).net.state_dict(), path)
    pin = file_sha256(path)
    loaded = TimmLoader(params(checkpoint=path, sha256=pin.upper())).load(Task.CLASSIFICATION)
    assert loaded.fingerprint == pin
    pretrained = TimmLoader(params(pretrained_file=path, sha256=pin)).load(Task.CLASSIFICATION)
    assert pretrained.fingerprint == pin
    with pytest.raises(ModelLoadError, match="but the spec pins"):  # checked before timm reads it
        TimmLoader(params(pretrained_file=path, sha256="a" * 64)).load(Task.CLASSIFICATION)


def test_pin_needs_a_file_and_hex_digits():
    with pytest.raises(ValueError, match="sha256 pins the model file: set checkpoint or pretrained_file"):
        params(sha256="a" * 64)
    with pytest.raises(ValueError, match="sha256"):
        params(checkpoint=__file__, sha256="not-a-hash")


def test_whole_pickled_model_needs_trust_and_warns(tmp_path, caplog):
    torch.manual_seed(0)
    net = build_timm(params()).net.eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(ModelLoadError, match=r"timm.models.resnet.ResNet.*arbitrary code.*trust_checkpoint: true"):
        TimmLoader(params(checkpoint=path)).load(Task.CLASSIFICATION)
    with caplog.at_level("WARNING", logger="medaudit.core.models"):
        loaded = TimmLoader(params(checkpoint=path, trust_checkpoint=True)).load(Task.CLASSIFICATION)
    assert "weights_only=False because trust_checkpoint is set" in caplog.text
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(loaded.module(x), net(x))
    caplog.clear()
    state = tmp_path / "state.pt"  # a plain state dict is read safely even when trusted: no warning
    torch.save(net.state_dict(), state)
    TimmLoader(params(checkpoint=state, trust_checkpoint=True)).load(Task.CLASSIFICATION)
    assert "weights_only=False" not in caplog.text


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_factory_and_torchscript_loaders_take_pins(tmp_path):
    from medaudit.plugins.models.local import FactoryLoader, FactoryParams, TorchScriptLoader, TorchScriptParams

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    factory = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 16, "out_features": 2}}
    with pytest.raises(ModelLoadError, match="but the spec pins"):
        FactoryLoader(FactoryParams.model_validate({**factory, "checkpoint": state, "sha256": "b" * 64})).load(Task.CLASSIFICATION)
    with pytest.raises(ModelLoadError, match=r"missing keys: weight, bias; unexpected keys: 1.weight, 1.bias"):
        FactoryLoader(FactoryParams.model_validate({**factory, "checkpoint": state, "sha256": file_sha256(state)})).load(Task.CLASSIFICATION)

    scripted = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(scripted))
    with pytest.raises(ModelLoadError, match="but the spec pins"):
        TorchScriptLoader(TorchScriptParams(path=scripted, sha256="c" * 64)).load(Task.CLASSIFICATION)
    loaded = TorchScriptLoader(TorchScriptParams(path=scripted, sha256=file_sha256(scripted))).load(Task.CLASSIFICATION)
    assert loaded.fingerprint == file_sha256(scripted)
    assert "trust_checkpoint" not in TorchScriptParams.model_fields  # nothing is unpickled there
