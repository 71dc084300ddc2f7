"""Models: factory, torchscript.

Networks from your own files: ``factory`` builds your torch module by calling an importable
function and loads a local state dict into it; ``torchscript`` loads an archive that holds
architecture and weights. Both put normalisation inside the model and can run dense models
patch-wise over large inputs; 3D models come through either (e.g. MONAI's
``monai.networks.nets:UNet`` with ``spatial_dims: 3``).
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import LoadedModel, ModelLoader, Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.lazy import torch
from medaudit.core.models import PinnedFileParams, read_model_file
from medaudit.plugins.models._common import ModuleParams, WrappedModelParams, existing_file, finish


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
    register(FactoryLoader)
    register(TorchScriptLoader)
