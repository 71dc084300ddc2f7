"""Writes the documentation's reference pages from the code: the spec's JSON Schema, the
components registered by the built-in plugins, the results.json schema and the exit codes.

The pages are never stored in the repository, so they cannot disagree with the code:
``mkdocs build`` runs this script through the mkdocs-gen-files plugin (see mkdocs.yml) and
the pages exist only in the built site; tests/test_docs.py calls :func:`pages` directly.
To read them without mkdocs, write them to a folder::

    python docs/gen_reference.py OUTDIR
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

#: Where the generated pages go in the site (relative to docs/), and the nav titles mkdocs.yml gives them.
SPEC_PAGE = "reference/spec.md"
COMPONENTS_PAGE = "reference/components.md"
RESULTS_PAGE = "reference/results-schema.md"
EXIT_CODES_PAGE = "reference/exit-codes.md"
SPEC_SCHEMA_FILE = "reference/spec.schema.json"
RESULTS_SCHEMA_FILE = "reference/results.schema.json"

#: Headings of the component kinds; a kind not named here gets one made from its key.
KIND_TITLES = {
    "model": "Model loaders", "dataset": "Datasets", "attack": "Attacks", "defense": "Defenses",
    "metric": "Metrics", "report_section": "Report sections",
}


# -- markdown helpers -----------------------------------------------------------------


def md_text(text: str) -> str:
    """Text from the code as markdown prose: one line, no HTML, no accidental emphasis."""
    text = " ".join(str(text).split()).replace("``", "`")  # reST literals -> markdown code
    text = text.replace("\\", "\\\\").replace("*", "\\*")
    if text.count("`") % 2:  # an unpaired backtick would swallow the rest of the paragraph
        text = text.replace("`", "\\`")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def md_cell(text: str) -> str:
    """:func:`md_text` that also keeps a table row in one piece."""
    return md_text(text).replace("|", "\\|")


def code(value: Any) -> str:
    """A value as inline code in a table cell."""
    text = value if isinstance(value, str) and value else json.dumps(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def kind_title(kind: str) -> str:
    return KIND_TITLES.get(kind, kind.replace("_", " ").capitalize() + "s")


# -- JSON Schema -> tables -------------------------------------------------------------


class SchemaRenderer:
    """Renders the object definitions of a JSON Schema as markdown tables, one section per
    definition reached from the root, with links between them."""

    def __init__(self, schema: dict, links: dict[str, str] | None = None, prefix: str = "", closed_note: bool = True,
                 defaults: bool = True):
        self.schema, self.defs = schema, schema.get("$defs", {})
        self.defaults = defaults  # a column of defaults (an input's schema) or of required keys (an output's)
        self.closed_note = closed_note  # say under each table whether other keys are refused
        self.links = links or {}  # $defs name -> link target for definitions documented elsewhere
        self.prefix = prefix  # keeps the anchors of several schemas on one page apart

    def anchor(self, name: str) -> str:
        return anchor(self.prefix, name) if self.prefix else anchor(name)

    def resolve(self, node: dict) -> tuple[str | None, dict]:
        ref = node.get("$ref", "")
        name = ref.rsplit("/", 1)[-1] if ref.startswith("#/$defs/") else None
        return name, self.defs.get(name, node) if name else node

    @staticmethod
    def has_section(node: dict) -> bool:
        """Whether a definition gets its own section: an object with named keys or typed values."""
        typed_values = isinstance(node.get("additionalProperties"), dict)
        return node.get("type") == "object" and ("properties" in node or typed_values)

    def type_of(self, node: dict) -> str:
        """One schema node as a short type: `string`, `array of` [Row](#row), one of `a`, `b`."""
        if not node:
            return "any"
        if "$ref" in node:
            name, target = self.resolve(node)
            if name in self.links:
                return f"[{target.get('title', name)}]({self.links[name]})"
            if "enum" in target or "const" in target:
                return self.type_of({k: v for k, v in target.items() if k in ("enum", "const", "type")})
            if self.has_section(target):
                return f"[{target.get('title', name)}](#{self.anchor(name)})"
            return self.type_of({k: v for k, v in target.items() if k != "title"})
        if "const" in node:
            return code(node["const"])
        if "enum" in node:
            return "one of " + ", ".join(code(v) for v in node["enum"])
        if "discriminator" in node and name_links(node, self.links):
            return name_links(node, self.links)
        for key in ("anyOf", "oneOf"):
            if key in node:
                kinds = [self.type_of(n) for n in node[key]]
                return " or ".join(dict.fromkeys(kinds))
        kind = node.get("type", "any")
        if isinstance(kind, list):
            return " or ".join(self.type_of({**node, "type": k}) for k in kind)
        if kind == "array":
            return f"array of {self.type_of(node.get('items', {}))}{bounds(node)}"
        if kind == "object" and isinstance(node.get("additionalProperties"), dict):
            return f"object of {self.type_of(node['additionalProperties'])}"
        return f"`{kind}`{bounds(node) if kind in ('number', 'integer', 'string') else ''}"

    def table(self, node: dict, sections: dict[str, str] | None = None) -> list[str]:
        """A table of ``node``'s keys; ``sections``: key -> anchor of the section that details its value."""
        sections = sections or {}
        props = node.get("properties", {})
        required = set(node.get("required", []))
        third = "default" if self.defaults else "required"
        lines = [f"| key | type | {third} | description |", "| --- | --- | --- | --- |"]
        for key, prop in props.items():
            _, target = self.resolve(prop)
            description = prop.get("description") or target.get("description") or ""
            if self.defaults:
                default = code(prop["default"]) if "default" in prop else ("required" if key in required else "")
            else:
                default = "yes" if key in required else ""
            kind = self.type_of(prop)
            if key in sections:
                kind = f"[{'array of objects' if prop.get('type') == 'array' else 'object'}](#{sections[key]})"
            lines.append(f"| `{key}` | {kind} | {default} | {md_cell(description)} |")
        if node.get("additionalProperties") is False and self.closed_note:
            lines += ["", "No other keys are allowed."]
        return lines

    def reached(self, node: Any, seen: list[str]) -> list[str]:
        """The object definitions reached from ``node``, in order of first mention (not into links)."""
        if isinstance(node, dict):
            name = self.resolve(node)[0] if "$ref" in node else None
            if name and name not in seen and name not in self.links:
                seen.append(name)
                self.reached(self.defs.get(name, {}), seen)
            for key, value in node.items():
                if key not in ("$defs", "discriminator"):
                    self.reached(value, seen)
        elif isinstance(node, list):
            for value in node:
                self.reached(value, seen)
        return seen

    def sections(self, heading: str = "##") -> list[str]:
        lines: list[str] = []
        for name in self.reached(self.schema.get("properties", {}), []):
            node = self.defs[name]
            if not self.has_section(node):
                continue
            lines += ["", f"{heading} {node.get('title', name)} {{#{self.anchor(name)}}}", ""]
            if node.get("description"):
                lines += [md_text(node["description"]), ""]
            if "properties" in node:
                lines += self.table(node)
            else:
                lines += [f"An {self.type_of({k: v for k, v in node.items() if k != 'title'})}: any key."]
        return lines


BOUNDS = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}
LENGTHS = {"minLength": "at least {} characters", "minItems": "at least {} items", "maxItems": "at most {} items"}


def bounds(node: dict) -> str:
    """The limits a schema node sets on its value: ' (≥ 1, ≤ 200)'."""
    found = [f"{sign} {node[key]}" for key, sign in BOUNDS.items() if key in node]
    found += [text.format(node[key]) for key, text in LENGTHS.items() if key in node]
    return f" ({', '.join(found)})" if found else ""


def name_links(node: dict, links: dict[str, str]) -> str:
    """A discriminated union of component variants: a link to the components of that kind."""
    mapping = node.get("discriminator", {}).get("mapping", {})
    targets = {links.get(ref.rsplit("/", 1)[-1]) for ref in mapping.values()}
    if len(targets) != 1 or None in targets:
        return ""
    key = node["discriminator"]["propertyName"]
    return f"a registered component, chosen by `{key}` ([list]({targets.pop()}))"


# -- pages ---------------------------------------------------------------------------


def default_host():
    """The built-in plugins only: the documentation lists what medaudit ships, not what is installed."""
    from medaudit.core.host import get_host

    return get_host(load_entry_points=False)


def _component_variants(schema: dict) -> dict[str, str]:
    """The spec schema's per-component definitions (``attack_fgsm``...) -> their components page link."""
    links = {}
    for name, node in schema.get("$defs", {}).items():
        for kind in KIND_TITLES:
            if name.startswith(kind + "_") and "params" in node.get("properties", {}):
                links[name] = f"components.md#{anchor(kind_title(kind))}"
    return links


def spec_page(host) -> str:
    from medaudit.core.spec import spec_json_schema

    schema = spec_json_schema(host)
    renderer = SchemaRenderer(schema, links=_component_variants(schema), closed_note=False)
    lines = [
        "# Spec reference",
        "",
        "An audit spec is a YAML file with the sections below; `medaudit validate SPEC` checks one without running "
        "it, and `medaudit init` writes a commented starter spec. The components' own `params` are listed with "
        "each component on the [components](components.md) page. This page is generated from the spec's JSON "
        f"Schema ([spec.schema.json]({Path(SPEC_SCHEMA_FILE).name}), the output of `medaudit schema`, which editors "
        "can use for completion and checking). A key that is not listed is an error, as is an unknown component "
        "param.",
        "",
        "## Top level",
        "",
        *renderer.table(schema),
        *renderer.sections(),
        "",
    ]
    return "\n".join(lines)


def _param_rows(params: dict, prefix: str) -> list[str]:
    """A component's params table, then a table for each object its params hold."""
    if not params.get("properties"):
        return ["No params."]
    renderer = SchemaRenderer(params, prefix=prefix, closed_note=False)
    return renderer.table(params) + renderer.sections("####")


def components_page(host) -> str:
    rows = host.component_rows()
    lines = [
        "# Components",
        "",
        "Every component the built-in plugins register, by kind, with its params (the `params:` of the spec). "
        "The same data, for the components installed here including vendors' plugins, is printed by "
        "`medaudit plugins --json`. Params not listed are refused by `medaudit validate`. This page is generated "
        "from the plugin registry.",
        "",
    ]
    for kind in host.components:
        of_kind = [r for r in rows if r["kind"] == kind]
        lines += [f"## {kind_title(kind)} {{#{anchor(kind_title(kind))}}}", ""]
        lines += ["| name | summary |", "| --- | --- |"]
        lines += [f"| [`{r['name']}`](#{anchor(kind, r['name'])}) | {md_cell(r['summary'])} |" for r in of_kind]
        for r in of_kind:
            lines += ["", f"### {r['name']} {{#{anchor(kind, r['name'])}}}", "", md_text(r["summary"]), ""]
            facts = [f"tasks: {', '.join(r['tasks'])}", f"dimensions: {', '.join(f'{d}D' for d in r['dims'])}"]
            if "norms" in r:
                facts += [f"norms: {', '.join(r['norms']) or 'none (own budget)'}", f"needs: {r['needs']}",
                          f"targeted: {'yes' if r['targeted'] else 'no'}"]
            facts.append(f"plugin: `{r['plugin']}`")
            lines += ["; ".join(facts) + ".", ""]
            if r.get("budget"):
                budget = r["budget"]
                lines += [f"Own budget `{budget['name']}`, levels {code(budget.get('levels'))}: "
                          f"{md_text(budget.get('description', ''))}", ""]
            lines += _param_rows(r["params"], anchor(kind, r["name"]))
        lines.append("")
    return "\n".join(lines)


def results_page() -> str:
    from medaudit.audits.results_schema import results_json_schema

    schema = results_json_schema()
    renderer = SchemaRenderer(schema, defaults=False)
    sections: list[str] = []
    lines = [
        "# results.json",
        "",
        "Every run directory holds `results.json`: everything the audit found, from which the report is rendered "
        "alone. Its JSON Schema (draft 2020-12) is printed by `medaudit schema --results` and is "
        f"[results.schema.json]({Path(RESULTS_SCHEMA_FILE).name}); this page is generated from it. Objects that "
        "plugins extend stay open: a reader ignores keys it does not know.",
        "",
    ]
    detailed = {}
    for key, prop in schema["properties"].items():
        items = prop.get("items", {})
        node = prop if "properties" in prop else items if "properties" in items else None
        if node is not None:
            detailed[key] = anchor(key)
            sections += ["", f"## `{key}` {{#{anchor(key)}}}", "", md_text(node.get("description", "")), ""]
            sections += renderer.table(node)
    lines += ["## Top level", "", *renderer.table(schema, detailed), *sections]
    lines += renderer.sections()
    lines.append("")
    return "\n".join(lines)


def exit_code_docs() -> dict[str, str]:
    """Each ExitCode member's ``#:`` comment in medaudit/core/errors.py."""
    from medaudit.core.errors import ExitCode

    found = re.findall(r"^\s*(\w+)\s*=\s*\d+\s*#:\s*(.+)$", inspect.getsource(ExitCode), flags=re.MULTILINE)
    return {name: text.strip() for name, text in found}


def error_classes() -> list[type]:
    """The user-facing error classes of medaudit.core.errors, in the module's order."""
    from medaudit.core import errors

    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.MedauditError) and cls.__module__ == errors.__name__]


def exit_codes_page() -> str:
    from medaudit.audits.acceptance import VERDICT_EXIT_CODES
    from medaudit.core.errors import ExitCode

    docs = exit_code_docs()
    verdicts = {code: verdict for verdict, code in VERDICT_EXIT_CODES.items()}
    lines = [
        "# Exit codes",
        "",
        "`medaudit run` exits with one of these codes (modelled on pytest's), so CI can act on an audit without "
        "reading its report. A finished audit's code is its verdict's, and results.json records both. This page "
        "is generated from `medaudit.core.errors.ExitCode`.",
        "",
        "| code | name | verdict in results.json | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for member in ExitCode:
        verdict = f"`{verdicts[member]}`" if member in verdicts else ""
        lines.append(f"| {int(member)} | `{member.name}` | {verdict} | {md_cell(docs.get(member.name, ''))} |")
    lines += [
        "",
        "## Errors",
        "",
        "Problems a user can fix are reported as one line without a traceback, and exit with their class's code; "
        "anything else is treated as a bug (exit code 3).",
        "",
        "| error | exit code | when |",
        "| --- | --- | --- |",
    ]
    for cls in sorted(error_classes(), key=lambda c: (int(c.exit_code), c.__name__)):
        doc = inspect.getdoc(cls) or ""
        lines.append(f"| `{cls.__name__}` | {int(cls.exit_code)} `{ExitCode(cls.exit_code).name}` | "
                     f"{md_cell(doc.split(chr(10) + chr(10))[0])} |")
    lines.append("")
    return "\n".join(lines)


def pages(host=None) -> dict[str, str]:
    """Every generated file: its path in the site (relative to docs/) -> its content."""
    from medaudit.audits.results_schema import results_json_schema
    from medaudit.core.spec import spec_json_schema

    host = host or default_host()
    return {
        SPEC_PAGE: spec_page(host),
        COMPONENTS_PAGE: components_page(host),
        RESULTS_PAGE: results_page(),
        EXIT_CODES_PAGE: exit_codes_page(),
        SPEC_SCHEMA_FILE: json.dumps(spec_json_schema(host), indent=2) + "\n",
        RESULTS_SCHEMA_FILE: json.dumps(results_json_schema(), indent=2) + "\n",
    }


def write_to(folder: Path) -> list[Path]:
    written = []
    for name, text in pages().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def write_with_gen_files() -> None:
    """Inside ``mkdocs build``: hand the pages to mkdocs-gen-files (nothing is written to docs/)."""
    import mkdocs_gen_files

    for name, text in pages().items():
        with mkdocs_gen_files.open(name, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUTDIR")
    for path in write_to(Path(sys.argv[1])):
        print(path)
elif __name__ == "<run_path>":  # run by the mkdocs-gen-files plugin (runpy.run_path)
    write_with_gen_files()
