"""Safe YAML loading that remembers the line of every key, for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medaudit.core.errors import SpecError

#: Specs are small; a larger file is refused before parsing (billion-laughs and typos alike).
MAX_SPEC_BYTES = 1_000_000

Loc = tuple[Any, ...]


class Source:
    """A parsed YAML document plus the line (1-based) of each path in it."""

    def __init__(self, data: Any, lines: dict[Loc, int], name: str, text: str):
        self.data = data
        self.lines = lines
        self.name = name
        self.text = text

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest existing prefix of ``loc``."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())

    def where(self, loc: Loc) -> str:
        line = self.line_of(loc)
        return f"{self.name}:{line}" if line else self.name


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def read_yaml(path: Path) -> Source:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SpecError([f"cannot read: {exc.strerror}"], source=str(path)) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError([f"file is {size} bytes; specs are limited to {MAX_SPEC_BYTES}"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"cannot read: {exc}"], source=str(path)) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, name: str = "spec") -> Source:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}: invalid YAML: {problem}"], source=name) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return Source(data if data is not None else {}, lines, name, text)


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[loc + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, loc + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, loc + (i,), lines)
