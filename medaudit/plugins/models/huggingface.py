"""Models: huggingface.

An image classifier saved in a local Hugging Face folder, read from local files only:
nothing is downloaded, and the hub libraries are held offline while the folder is read.

Two folder formats are understood, told apart by ``config.json``:

- timm's (``timm.models.save_for_hf``, what ``push_to_hf_hub`` uploads): ``config.json``
  names the ``architecture``, ``num_classes`` and the ``pretrained_cfg`` (mean, std, input
  size), next to ``model.safetensors`` or ``pytorch_model.bin``. The network is built by
  timm and the weights are loaded strictly from the file, as the ``timm`` loader does (no
  pickled code runs unless ``trust_checkpoint``).
- transformers' (a config with ``model_type`` or ``architectures``): the model is built by
  ``AutoModelForImageClassification.from_pretrained(path, local_files_only=True)`` when
  transformers is installed (it is not a dependency of medaudit); the mean and std come
  from ``preprocessor_config.json``. No remote code runs (``trust_remote_code`` is off).

Normalisation lives inside the model, from the folder's config unless ``mean``/``std``
are given; grey images are replicated to the network's channels. The fingerprint is the
sha256 of the weights file, which ``sha256`` can pin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Task, resolve_path
from medaudit.core.environment import require_torchvision
from medaudit.core.errors import EnvironmentProblem, ModelLoadError
from medaudit.core.models import (
    SHA256_PATTERN,
    CheckpointParams,
    load_weights,
    prepare_for_audit,
    state_dict_sha256,
    verify_file,
)
from medaudit.plugins.models._common import no_such_name

log = logging.getLogger(__name__)

#: Weights file names of a saved folder, in order of preference (safetensors holds no code).
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
#: What timm assumes when a config states no normalisation (ImageNet's).
TIMM_DEFAULT_MEAN, TIMM_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: Environment switches that keep huggingface_hub and transformers off the network.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class HuggingFaceParams(CheckpointParams):
    pinned_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: Path = Field(
        description="Local folder saved in Hugging Face format: config.json and model.safetensors (or "
        "pytorch_model.bin), as timm's save_for_hf/push_to_hf_hub or transformers' save_pretrained write it."
    )
    in_chans: int | None = Field(
        None, ge=1, le=64,
        description="Input channels of the network; default: the config's (timm: model_args.in_chans, else "
        "pretrained_cfg.input_size[0]; transformers: num_channels). Grey images are replicated to match.",
    )
    mean: list[float] | None = Field(
        None, min_length=1,
        description="Per-channel mean subtracted inside the model (pixels in [0, 1]); default: the config's.",
    )
    std: list[float] | None = Field(
        None, min_length=1, description="Per-channel std divided inside the model; default: the config's."
    )
    sha256: str | None = Field(
        None,
        pattern=SHA256_PATTERN,
        description="Pin: the expected sha256 of the folder's weights file (64 hex digits, e.g. from `sha256sum "
        "model.safetensors`). The file is hashed before anything parses it, and a different file is refused.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _folder(cls, value, info):
        path = resolve_path(value, info)
        if not path.is_dir():
            raise ValueError(f"folder not found: {path}")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path / 'config.json'} not found: the folder must hold a Hugging Face config.json")
        return path

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(s <= 0 for s in value):
            raise ValueError("every std must be > 0")
        return value

    @model_validator(mode="after")
    def _weights_present(self) -> "HuggingFaceParams":
        try:
            config = read_config(self.path)
            if not is_transformers_config(config):
                weights_file(self.path)
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from None
        return self


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: the folder must hold a Hugging Face config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if "architecture" not in config and not is_transformers_config(config):
        raise ModelLoadError(
            f"{path}: neither a timm config (no 'architecture') nor a transformers config (no 'model_type' or "
            "'architectures')"
        )
    return config


def is_transformers_config(config: dict[str, Any]) -> bool:
    """transformers writes ``model_type``/``architectures``; timm writes ``architecture``."""
    return "architecture" not in config and ("model_type" in config or "architectures" in config)


def weights_file(folder: Path) -> Path:
    """The folder's single weights file, safetensors first."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"{folder}: no weights file: expected {' or '.join(str(folder / n) for n in WEIGHTS_FILES)}")


