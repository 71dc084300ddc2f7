"""Models: smp.

A segmentation-models-pytorch network (any architecture and encoder), normalisation inside
the model, weights from local files only, optionally run patch-wise
(:class:`~medaudit.core.model_wrappers.SlidingWindow`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import LoadedModel, ModelLoader, Task
from medaudit.core.environment import require_torchvision
from medaudit.core.errors import ModelLoadError
from medaudit.core.lazy import torch
from medaudit.plugins.models._common import ModuleParams, finish, no_such_name, torchvision_ready


# -- smp ------------------------------------------------------------------------------


class SmpParams(ModuleParams):
    arch: str = Field("Unet", description="smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Linknet, PSPNet, MAnet, PAN, UPerNet, Segformer...")
    encoder: str = Field("resnet34", description="smp encoder name (e.g. resnet34, efficientnet-b0, or tu-<timm name>).")
    encoder_depth: int = Field(5, ge=3, le=5, description="Encoder stages.")
    decoder_channels: list[int] | None = Field(None, description="Decoder widths (Unet-style architectures), one per stage.")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        torchvision_ready()
        import segmentation_models_pytorch as smp

        names = [n for n in dir(smp) if isinstance(getattr(smp, n), type) and issubclass(getattr(smp, n), torch.nn.Module)]
        if value not in names:
            raise no_such_name("segmentation-models-pytorch", "architecture", value, names)
        return value


def build_smp(p: SmpParams) -> torch.nn.Module:
    """The bare smp network, randomly initialised (``encoder_weights=None``: nothing is downloaded)."""
    require_torchvision()
    import segmentation_models_pytorch as smp

    kwargs: dict[str, Any] = dict(
        encoder_name=p.encoder, encoder_weights=None, in_channels=p.in_channels, classes=p.classes, encoder_depth=p.encoder_depth
    )
    if p.decoder_channels is not None:
        kwargs["decoder_channels"] = p.decoder_channels
    try:
        return getattr(smp, p.arch)(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"smp could not build {p.arch} with encoder {p.encoder!r}: {type(exc).__name__}: {exc}") from None


class SmpLoader(ModelLoader):
    """A segmentation-models-pytorch network (any architecture and encoder); local checkpoint only."""

    name = "smp"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2})
    Params = SmpParams

    def load(self, task: Task) -> LoadedModel:
        p: SmpParams = self.params
        what = f"smp {p.arch}/{p.encoder} (in_channels={p.in_channels}, classes={p.classes})"
        return finish(build_smp(p), p, task, what)


@hookimpl
def register_models(register):
    register(SmpLoader)
