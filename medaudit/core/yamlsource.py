"""Safe YAML loading that remembers the line of every key, for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medaudit.core.errors import SpecError

#: Specs are small; a larger file is refused before parsing (billion-laughs and typos alike).
MAX_SPEC_BYTES = 1_000_000
#: Aliases (``*name``) repeat what an anchor (``&name``) marks; a document whose aliases
#: expand it to more values than this is refused before anything walks it.
MAX_YAML_NODES = 100_000

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
    """Compose the YAML, refuse duplicate keys and alias bombs, then build the data from
    the checked node graph (the text is parsed once)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[Loc, int] = {}
        if node is not None:
            _check_expansion(node, name)
            problems: list[str] = []
            _walk(node, (), lines, name, problems)
            if problems:
                raise SpecError(list(dict.fromkeys(problems)), source=name)
        data = yaml.SafeLoader("").construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}: invalid YAML: {problem}"], source=name) from None
    except RecursionError:
        raise SpecError([f"{name}: nested too deeply to be a spec"], source=name) from None
    return Source(data if data is not None else {}, lines, name, text)


def _check_expansion(root: yaml.Node, name: str) -> None:
    """Refuse a document whose aliases expand it past :data:`MAX_YAML_NODES` nodes, or
    that refers to itself, before anything walks the expanded tree. Each node's expanded
    size is computed once, so a "billion laughs" costs as little as its text."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecError(
                [f"{name}:{node.start_mark.line + 1}: an alias refers to the value that contains it; write the value out"],
                source=name,
            )
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[key] = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        return sizes[key]

    total = size(root)
    if total > MAX_YAML_NODES:
        raise SpecError(
            [f"{name}: aliases expand the document to {total} values; specs are limited to {MAX_YAML_NODES} "
             "(an alias bomb?): write the values out or use fewer aliases"],
            source=name,
        )


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], name: str, problems: list[str]) -> None:
    """Record the line of every path; add a problem for each key given twice in one mapping
    (YAML loaders silently keep the last one)."""
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key) in seen:
                    first = seen[(key_node.tag, key)]
                    problems.append(f"{name}:{line}: {format_loc(loc + (key,))}: duplicate key (first at line {first}); keep one")
                seen.setdefault((key_node.tag, key), line)
            lines[loc + (key,)] = line
            _walk(value_node, loc + (key,), lines, name, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, loc + (i,), lines, name, problems)