@contextlib.contextmanager
def offline():
    """Hold huggingface_hub (and transformers, which asks it) offline: a missing file is then
    an error instead of a download. Restores the previous settings afterwards."""
    saved = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    constants = None
    try:
        import huggingface_hub.constants as constants

        was_offline = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True  # read at import time, so set it too
    except (ImportError, AttributeError):
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = was_offline
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def channel_stats(values, in_chans: int, what: str, source: str) -> list[float]:
    """Per-channel statistics fitted to ``in_chans``: one value, or one per channel; a
    three-channel config on a one-channel network uses the average (as timm does)."""
    values = [float(v) for v in values]
    if len(values) in (1, in_chans):
        return values
    if in_chans == 1:
        log.warning("%s: %s has %d values for a 1-channel network: using their average", source, what, len(values))
        return [sum(values) / len(values)]
    raise ModelLoadError(f"{source}: {what} has {len(values)} values, the network {in_chans} input channels")


class HuggingFaceLoader(ModelLoader):
    """An image classifier from a local Hugging Face folder (timm or transformers format); nothing is downloaded."""

    name = "huggingface"
    tasks = frozenset({Task.CLASSIFICATION})
    Params = HuggingFaceParams

    def load(self, task: Task) -> LoadedModel:
        p: HuggingFaceParams = self.params
        config = read_config(p.path)
        with offline():
            if is_transformers_config(config):
                return self._load_transformers(p, config, task)
            return self._load_timm(p, config, task)

    def _load_timm(self, p: HuggingFaceParams, config: dict[str, Any], task: Task) -> LoadedModel:
        require_torchvision()
        import timm

        source = str(p.path / "config.json")
        arch = config["architecture"]
        if not timm.is_model(arch):
            raise ModelLoadError(f"{source}: {no_such_name('timm', 'architecture', arch, timm.list_models())}")
        # timm's older exports keep the pretrained config at the top level
        pretrained_cfg = config.get("pretrained_cfg", config)
        model_args = dict(config.get("model_args") or {})
        num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ModelLoadError(f"{source}: num_classes must be an integer >= 2, not {num_classes!r}")
        input_size = pretrained_cfg.get("input_size") or [3]
        in_chans = p.in_chans or model_args.get("in_chans") or int(input_size[0])
        model_args.update(in_chans=in_chans, num_classes=num_classes)
        weights = weights_file(p.path)
        try:
            net = timm.create_model(arch, pretrained=False, **model_args)
        except Exception as exc:
            raise ModelLoadError(f"{source}: timm could not build {arch!r}: {type(exc).__name__}: {exc}") from None
        what = f"timm {arch} (in_chans={in_chans}, num_classes={num_classes})"
        fingerprint = load_weights(net, weights, what, sha256=p.sha256, trust_checkpoint=p.trust_checkpoint)
        mean = p.mean if p.mean is not None else pretrained_cfg.get("mean", TIMM_DEFAULT_MEAN)
        std = p.std if p.std is not None else pretrained_cfg.get("std", TIMM_DEFAULT_STD)
        mean, std = channel_stats(mean, in_chans, "mean", source), channel_stats(std, in_chans, "std", source)
        fixed = f", fixed input {tuple(input_size[1:])}" if pretrained_cfg.get("fixed_input_size") else ""
        from medaudit.core.model_wrappers import PixelSpaceModel

        return LoadedModel(
            module=prepare_for_audit(PixelSpaceModel(net, mean, std, in_chans)),
            task=task,
            num_classes=num_classes,
            in_channels=in_chans,
            access=frozenset(Access),
            fingerprint=fingerprint,
            description=f"Hugging Face folder {p.path.name}: {what}{fixed}",
            source={"checkpoint": str(weights), "config": source},
        )

    def _load_transformers(self, p: HuggingFaceParams, config: dict[str, Any], task: Task) -> LoadedModel:
        try:
            from transformers import AutoModelForImageClassification
        except ImportError as exc:
            raise EnvironmentProblem(
                f"{p.path / 'config.json'} is a transformers config ({config.get('model_type', 'unknown type')}), and "
                f"transformers cannot be imported ({exc}): install it with: pip install transformers"
            ) from None
        weights = next((p.path / n for n in WEIGHTS_FILES if (p.path / n).is_file()), None)
        if weights is not None:
            fingerprint = verify_file(weights, p.sha256)  # before transformers reads it
            if weights.suffix != ".safetensors" and not p.trust_checkpoint:
                raise ModelLoadError(
                    f"{weights}: a pickled checkpoint, which transformers unpickles itself: re-save the model with "
                    "safetensors (save_pretrained's default), or, if you trust its source, set trust_checkpoint: true"
                )
        elif p.sha256 is not None:
            raise ModelLoadError(f"{p.path}: sha256 pins a single weights file ({' or '.join(WEIGHTS_FILES)}), "
                                 "and the folder has none (sharded weights cannot be pinned)")
        try:
            net = AutoModelForImageClassification.from_pretrained(
                str(p.path), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            raise ModelLoadError(
                f"{p.path}: transformers could not load the model: {type(exc).__name__}: {exc}"
            ) from None
        model_config = net.config
        num_classes = int(getattr(model_config, "num_labels", 0) or 0)
        in_chans = p.in_chans or int(getattr(model_config, "num_channels", 3) or 3)
        mean, std = self._transformers_normalisation(p, in_chans)
        if weights is None:
            fingerprint = state_dict_sha256(net)
        what = f"transformers {type(net).__name__} (in_chans={in_chans}, num_classes={num_classes})"
        from medaudit.core.model_wrappers import PixelSpaceModel
        from medaudit.plugins.models._transformers import _Logits

        return LoadedModel(
            module=prepare_for_audit(PixelSpaceModel(_Logits(net), mean, std, in_chans)),
            task=task,
            num_classes=num_classes,
            in_channels=in_chans,
            access=frozenset(Access),
            fingerprint=fingerprint,
            description=f"Hugging Face folder {p.path.name}: {what}",
            source={"checkpoint": str(weights) if weights else str(p.path), "config": str(p.path / "config.json")},
        )

    @staticmethod
    def _transformers_normalisation(p: HuggingFaceParams, in_chans: int) -> tuple[list[float], list[float]]:
        """mean and std on pixels in [0, 1] equivalent to the image processor's rescale and normalise steps:
        it computes (raw * rescale_factor - image_mean) / image_std on raw values in [0, 255]."""
        preprocessor = p.path / "preprocessor_config.json"
        source = str(preprocessor)
        if not preprocessor.is_file():
            if p.mean is None or p.std is None:
                raise ModelLoadError(
                    f"{preprocessor} not found: give mean and std (the normalisation the model was trained with)"
                )
            return channel_stats(p.mean, in_chans, "mean", "params"), channel_stats(p.std, in_chans, "std", "params")
        try:
            stats = json.loads(preprocessor.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{preprocessor}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
        scale = 255.0 * float(stats.get("rescale_factor", 1 / 255)) if stats.get("do_rescale", True) else 255.0
        if stats.get("do_normalize", True):
            mean = [m / scale for m in stats.get("image_mean", [0.5])]
            std = [s / scale for s in stats.get("image_std", [0.5])]
        else:
            mean, std = [0.0], [1.0 / scale]
        mean = p.mean if p.mean is not None else mean
        std = p.std if p.std is not None else std
        return channel_stats(mean, in_chans, "mean", source), channel_stats(std, in_chans, "std", source)


@hookimpl
def register_models(register):
    register(HuggingFaceLoader)
