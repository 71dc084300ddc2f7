"""Models: monai-bundle.

The network of a local MONAI bundle (a folder with ``configs/inference.json`` or ``.yaml``
and ``models/model.pt`` or ``models/model.ts``), 2D or 3D, classification or segmentation.
Nothing is downloaded.

The network is built from the config's network definition (``network_key``, by default
``network_def``) with ``monai.bundle.ConfigParser`` and the state dict in ``weights`` is
loaded into it strictly (a checkpoint that wraps the state dict, e.g. ``{"model": ...}``,
is unwrapped; no pickled code runs unless ``trust_checkpoint``). A TorchScript ``model.ts``
holds the network itself: the config is then only read for the channel counts.

A bundle config is code: ``$`` expressions are evaluated and ``_target_`` names any
callable. Unless ``trust_config`` is set, the network definition (and everything it
refers to) may only name network classes of ``monai.networks`` and ``torch.nn``, with
plain values: anything else is refused before it runs.

What is *not* applied: the bundle's pre- and postprocessing (loading, resampling,
intensity scaling, activations, argmax). The audit feeds the data set's pixels in [0, 1];
``mean``/``std`` map them to what the network expects, ``(x - mean) / std`` (a bundle that
scales intensities to [b_min, b_max] wants mean = -b_min / (b_max - b_min) and
std = 1 / (b_max - b_min); one that scales to [0, 1] wants the defaults). The module gives
the network's raw logits (N x C x H x W or N x C x D x H x W for segmentation, N x C for
classification). The bundle's sliding-window inferer, when it has one, is kept: its
``roi_size`` and ``overlap`` become the loader's patch size and overlap.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Task, resolve_path
from medaudit.core.errors import ModelLoadError
from medaudit.core.lazy import nn, torch
from medaudit.core.models import (
    CheckpointParams,
    load_weights,
    prepare_for_audit,
    read_model_file,
)
from medaudit.plugins.models._common import NormalisedModelParams

log = logging.getLogger(__name__)

#: Where a bundle keeps its inference config, in order of preference.
CONFIG_FILES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
#: The TorchScript a bundle may ship instead of (or next to) its state dict.
TORCHSCRIPT_FILE = "models/model.ts"
#: Packages whose classes an untrusted network definition may name.
TRUSTED_PREFIXES = ("monai.networks.", "torch.nn.")
#: Config keys that name the output channels of MONAI's networks.
CLASSES_KEYS = ("out_channels", "num_classes", "classes")
#: MONAI's intensity transforms: the ones whose absence changes what the network sees.
INTENSITY_TRANSFORMS = ("ScaleIntensity", "NormalizeIntensity", "ScaleIntensityRange", "ScaleIntensityRangePercentiles")


class MonaiBundleParams(NormalisedModelParams, CheckpointParams):
    pinned_fields: ClassVar[tuple[str, ...]] = ("weights",)

    path: Path = Field(description="The bundle's folder (configs/inference.json or .yaml, models/model.pt or .ts).")
    config: Path | None = Field(
        None, description="Inference config inside the bundle; default: configs/inference.json, .yaml or .yml."
    )
    network_key: str = Field("network_def", min_length=1, description="The config key of the network definition.")
    weights: Path = Field(
        Path("models/model.pt"),
        description="Weights inside the bundle: a state dict (.pt/.pth, .safetensors) or a TorchScript (.ts). When "
        "left out and models/model.pt is absent, models/model.ts is used.",
    )
    in_channels: int | None = Field(
        None, ge=1, le=64,
        description="Input channels; default: the network definition's in_channels. Grey images are replicated.",
    )
    classes: int | None = Field(
        None, ge=1,
        description="Output channels (classes, background included); default: the network definition's out_channels.",
    )
    sliding_window: bool = Field(
        True,
        description="Run patch-wise as the bundle's SlidingWindowInferer does (its roi_size, overlap), if any.",
    )
    patch_size: list[int] | None = Field(
        None,
        description="Run the model patch-wise with this patch size (H W, or D H W); default: the inferer's roi_size.",
    )
    overlap: float | None = Field(
        None, ge=0, lt=1, description="Sliding window overlap; default: the bundle inferer's, else 0.25."
    )
    trust_config: bool = Field(
        False,
        description="Allow a network definition that runs code other than MONAI's and torch's network classes "
        "($ expressions, other _target_s). Only for bundles from a source you trust.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _folder(cls, value, info):
        path = resolve_path(value, info)
        if not path.is_dir():
            raise ValueError(f"bundle folder not found: {path}")
        return path

    @model_validator(mode="after")
    def _files_present(self) -> "MonaiBundleParams":
        for field in ("mean", "std"):
            if self.in_channels is not None and len(getattr(self, field)) not in (1, self.in_channels):
                raise ValueError(f"{field} needs 1 or in_channels={self.in_channels} values")
        try:
            weights = self.weights_file()
            if weights.suffix != ".ts":
                self.config_file()
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from None
        return self

    def config_file(self) -> Path:
        if self.config is not None:
            candidates = [self.path / self.config]
        else:
            candidates = [self.path / name for name in CONFIG_FILES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ModelLoadError(f"bundle config not found: {' or '.join(str(c) for c in candidates)}")
        return found

    def weights_file(self) -> Path:
        path = self.path / self.weights
        if path.is_file():
            return path
        if "weights" not in self.model_fields_set and (self.path / TORCHSCRIPT_FILE).is_file():
            return self.path / TORCHSCRIPT_FILE
        also = "" if "weights" in self.model_fields_set else f" (nor {self.path / TORCHSCRIPT_FILE})"
        raise ModelLoadError(f"bundle weights not found: {path}{also}")


# -- reading the config without running it ---------------------------------------------------


def read_bundle_config(path: Path, bundle: Path):
    """The parser of a bundle config, macros and relative references resolved; nothing evaluated."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(path))
        parser["bundle_root"] = str(bundle)
        parser.resolve_macro_and_relative_ids()
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot be read as a MONAI bundle config ({type(exc).__name__}: {exc})") from None
    return parser


