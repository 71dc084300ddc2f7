"""Shared helpers for model loaders: safe weight loading (sha256 pins, no unpickled code
unless trusted), fingerprints. The pixel-space adapter and the other ``nn.Module`` wrappers
live in :mod:`medaudit.core.model_wrappers` and are still importable from here."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from medaudit.core.components import Params
from medaudit.core.errors import ModelLoadError
from medaudit.core.lazy import nn, torch

log = logging.getLogger(__name__)

#: Classes that live in :mod:`medaudit.core.model_wrappers` (they need torch to be defined),
#: still importable from here: looked up on first use.
_WRAPPERS = frozenset({"PixelSpaceModel", "SlidingWindow", "SpeedWrapper", "CallCounter"})


def __getattr__(name: str):
    if name in _WRAPPERS:
        from medaudit.core import model_wrappers

        return getattr(model_wrappers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_for_audit(module: nn.Module) -> nn.Module:
    """Eval mode and frozen parameters: attacks differentiate w.r.t. the input only."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Fingerprint of weights built in memory (no file): names, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: What a pinned sha256 looks like: 64 hex digits.
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


class PinnedFileParams(Params):
    """Params mixin of loaders that read a model file: pin the file's sha256.

    ``pinned_fields`` names the params holding the model file, in order of preference: the
    pin applies to the first one set, and a pin without any of them set is an error.
    """

    #: Params naming the model file the pin applies to (the first one set).
    pinned_fields: ClassVar[tuple[str, ...]] = ("checkpoint",)

    sha256: str | None = Field(
        None,
        pattern=SHA256_PATTERN,
        description="Pin: the model file's expected sha256 (64 hex digits, e.g. from `sha256sum`). The file is "
        "hashed before anything parses it, and a different file is refused.",
    )

    def pinned_file(self) -> Path | None:
        """The model file the pin applies to, or None when the params name none."""
        return next((getattr(self, f) for f in self.pinned_fields if getattr(self, f, None) is not None), None)

    @model_validator(mode="after")
    def _pin_needs_a_file(self):
        if self.sha256 is not None and self.pinned_file() is None:
            raise ValueError(f"sha256 pins the model file: set {' or '.join(self.pinned_fields)}")
        return self


class CheckpointParams(PinnedFileParams):
    """Params mixin of loaders that read a torch checkpoint: the pin, and whether a
    checkpoint holding pickled Python objects may be unpickled."""

    trust_checkpoint: bool = Field(
        False,
        description="Allow a checkpoint that holds pickled Python objects (e.g. a whole model saved with "
        "torch.save(model)): it is unpickled with weights_only=False, which runs any code the file holds. Only for "
        "files from a source you trust (pin their sha256); better, re-save them as a state dict or .safetensors.",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _check_pin(path: Path, digest: str, expected: str | None) -> str:
    if expected is not None and digest != expected.lower():
        raise ModelLoadError(
            f"{path}: sha256 is {digest}, but the spec pins {expected.lower()}: refused before loading it "
            "(a different or changed file; update the pin only if you trust the new file)"
        )
    return digest


def verify_file(path: Path, sha256: str | None) -> str:
    """The file's sha256, checked against the pin ``sha256`` (when set) before anything
    else reads the file: a mismatch is a :class:`ModelLoadError` naming both hashes."""
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return _check_pin(path, digest, sha256)


def read_model_file(path: Path, sha256: str | None = None) -> tuple[bytes, str]:
    """The file's bytes and their sha256, read once: with a pin, bytes whose sha256
    differs are refused before anything parses them, and what is parsed afterwards is
    exactly what was hashed (no second read that could find another file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return data, _check_pin(path, hashlib.sha256(data).hexdigest(), sha256)


def _unpickle(path: Path, data: bytes, trust_checkpoint: bool):
    """``torch.load`` with ``weights_only=True``; pickled Python objects only when trusted."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise ModelLoadError(f"{path}: cannot be read as a checkpoint with weights_only=True (UnpicklingError: {_first_line(exc)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if not trust_checkpoint:
            if found:
                raise ModelLoadError(
                    f"{path}: refused: the checkpoint holds pickled Python objects, not only tensors (it needs "
                    f"{found.group(1)}; e.g. a whole model saved with torch.save(model)), and unpickling it could "
                    "execute arbitrary code, so it is read with weights_only=True only. Re-save it as a state dict "
                    "(torch.save(model.state_dict(), path)) or as .safetensors; or, if you trust its source, set "
                    "trust_checkpoint: true in the model's params (and pin its sha256)"
                ) from None
            reason = re.search(r"(Unsupported [^\n]+)", text)
            raise ModelLoadError(
                f"{path}: cannot be read with weights_only=True ({reason.group(1).strip() if reason else 'UnpicklingError'}): "
                "not a torch checkpoint, or a pickle the safe reader does not support; if it holds pickled Python "
                "objects and you trust its source, set trust_checkpoint: true in the model's params"
            ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot be read as a checkpoint with weights_only=True ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    log.warning(
        "%s: unpickling with weights_only=False because trust_checkpoint is set: this runs any code the file holds",
        path,
    )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot be unpickled ({type(exc).__name__}: {_first_line(exc)})") from None


def _parse_state_dict(path: Path, data: bytes, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        try:
            state = load(data)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {_first_line(exc)})") from None
    else:
        state = _unpickle(path, data, trust_checkpoint)
    if isinstance(state, nn.Module):  # a whole model, trusted
        state = state.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), (dict, nn.Module)):
            state = state[key]
            state = state.state_dict() if isinstance(state, nn.Module) else state
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: does not hold a state dict of tensors")
    return state


def read_state_dict(path: Path, *, sha256: str | None = None, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code: ``weights_only=True`` or
    safetensors, after checking the pin ``sha256``. A checkpoint holding pickled Python
    objects (a whole model saved with ``torch.save(model)``) is refused unless
    ``trust_checkpoint``; then it is unpickled (with a warning) and its state dict taken."""
    data, _ = read_model_file(path, sha256)
    return _parse_state_dict(path, data, trust_checkpoint)


def load_weights(
    net: nn.Module, path: Path, what: str, *, sha256: str | None = None, trust_checkpoint: bool = False
) -> str:
    """Load a checkpoint strictly (see :func:`read_state_dict`); a mismatch names the
    missing and unexpected keys. Returns the sha256 of the file as read."""
    data, digest = read_model_file(path, sha256)
    state = _parse_state_dict(path, data, trust_checkpoint)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            if not keys:
                return "none"
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ModelLoadError(
            f"{path}: checkpoint does not fit {what}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}" + (f"; shape mismatches: {show(mismatched)}" if mismatched else "")
        )
    net.load_state_dict(state, strict=True)
    return digest
