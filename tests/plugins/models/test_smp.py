"""Segmentation model loaders (smp, factory, TorchScript) and sliding-window inference."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import SlidingWindow

TINY_SMP = dict(arch="Unet", encoder="tu-test_resnet", encoder_depth=3, decoder_channels=[16, 8, 8], in_channels=1, classes=3)


def load(host, name: str, params: dict, tmp_path, task=Task.SEGMENTATION):
    cls = host.get("model", name)
    return cls(cls.Params.model_validate(params, context={"base_dir": tmp_path})).load(task)


def test_smp_checkpoint_round_trip(host, tmp_path):
    first = load(host, "smp", TINY_SMP, tmp_path)
    torch.save(first.module.net.state_dict(), tmp_path / "unet.pt")
    again = load(host, "smp", {**TINY_SMP, "checkpoint": "unet.pt"}, tmp_path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(first.module(x), again.module(x))
    assert again.module(x).shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for p in again.module.parameters())
    assert again.num_classes == 3 and len(again.fingerprint) == 64


def test_smp_checkpoint_of_another_network_names_the_keys(host, tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="missing keys: .*unexpected keys: conv.weight"):
        load(host, "smp", {**TINY_SMP, "checkpoint": "other.pt"}, tmp_path)


def test_unknown_smp_architecture_suggests_one(host):
    with pytest.raises(Exception, match="did you mean 'Unet'"):
        host.get("model", "smp").Params.model_validate({"arch": "Unett"})


def test_factory_builds_a_3d_monai_unet(host, tmp_path):
    params = {
        "factory": "monai.networks.nets:UNet",
        "classes": 2,
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0},
    }
    model = load(host, "factory", params, tmp_path)
    assert model.module(torch.rand(1, 1, 8, 16, 16)).shape == (1, 2, 8, 16, 16)


@pytest.mark.parametrize(
    "factory, message",
    [("no_such_package.mod:f", "cannot import"), ("torch.nn:NoSuchThing", "has no attribute"), ("torch.nn", "package.module:function")],
)
def test_factory_errors_are_clear(host, factory, message):
    with pytest.raises(Exception, match=message):
        host.get("model", "factory").Params.model_validate({"factory": factory})


def test_torchscript_loader(host, tmp_path):
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.ts"))
    model = load(host, "torchscript", {"path": "net.ts", "classes": 3}, tmp_path)
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.module(x), net(x))
    (tmp_path / "bad.ts").write_bytes(b"not an archive")
    with pytest.raises(ModelLoadError, match="not a TorchScript archive"):
        load(host, "torchscript", {"path": "bad.ts"}, tmp_path)


def test_sliding_window_matches_a_convolution_and_stays_differentiable():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 1)  # pointwise: patches see the same values as the whole volume
    window = SlidingWindow(net, (8, 8, 8), overlap=0.5)
    x = torch.rand(1, 1, 12, 20, 20, requires_grad=True)
    out = window(x)
    assert out.shape == (1, 2, 12, 20, 20)
    # The blending weights are normalised, so overlapping patches reproduce the whole.
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert bool((grad != 0).all())  # every voxel of the whole volume reaches the loss