def raw(parser, key: str, default: Any = None) -> Any:
    try:
        return parser[key]
    except (KeyError, IndexError, TypeError, ValueError):
        return default


def literal(parser, value: Any, depth: int = 0) -> Any:
    """``value`` with ``@`` references followed, when it is plain data; None when it is (or
    refers to) an expression or a component."""
    if isinstance(value, str) and value.startswith("@") and depth < 16:
        return literal(parser, raw(parser, value[1:]), depth + 1)
    if isinstance(value, str) and value.startswith(("$", "@", "%")):
        return None
    if isinstance(value, (list, tuple)):
        items = [literal(parser, v, depth + 1) for v in value]
        return None if any(i is None for i in items) else items
    if isinstance(value, dict):
        return None
    return value


def allowed_target(target: Any) -> bool:
    """A class of ``monai.networks`` or ``torch.nn``, by its short name (as MONAI looks it up) or dotted path."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return False
    if "." in target:
        return target.startswith(TRUSTED_PREFIXES)
    from monai.bundle.config_item import ComponentLocator

    modules = ComponentLocator().get_component_module_name(target)
    modules = [modules] if isinstance(modules, str) else list(modules or [])
    return bool(modules) and all(m.startswith(TRUSTED_PREFIXES) for m in modules)


def code_in(parser, key: str) -> list[str]:
    """What in the definition at ``key``, references followed, would run code other than a
    network class's constructor: expressions, other targets, ``_requires_``, debug modes."""
    found: list[str] = []
    seen = {key}

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "_target_" and not allowed_target(value):
                    found.append(f"{where}::_target_ {value!r}")
                elif name == "_requires_":
                    found.append(f"{where}::_requires_")
                elif name == "_mode_" and value != "default":
                    found.append(f"{where}::_mode_ {value!r}")
                elif name != "_target_":
                    visit(value, f"{where}::{name}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                visit(value, f"{where}::{i}")
        elif isinstance(node, str) and node.startswith("$"):
            found.append(f"{where}: expression {node!r}")
        elif isinstance(node, str) and node.startswith("@"):
            ref = node[1:]
            if ref not in seen:
                seen.add(ref)
                visit(raw(parser, ref), ref)

    visit(raw(parser, key), key)
    return found


def targets_under(node: Any) -> list[str]:
    """The short ``_target_`` names in a raw config subtree, in order (Compose left out)."""
    names = [str(c["_target_"]).rsplit(".", 1)[-1] for c in components_under(node)]
    return [n for n in names if n != "Compose"]


def not_applied(parser) -> str:
    """The bundle's pre- and postprocessing the audit does not apply, in words, with advice
    on its intensity scaling."""
    found = {key: targets_under(raw(parser, key)) for key in ("preprocessing", "postprocessing")}
    parts = [f"{key} {', '.join(names)}" for key, names in found.items() if names]
    if not parts:
        return ""
    return "bundle " + "; ".join(parts) + " not applied" + "".join(f"; {a}" for a in intensity_advice(parser))


def intensity_advice(parser) -> list[str]:
    """What to do about the intensity transforms of the bundle's preprocessing."""
    advice = []
    for node in components_under(raw(parser, "preprocessing")):
        name = str(node["_target_"]).rsplit(".", 1)[-1].removesuffix("d")
        if name == "ScaleIntensityRange":
            a_min, a_max = literal(parser, node.get("a_min")), literal(parser, node.get("a_max"))
            b_min, b_max = literal(parser, node.get("b_min", 0.0)), literal(parser, node.get("b_max", 1.0))
            window = f"[{a_min}, {a_max}]" if a_min is not None and a_max is not None else "its intensity window"
            if isinstance(b_min, (int, float)) and isinstance(b_max, (int, float)) and b_max != b_min:
                if (b_min, b_max) == (0, 1):
                    advice.append(f"it maps {window} to [0, 1]: give the data set that window")
                else:
                    mean, std = -b_min / (b_max - b_min), 1 / (b_max - b_min)
                    advice.append(f"it maps {window} to [{b_min}, {b_max}]: give the data set that window and set "
                                  f"mean: [{mean:.6g}], std: [{std:.6g}]")
        elif name in INTENSITY_TRANSFORMS:
            advice.append(f"its {name} depends on each image: set mean/std to approximate it on pixels in [0, 1]")
    return advice


def components_under(node: Any) -> list[dict]:
    """The dicts with a ``_target_`` in a raw config subtree, in order."""
    if isinstance(node, dict):
        own = [node] if isinstance(node.get("_target_"), str) else []
        return own + [c for v in node.values() for c in components_under(v)]
    if isinstance(node, (list, tuple)):
        return [c for v in node for c in components_under(v)]
    return []


def inferer_window(parser) -> tuple[list[int] | None, float | None]:
    """roi_size and overlap of the bundle's SlidingWindowInferer, when they are plain values."""
    inferer = raw(parser, "inferer")
    if isinstance(inferer, str) and inferer.startswith("@"):
        inferer = raw(parser, inferer[1:])
    if not isinstance(inferer, dict) or not str(inferer.get("_target_", "")).endswith("SlidingWindowInferer"):
        return None, None
    roi = literal(parser, inferer.get("roi_size"))
    overlap = literal(parser, inferer.get("overlap"))
    roi = [int(r) for r in roi] if isinstance(roi, list) and all(isinstance(r, int) for r in roi) else None
    return roi, float(overlap) if isinstance(overlap, (int, float)) and not isinstance(overlap, bool) else None


def first_layer_channels(net: nn.Module) -> int | None:
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


# -- the loader -------------------------------------------------------------------------------


class MonaiBundleLoader(ModelLoader):
    """The network of a local MONAI bundle (state dict or TorchScript), 2D or 3D, without its pre/postprocessing."""

    name = "monai-bundle"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = MonaiBundleParams

    def load(self, task: Task) -> LoadedModel:
        p: MonaiBundleParams = self.params
        weights = p.weights_file()
        needs_config = weights.suffix != ".ts" or p.config is not None or _any_config(p)
        config = p.config_file() if needs_config else None
        parser = read_bundle_config(config, p.path) if config is not None else None
        if weights.suffix == ".ts":
            net, fingerprint, network = self._torchscript(p, weights)
        else:
            if raw(parser, p.network_key) is None:
                raise ModelLoadError(f"{config}: no network definition {p.network_key!r} (set network_key)")
            net, network = self._build(p, parser, config)
            what = f"MONAI bundle network {network}"
            fingerprint = load_weights(net, weights, what, sha256=p.sha256, trust_checkpoint=p.trust_checkpoint)
        in_channels = p.in_channels or _config_int(parser, p.network_key, ("in_channels",)) or first_layer_channels(net)
        classes = p.classes or _config_int(parser, p.network_key, CLASSES_KEYS)
        if in_channels is None or classes is None:
            missing = " and ".join(n for n, v in (("in_channels", in_channels), ("classes", classes)) if v is None)
            raise ModelLoadError(
                f"{p.path}: the bundle config does not state the network's {missing}: set {missing} in the params"
            )
        if len(p.mean) not in (1, in_channels) or len(p.std) not in (1, in_channels):
            raise ModelLoadError(f"mean and std need 1 or in_channels={in_channels} values")
        patch_size, overlap = list(p.patch_size or []), p.overlap
        if parser is not None and p.sliding_window and not patch_size:
            roi, bundle_overlap = inferer_window(parser)
            patch_size, overlap = roi or [], overlap if overlap is not None else bundle_overlap
        from medaudit.core.model_wrappers import PixelSpaceModel, SlidingWindow

        module: nn.Module = PixelSpaceModel(net, p.mean, p.std, in_channels)
        if patch_size:
            module = SlidingWindow(module, patch_size, overlap if overlap is not None else 0.25)
        skipped = not_applied(parser) if parser is not None else ""
        if skipped:
            log.warning("%s: %s", p.path, skipped)
        description = f"MONAI bundle {_bundle_name(p.path)}: {network} (in_channels={in_channels}, classes={classes})"
        description += f", sliding window {patch_size}" if patch_size else ""
        description += f"; {skipped}" if skipped else ""
        return LoadedModel(
            module=prepare_for_audit(module),
            task=task,
            num_classes=classes,
            in_channels=in_channels,
            access=frozenset(Access),
            fingerprint=fingerprint,
            description=description,
            source={"checkpoint": str(weights), "config": str(config) if config else None},
        )

    @staticmethod
    def _build(p: MonaiBundleParams, parser, config: Path) -> tuple[nn.Module, str]:
        if not p.trust_config:
            code = code_in(parser, p.network_key)
            if code:
                raise ModelLoadError(
                    f"{config}: refused: the network definition runs code other than MONAI's or torch's network "
                    "classes "
                    f"({'; '.join(code[:3])}{'...' if len(code) > 3 else ''}); if you trust the bundle's source, set "
                    "trust_config: true in the model's params"
                )
        else:
            log.warning("%s: trust_config is set: building the network runs whatever code the config names", config)
        try:
            net = parser.get_parsed_content(p.network_key, instantiate=True)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ModelLoadError(
                f"{config}: cannot build {p.network_key!r}: {type(exc).__name__}: {text[0] if text else ''}"
            ) from None
        if not isinstance(net, nn.Module):
            raise ModelLoadError(f"{config}: {p.network_key!r} builds a {type(net).__name__}, not a torch.nn.Module")
        return net, type(net).__name__

    @staticmethod
    def _torchscript(p: MonaiBundleParams, path: Path) -> tuple[nn.Module, str, str]:
        data, digest = read_model_file(path, p.sha256)
        try:
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ModelLoadError(
                f"{path}: not a TorchScript archive ({type(exc).__name__}: {text[0] if text else ''})"
            ) from None
        return net, digest, f"TorchScript {path.name}"


def _any_config(p: MonaiBundleParams) -> bool:
    return any((p.path / name).is_file() for name in CONFIG_FILES)


def _config_int(parser, network_key: str, keys: tuple[str, ...]) -> int | None:
    if parser is None:
        return None
    for key in keys:
        value = literal(parser, raw(parser, f"{network_key}::{key}"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _bundle_name(folder: Path) -> str:
    """The name in configs/metadata.json, else the folder's."""
    try:
        name = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else folder.name


@hookimpl
def register_models(register):
    register(MonaiBundleLoader)
