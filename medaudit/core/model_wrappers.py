"""The ``nn.Module`` wrappers that model loaders and the runner put around a network: the
pixel-space adapter, sliding-window inference, autocast/channels-last, a call counter. Apart
from :mod:`medaudit.core.models` because a class needs torch when it is defined, and reading a
spec must not import torch; ``medaudit.core.models`` still hands them out under their old names."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

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


class CallCounter(nn.Module):
    """Counts the samples sent through a model: what a query-based attack spends (benchmarks
    and tests of query efficiency)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.samples = inner, 0

    def forward(self, x):
        self.samples += len(x)
        return self.inner(x)
