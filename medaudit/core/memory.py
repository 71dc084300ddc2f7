"""Objects handed to :func:`medaudit.audit` in memory (a torch module, tensors), kept
here under a content-derived key for the ``in-memory`` model loader and dataset.

The spec names the key, so a run directory records what was audited (the key is a prefix
of the object's fingerprint) and the engine loads in-memory objects through the same
plugin path as files. The objects live in this process only: Ray workers cannot reach them.
"""

from __future__ import annotations

import threading
from typing import Any

_OBJECTS: dict[str, Any] = {}
_LOCK = threading.Lock()


def keep(kind: str, obj: Any, fingerprint: str) -> str:
    """Keep ``obj`` until :func:`release`; returns its key (``<kind>-<fingerprint prefix>``)."""
    key = f"{kind}-{fingerprint[:16]}"
    with _LOCK:
        _OBJECTS[key] = obj
    return key


def get(key: str) -> Any:
    """The object kept under ``key``; LookupError when this process holds none (a spec
    naming an in-memory object run from the command line, or on a Ray worker)."""
    with _LOCK:
        if key not in _OBJECTS:
            raise LookupError(
                f"no in-memory object {key!r} in this process: in-memory models and data exist only in the "
                "Python process that called medaudit.audit() (not on the command line, not on Ray workers); "
                "save the model to a file and use a file loader (factory, torchscript) instead"
            )
        return _OBJECTS[key]


def release(key: str) -> None:
    with _LOCK:
        _OBJECTS.pop(key, None)
