"""The user's cache folder, where trained demo models and trained defenses are kept.

``$MEDAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medaudit``, else ``~/.cache/medaudit``.
In core because model loaders and defenses both cache what they train.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medaudit.core.lazy import torch


def cache_dir() -> Path:
    """The cache folder (not created)."""
    if os.environ.get("MEDAUDIT_CACHE_DIR"):
        return Path(os.environ["MEDAUDIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medaudit"


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` through a temporary file, so a killed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(state, tmp)
    os.replace(tmp.name, path)
