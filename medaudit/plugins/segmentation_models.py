"""Built-in model loaders beyond timm: ``smp`` (segmentation-models-pytorch), ``factory``
(your own torch module built by an importable function) and ``torchscript``.

All three put normalisation inside the model (:class:`PixelSpaceModel`), load weights from
local files only, and can run dense models patch-wise over large inputs
(:class:`SlidingWindow`, differentiable, so attacks see the whole volume). 3D models come
through ``factory`` (e.g. MONAI's ``monai.networks.nets:UNet`` with ``spatial_dims: 3``) or
``torchscript``.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Task
from medaudit.core.environment import require_torchvision
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import (
    CheckpointParams,
    PinnedFileParams,
    PixelSpaceModel,
    SlidingWindow,
    load_weights,
    prepare_for_audit,
    read_model_file,
    state_dict_sha256,
)
from medaudit.plugins.timm_models import NormalisedModelParams, existing_file, no_such_name, torchvision_ready


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


# -- factory --------------------------------------------------------------------------


class FactoryParams(ModuleParams):
    factory: str = Field(description="Importable function or class that builds the network: 'package.module:name'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the factory.")

    @field_validator("factory")
    @classmethod
    def _importable(cls, value: str) -> str:
        module, _, attr = value.partition(":")
        if not module or not attr:
            raise ValueError("factory must look like 'package.module:function'")
        try:
            target = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import {module!r}: {exc}") from None
        except AttributeError:
            raise ValueError(f"module {module!r} has no attribute {attr!r}") from None
        if not callable(target):
            raise ValueError(f"{value} is not callable")
        return value


class FactoryLoader(ModelLoader):
    """Your own torch module, built by calling ``factory(**kwargs)``; weights from a local state dict.

    This imports and runs the factory's code, with your permissions: name only code you
    trust. 2D or 3D, classification or segmentation (set ``classes``).
    """

    name = "factory"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = FactoryParams

    def load(self, task: Task) -> LoadedModel:
        p: FactoryParams = self.params
        module, _, attr = p.factory.partition(":")
        try:
            net = getattr(importlib.import_module(module), attr)(**p.kwargs)
        except Exception as exc:
            raise ModelLoadError(f"{p.factory}(**kwargs) failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(net, torch.nn.Module):
            raise ModelLoadError(f"{p.factory} returned {type(net).__name__}, not a torch.nn.Module")
        return finish(net, p, task, f"{p.factory} (in_channels={p.in_channels}, classes={p.classes})")


# -- TorchScript ----------------------------------------------------------------------


class TorchScriptParams(WrappedModelParams, PinnedFileParams):
    pinned_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: Path = Field(description="A TorchScript archive (torch.jit.save) taking normalised input.")

    @field_validator("path", mode="before")
    @classmethod
    def _file(cls, value, info):
        return existing_file(value, info)


class TorchScriptLoader(ModelLoader):
    """A TorchScript archive: architecture and weights in one file, no Python code of yours runs."""

    name = "torchscript"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = TorchScriptParams

    def load(self, task: Task) -> LoadedModel:
        p: TorchScriptParams = self.params
        data, digest = read_model_file(p.path, p.sha256)
        try:
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{p.path}: not a TorchScript archive ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        what = f"TorchScript {p.path.name} (in_channels={p.in_channels}, classes={p.classes})"
        return finish(net, p, task, what, fingerprint=digest)


@hookimpl
def register_models(register):
    register(SmpLoader)
    register(FactoryLoader)
    register(TorchScriptLoader)
