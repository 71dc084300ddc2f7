"""Model loading: local checkpoints only, safe unpickling, clear mismatch errors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from medaudit.core.components import Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import PixelSpaceModel
from medaudit.plugins.timm_models import TimmLoader, TimmParams, build_timm


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
    assert "torchvision cannot be imported" in out and "pip install 'torch>=2.14,<2.15' 'torchvision>=0.29,<0.30'" in out
