"""Pseudonymous case ids.

File names of medical images often carry patient names, record numbers or dates, and
case ids end up in records, reports and plots. Datasets that read user files therefore
derive their case ids from a keyed hash of the file name instead: stable for the same
data (so runs can be compared and resumed) and unreadable without the key.

The key is ``$MEDAUDIT_PSEUDONYM_KEY`` when set, else a hash of the files' contents. It is
never written anywhere (the published data fingerprint is a different hash), so someone
holding a report but not the images cannot test guessed file names against the ids.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable


def pseudonym_key(content_hashes: Iterable[str]) -> str:
    """The secret for :func:`pseudonym`: the environment's key, else one derived from the data."""
    if os.environ.get("MEDAUDIT_PSEUDONYM_KEY"):
        return os.environ["MEDAUDIT_PSEUDONYM_KEY"]
    digest = hashlib.sha256(b"medaudit pseudonym key\0")
    for h in sorted(content_hashes):
        digest.update(h.encode() + b"\n")
    return digest.hexdigest()


def pseudonym(secret: str, name: str) -> str:
    """``"case-"`` plus the first 12 hex digits of ``sha256(secret + "\\0" + name)``."""
    return "case-" + hashlib.sha256((secret + "\0" + name).encode("utf-8")).hexdigest()[:12]
