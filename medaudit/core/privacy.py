"""Pseudonymous case ids, and the check that keeps identifying values out of outputs.

File names of medical images often carry patient names, record numbers or dates, and
case ids end up in records, reports and plots. Datasets that read user files therefore
derive their case ids from a keyed hash of the file name instead: stable for the same
data (so runs can be compared and resumed) and unreadable without the key.

The key is ``$MEDAUDIT_PSEUDONYM_KEY`` when set, else a hash of the files' contents. It is
never written anywhere (the published data fingerprint is a different hash), so someone
holding a report but not the images cannot test guessed file names against the ids.

Identifying values (:attr:`LoadedData.sensitive_values`) map each value to where it came
from (``"file name of case case-1a2b3c4d5e6f"``), so a refusal can say which source matched
without quoting the value. File names are guarded except when they are ordinary
(:func:`ordinary`): a short number (``2000.png``) or one word of the report's own text
(``summary.png``) identifies nobody but would stop every run, since the report prints
such years and words itself. DICOM and NIfTI header values are guarded regardless.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import html
import importlib.resources
import os
import re
from pathlib import PurePath
from typing import Iterable, Mapping

from medaudit.core.errors import PrivacyError

#: Shorter strings read from the input are not guarded: they match too much innocent text.
MIN_SENSITIVE_LENGTH = 4
#: A file name that is a number of fewer digits is not guarded (years, counters); record
#: numbers and dates written as digits are longer.
MIN_GUARDED_DIGITS = 6
#: Python modules whose string literals are fixed text of results.json and the report.
_REPORT_TEXT_MODULES = (
    ("medaudit.audits", "runner.py"),
    ("medaudit.audits", "results.py"),
    ("medaudit.audits", "figures.py"),
    ("medaudit.reports", "html.py"),
    ("medaudit.reports", "junit.py"),
    ("medaudit.plugins.report", "sections.py"),
)

#: Where a value came from, for values a plugin hands over without one.
UNKNOWN_SOURCE = "a value the data set flagged as identifying"


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


def distinctive(text: str) -> bool:
    """Whether a string read from the input is worth guarding: at least
    :data:`MIN_SENSITIVE_LENGTH` characters, with a letter or digit, and not one character
    repeated (dummy values such as ``000000``)."""
    return len(text) >= MIN_SENSITIVE_LENGTH and len(set(text)) > 1 and any(c.isalnum() for c in text)


_TOKEN = re.compile(r"[^\W_]+")


@functools.lru_cache(maxsize=1)
def report_words() -> frozenset[str]:
    """The words (casefolded) of the fixed text medaudit writes: its report templates and the
    string literals of the modules that build results.json and the report. Computed once."""
    texts = [
        path.read_text(encoding="utf-8")
        for path in _walk_files(importlib.resources.files("medaudit.reports").joinpath("templates"))
        if path.name.endswith(".j2")
    ]
    for package, module in _REPORT_TEXT_MODULES:
        tree = ast.parse(importlib.resources.files(package).joinpath(module).read_text(encoding="utf-8"))
        texts += [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return frozenset(word for text in texts for word in _TOKEN.findall(text.casefold()) if word.isalpha())


def _walk_files(folder) -> Iterable:
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _walk_files(entry)
        else:
            yield entry


def ordinary(text: str) -> bool:
    """Whether a value read from a file name is one number of fewer than
    :data:`MIN_GUARDED_DIGITS` digits or one word of :func:`report_words`: it identifies
    nobody, and guarding it would refuse the report's own years and words."""
    folded = text.casefold()
    if not _TOKEN.fullmatch(folded):
        return False
    return (folded.isdigit() and len(folded) < MIN_GUARDED_DIGITS) or folded in report_words()


def file_name_values(name: str, source: str) -> dict[str, str]:
    """The identifying strings of a file's name, for :attr:`LoadedData.sensitive_values`,
    each mapped to ``source`` (e.g. ``"file name of case case-1a2b3c4d5e6f"``): the name, its
    stem and, for a relative path (``sub/x.png``), the path and each of its folder names;
    those that are :func:`distinctive` and not :func:`ordinary`."""
    path = PurePath(name)
    return {s: source for s in (name, path.name, path.stem, *path.parts[:-1]) if distinctive(s) and not ordinary(s)}


def drop_public(sensitive: Mapping[str, str], public: Iterable[str]) -> dict[str, str]:
    """``sensitive`` without the values that are part of a ``public`` text (class names,
    which the report shows anyway: keeping such a value would make the run refuse to write
    its own class names)."""
    public = [text.casefold() for text in public]
    return {v: source for v, source in sensitive.items() if not any(v.casefold() in text for text in public)}


#: Sources of identifying values a privacy refusal names at most.
MAX_SOURCES_SHOWN = 5


def refuse_leaks(texts: Mapping[str, str], sensitive: Mapping[str, str], refused: str) -> None:
    """Fail closed (:class:`PrivacyError`) if a text about to be written holds a value the
    data set flagged as identifying. The message names the texts, a count and where the
    values came from (a case's file name, a DICOM attribute), never the values."""
    leaks = {name: leaked_values(text, sensitive) for name, text in texts.items()}
    where = ", ".join(f"{name} ({len(v)} value{'s' if len(v) > 1 else ''})" for name, v in leaks.items() if v)
    if where:
        sources = sorted({sensitive[value] for values in leaks.values() for value in values})
        shown = "; ".join(sources[:MAX_SOURCES_SHOWN])
        more = len(sources) - MAX_SOURCES_SHOWN
        raise PrivacyError(
            f"refused to {refused}: {where} would hold values read from the input: {shown}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Remove the identifying text (from the spec, the command line, a plugin's output or the class "
            "names) or rename the files, and run again."
        )


def leaked_values(text: str, sensitive: Iterable[str]) -> list[str]:
    """The ``sensitive`` values that occur in ``text`` as whole tokens (case-insensitive,
    also once HTML entities are decoded). Callers report how many, never which: the values
    are the secret.

    Whole tokens, because short values occur by chance inside longer ones (a time
    ``101501`` in the float ``0.101501``, a name in a hash): a value found must not touch a
    letter or digit, nor a dot on a side where it begins or ends with a digit. Each value
    is first looked up by its tokens in the set of the text's tokens, so a large text is
    scanned once, not once per value.
    """
    texts = [t.casefold() for t in {text, html.unescape(text)}]
    tokens = set().union(*(_TOKEN.findall(t) for t in texts))
    found = []
    for value in sensitive:
        folded = value.casefold()
        parts = _TOKEN.findall(folded)
        if not parts or not all(part in tokens for part in parts):
            continue
        before = r"(?<![^\W_])" + (r"(?<!\.)" if folded[0].isdigit() else "")
        after = r"(?![^\W_])" + (r"(?!\.\d)" if folded[-1].isdigit() else "")
        pattern = re.compile(before + re.escape(folded) + after)
        if any(pattern.search(t) for t in texts):
            found.append(value)
    return found
