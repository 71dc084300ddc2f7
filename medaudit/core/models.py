"""Shared helpers for model loaders: pixel-space adapter, safe weight loading, fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medaudit.core.errors import ModelLoadError


class PixelSpaceModel(nn.Module):
    """Maps pixel-space input in [0, 1] to logits: channel replication and normalisation
    happen here, inside the differentiable graph, never in the data loader. Works on
    images (``N x C x H x W``) and volumes (``N x C x D x H x W``)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], in_channels: int):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels > 1:
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.net((x - self.mean.view(shape)) / self.std.view(shape))


class SlidingWindow(nn.Module):
    """Runs a dense model patch-wise over inputs larger than its patch size and blends the
    patches' logits (MONAI's sliding-window inference, Gaussian weights). It is plain torch
    on the forward pass, so attacks differentiate through it to the whole input."""

    def __init__(self, inner: nn.Module, patch_size: Sequence[int], overlap: float = 0.25, batch_size: int = 4):
        super().__init__()
        self.inner = inner
        self.patch_size = tuple(patch_size)
        self.overlap = overlap
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        if len(self.patch_size) != x.dim() - 2:
            raise ValueError(f"patch size {self.patch_size} does not match input of shape {tuple(x.shape)}")
        if all(s <= p for s, p in zip(x.shape[2:], self.patch_size)):
            return self.inner(x)
        return sliding_window_inference(
            x, self.patch_size, self.batch_size, self.inner, overlap=self.overlap, mode="gaussian"
        )


class SpeedWrapper(nn.Module):
    """Runs a pixel-space model under autocast and/or channels-last; returns fp32 logits so
    attack losses are computed in full precision. Converts ``inner`` to channels-last in place."""

    def __init__(self, inner: nn.Module, autocast: torch.dtype | None, channels_last: bool):
        super().__init__()
        self.inner = inner.to(memory_format=torch.channels_last) if channels_last else inner
        self.autocast = autocast
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.inner(x).float()
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return self.inner(x).float()


def prepare_for_audit(module: nn.Module) -> nn.Module:
    """Eval mode and frozen parameters: attacks differentiate w.r.t. the input only."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Fingerprint of weights built in memory (no file): names, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code (``weights_only=True`` or safetensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot be read as a state dict with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: does not hold a state dict of tensors")
    return state


def load_weights(net: nn.Module, path: Path, what: str) -> None:
    """Load a checkpoint strictly; a mismatch names the missing and unexpected keys."""
    state = read_state_dict(path)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            if not keys:
                return "none"
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ModelLoadError(
            f"{path}: checkpoint does not fit {what}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}" + (f"; shape mismatches: {show(mismatched)}" if mismatched else "")
        )
    net.load_state_dict(state, strict=True)
