"""Built-in model loader ``timm``: any timm classifier, weights from local files only."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Params, Task, resolve_path
from medaudit.core.environment import require_torchvision
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import (
    CheckpointParams,
    PixelSpaceModel,
    load_weights,
    prepare_for_audit,
    state_dict_sha256,
    verify_file,
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


class TimmParams(NormalisedModelParams, CheckpointParams):
    pinned_fields: ClassVar[tuple[str, ...]] = ("checkpoint", "pretrained_file")

    arch: str = Field(description="timm architecture name, e.g. resnet18 (see timm.list_models()).")
    in_chans: int = Field(1, ge=1, le=64, description="Input channels of the network; grey images are replicated to match.")
    num_classes: int = Field(2, ge=2, description="Number of output classes.")
    checkpoint: Path | None = Field(
        None,
        description="State dict of this exact network (.pt/.pth via weights_only=True, or .safetensors); a whole "
        "pickled model only with trust_checkpoint.",
    )
    pretrained_file: Path | None = Field(
        None,
        description="timm pretrained weights from a local file (never downloaded); timm adapts the first "
        "convolution to in_chans and resets the classifier. Ignored when checkpoint is set.",
    )

    @field_validator("checkpoint", "pretrained_file", mode="before")
    @classmethod
    def _files(cls, value, info):
        return existing_file(value, info)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        torchvision_ready()
        import timm

        if not timm.is_model(value):
            raise no_such_name("timm", "architecture", value, timm.list_models())
        return value

    @model_validator(mode="after")
    def _channels(self) -> "TimmParams":
        for field in ("mean", "std"):
            if len(getattr(self, field)) not in (1, self.in_chans):
                raise ValueError(f"{field} needs 1 or in_chans={self.in_chans} values")
        return self


def build_timm(p: TimmParams) -> PixelSpaceModel:
    """Build the wrapped timm network (random init, or local pretrained weights)."""
    require_torchvision()
    import timm

    kwargs = dict(in_chans=p.in_chans, num_classes=p.num_classes)
    try:
        if p.pretrained_file is not None and p.checkpoint is None:
            net = timm.create_model(p.arch, pretrained=True, pretrained_cfg_overlay={"file": str(p.pretrained_file)}, **kwargs)
        else:
            net = timm.create_model(p.arch, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"timm could not build {p.arch!r}: {type(exc).__name__}: {exc}") from None
    return PixelSpaceModel(net, p.mean, p.std, p.in_chans)


class TimmLoader(ModelLoader):
    """A timm image classifier; normalisation inside the model; weights from local files only."""

    name = "timm"
    tasks = frozenset({Task.CLASSIFICATION})
    Params = TimmParams

    def load(self, task: Task) -> LoadedModel:
        p: TimmParams = self.params
        if p.checkpoint is None and p.pretrained_file is not None:
            fingerprint = verify_file(p.pretrained_file, p.sha256)  # before timm reads it
        model = build_timm(p)
        if p.checkpoint is not None:
            what = f"timm {p.arch} (in_chans={p.in_chans}, num_classes={p.num_classes})"
            fingerprint = load_weights(model.net, p.checkpoint, what, sha256=p.sha256, trust_checkpoint=p.trust_checkpoint)
        elif p.pretrained_file is None:
            fingerprint = state_dict_sha256(model)
        return LoadedModel(
            module=prepare_for_audit(model),
            task=task,
            num_classes=p.num_classes,
            in_channels=p.in_chans,
            access=frozenset(Access),
            fingerprint=fingerprint,
            description=f"timm {p.arch}, in_chans={p.in_chans}, {p.num_classes} classes",
            source={"checkpoint": str(p.checkpoint) if p.checkpoint else None},
        )


@hookimpl
def register_models(register):
    register(TimmLoader)
