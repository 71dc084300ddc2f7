"""The params of NLCE (:mod:`._nlce`), apart from its modules: a spec that names the ``nlce``
defense is read and checked without importing torch, which the modules need when defined."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from medaudit.core.components import Params
from medaudit.core.lazy import torch

Attention = Literal["scaled_residual", "residual", "multiply"]


class NLCEParams(Params):
    """NLCE insertion and fine-tune hyper-parameters (see :mod:`medaudit.plugins.defenses._nlce`)."""

    levels: list[int] | None = Field(
        None, description="Encoder feature levels that get an NLCE module (1 = stride 2, -1 = deepest); unset: level 2 and deeper."
    )
    codewords: int = Field(32, ge=1, le=1024, description="Codewords K of the context encoding (EncNet's default; the paper's is unknown).")
    reduction: int = Field(2, ge=1, le=64, description="Non-local bottleneck: C / reduction channels for theta, phi and g.")
    encoding_channels: int = Field(512, ge=1, le=4096, description="Width of the codewords: features are projected to min(C, this) first.")
    subsample: int = Field(1, ge=1, le=8, description="Max-pool stride on the non-local keys and values (1 = full attention).")
    attention: Attention = Field(
        "scaled_residual", description="Channel attention: X + l*X*g (l learned, 0 at init), X + X*g, or X*g."
    )
    steps: int = Field(200, ge=1, le=100_000, description="Fine-tune optimiser steps.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the fine-tune.")
    batch_size: int = Field(8, ge=1, le=1024, description="Cases per fine-tune step (drawn with replacement).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay.")
    flip: bool = Field(True, description="Random left-right flips during the fine-tune.")
    train_base: bool = Field(False, description="Also fine-tune the audited network's own weights (default: only NLCE trains).")
    seed: int = Field(0, ge=0, description="Seed of the NLCE initialisation and of the fine-tune's batches.")

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one level, or leave it unset")
            if 0 in value:
                raise ValueError("level 0 is the input image, not a feature level")
            if len(set(value)) != len(value):
                raise ValueError("levels repeat")
        return value

    def insert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`insert_nlce`."""
        return self.model_dump(include={"levels", "codewords", "reduction", "encoding_channels", "subsample", "attention", "seed"})

    def fine_tune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fine_tune`, with a generator seeded from ``seed``."""
        kwargs = self.model_dump(include={"steps", "lr", "batch_size", "weight_decay", "flip", "train_base"})
        return dict(kwargs, generator=torch.Generator().manual_seed(self.seed))
