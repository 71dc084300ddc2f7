"""Helpers shared by the model loaders: params of networks wrapped for pixel-space input,
params validators, and :func:`finish`, which wraps and freezes a built network."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from medaudit.core.components import Access, LoadedModel, Params, Task, resolve_path
from medaudit.core.environment import require_torchvision
from medaudit.core.lazy import torch
from medaudit.core.models import (
    CheckpointParams,
    load_weights,
    prepare_for_audit,
    state_dict_sha256,
)


def no_such_name(library: str, kind: str, value: str, known) -> ValueError:
    """The error a params validator raises for a name the library does not have."""
    import difflib

    close = difflib.get_close_matches(value, list(known), n=1)
    return ValueError(f"{library} has no {kind} {value!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


def torchvision_ready() -> None:
    """:func:`require_torchvision` as the ValueError a params validator reports."""
    try:
        require_torchvision()
    except Exception as exc:
        raise ValueError(str(exc)) from None


def existing_file(value, info) -> Path | None:
    if value is None:
        return None
    path = resolve_path(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


class NormalisedModelParams(Params):
    """Params shared by loaders that wrap a network in :class:`PixelSpaceModel`."""

    mean: list[float] = Field(
        default_factory=lambda: [0.0],
        description="Per-channel mean subtracted inside the model (pixel values are in [0, 1]).",
    )
    std: list[float] = Field(default_factory=lambda: [1.0], description="Per-channel std divided inside the model.")

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError("every std must be > 0")
        return value


class WrappedModelParams(NormalisedModelParams):
    """Params of a network wrapped for pixel-space input, optionally run patch-wise."""

    in_channels: int = Field(1, ge=1, le=64, description="Input channels of the network; grey images are replicated to match.")
    classes: int = Field(2, ge=1, description="Output classes (segmentation: classes of the label map, background included).")
    patch_size: list[int] | None = Field(
        None, description="Run the model patch-wise with this patch size (H W, or D H W) on larger inputs (sliding window)."
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="Sliding window: overlap of neighbouring patches.")

    @model_validator(mode="after")
    def _channels(self):
        for field in ("mean", "std"):
            if len(getattr(self, field)) not in (1, self.in_channels):
                raise ValueError(f"{field} needs 1 or in_channels={self.in_channels} values")
        return self


class ModuleParams(WrappedModelParams, CheckpointParams):
    """Params of loaders that build the network in Python and load a state dict into it."""

    checkpoint: Path | None = Field(
        None,
        description="State dict (.pt/.pth via weights_only=True, or .safetensors); a whole pickled model only with "
        "trust_checkpoint.",
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _file(cls, value, info):
        return existing_file(value, info)


def finish(net: torch.nn.Module, p: WrappedModelParams, task: Task, what: str, fingerprint: str | None = None) -> LoadedModel:
    """Load the checkpoint (if the params name one) into ``net``, wrap it for pixel-space
    input (and the sliding window), freeze it."""
    checkpoint = getattr(p, "checkpoint", None)
    if checkpoint is not None:
        fingerprint = load_weights(net, checkpoint, what, sha256=p.sha256, trust_checkpoint=p.trust_checkpoint)
    from medaudit.core.model_wrappers import PixelSpaceModel, SlidingWindow

    module: torch.nn.Module = PixelSpaceModel(net, p.mean, p.std, p.in_channels)
    if p.patch_size is not None:
        module = SlidingWindow(module, p.patch_size, p.overlap)
    return LoadedModel(
        module=prepare_for_audit(module),
        task=task,
        num_classes=p.classes,
        in_channels=p.in_channels,
        access=frozenset(Access),
        fingerprint=fingerprint or state_dict_sha256(net),
        description=what + (f", sliding window {p.patch_size}" if p.patch_size else ""),
        source={"checkpoint": str(checkpoint) if checkpoint else None},
    )
