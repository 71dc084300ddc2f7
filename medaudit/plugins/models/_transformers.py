"""The torch side of the ``huggingface`` loader: a transformers classifier as a plain module.
Apart from :mod:`.huggingface` because the class needs torch when it is defined, and
registering the loader (reading a spec) must not import it."""

from __future__ import annotations

import torch
from torch import nn


class _Logits(nn.Module):
    """A transformers classifier as a plain ``x -> logits`` module."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits
