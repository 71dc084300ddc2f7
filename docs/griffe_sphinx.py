"""A griffe extension for the hooks reference: medaudit's docstrings use reST (``:class:`...```
roles, ``:param x:`` fields in the middle of the text) and mkdocstrings renders markdown.

It turns roles into inline code and moves each field list to the end of its docstring, so the
paragraphs after ``:param x:`` stay prose instead of being read as that parameter's text.
Loaded by mkdocs.yml (mkdocstrings' ``extensions`` option); it changes nothing in the code.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")


def markdown_docstring(text: str) -> str:
    """reST roles and literals as markdown code; the ``:param:`` fields after the prose."""
    text = LITERAL.sub(r"`\1`", ROLE.sub(r"`\1`", text))
    prose, fields, in_field = [], [], False
    for line in text.splitlines():
        if line.startswith(":"):
            in_field = True
        elif not line.strip() or not line.startswith(" "):
            in_field = False
        (fields if in_field else prose).append(line)
    prose = [line for i, line in enumerate(prose) if line.strip() or (i and prose[i - 1].strip())]
    while prose and not prose[-1].strip():
        prose.pop()
    return "\n".join(prose + ([""] + fields if fields else []))


class SphinxToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
