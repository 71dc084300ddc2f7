"""Models: timm.

Any timm classifier, weights from local files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Task
from medaudit.core.environment import require_torchvision
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import (
    CheckpointParams,
    load_weights,
    prepare_for_audit,
    state_dict_sha256,
    verify_file,
)
from medaudit.plugins.models._common import NormalisedModelParams, existing_file, no_such_name, torchvision_ready

if TYPE_CHECKING:
    from medaudit.core.model_wrappers import PixelSpaceModel


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
    from medaudit.core.model_wrappers import PixelSpaceModel

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
