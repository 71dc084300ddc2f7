"""Text from specs, plugins, data sets and file names, made safe to show.

Such text reaches terminals, junit.xml and report.html. Control characters in it can drive
a terminal (an ESC starts sequences that set the title or clear the screen), bidi overrides
make text read differently from what it is, and XML 1.0 forbids most C0 characters, so a
single one makes junit.xml unreadable to CI. :func:`printable` escapes all of them as
visible ``\\xNN``/``\\uNNNN`` text (escaping the ESC leaves the rest of a sequence inert)
instead of dropping them, so the reader still sees that the source held something odd.
:func:`label` also caps the length, for figure labels and table cells.
"""

from __future__ import annotations

import re

#: C0 (but newline and tab), DEL and C1 controls, line/paragraph separators, bidi controls,
#: lone surrogates and the XML-forbidden noncharacters U+FFFE and U+FFFF.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff\ufffe\uffff"
_MULTILINE = re.compile(f"[{_UNSAFE}]")
_ONE_LINE = re.compile(f"[\n{_UNSAFE}]")

#: Longest label in a figure or a table cell; the data section shows class names in full.
LABEL_LENGTH = 40


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every unsafe character escaped; ``one_line`` also escapes newlines (a
    line that must not be able to print a forged line after it)."""
    return (_ONE_LINE if one_line else _MULTILINE).sub(_escape, str(text))


def label(text: str, limit: int = LABEL_LENGTH) -> str:
    """A short, safe, one-line label: at most ``limit`` characters, the end cut to an ellipsis."""
    text = printable(text, one_line=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"
