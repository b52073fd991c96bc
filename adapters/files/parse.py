"""YAML text → Kubernetes-style documents that can point at the line of any of their fields.

`parse_documents(file, text)` splits a multi-document YAML (or JSON) stream
into `Document`s, unwrapping `kind: List` into its `items`. Each document
keeps its composed YAML node, so that a later check can turn a field path
such as `("spec", "ports", 1, "name")` into `file:line` and
`spec.ports[1].name` (`Document.problem`). Nothing here knows what a
ServiceEntry is; `validate` does.

Input is untrusted: syntax errors, duplicate mapping keys and non-mapping
documents are returned as `Problem`s, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from discoveryd.model import Problem

FieldPath = tuple[str | int, ...]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def dotted(path: FieldPath) -> str:
    """`("spec", "ports", 1, "name")` → `spec.ports[1].name`; odd map keys are quoted: `labels["app/x"]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]".replace("'", '"')
    return out


def _line_of(node: yaml.Node, path: FieldPath) -> int:
    """1-based line of the deepest node along `path` that exists (a mapping field: its key's line)."""
    line: int = node.start_mark.line + 1
    current: yaml.Node = node
    for part in path:
        nxt: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode) and isinstance(part, str):
            for key, value in current.value:  # the last occurrence wins, as in the constructed data
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    line, nxt = key.start_mark.line + 1, value
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            nxt = current.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        current = nxt
    return line


@dataclass(frozen=True, slots=True)
class Document:
    """One object of a file: its data, and where it came from."""

    file: str
    data: dict[str, Any]
    node: yaml.Node
    prefix: FieldPath = ()
    """The path of this object in its document (`("items", 3)` inside a `kind: List`)."""

    def where(self, path: FieldPath = ()) -> str:
        return f"{self.file}:{_line_of(self.node, path)}"

    def field(self, path: FieldPath) -> str:
        return dotted(self.prefix + path)

    def problem(self, path: FieldPath, message: str) -> Problem:
        return Problem(where=self.where(path), message=message, field=self.field(path))


def _duplicate_keys(file: str, root: yaml.Node) -> list[Problem]:
    """Mapping keys given twice: Kubernetes rejects them, PyYAML would silently keep the last."""
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # aliases share nodes, and may be recursive
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if key.value in keys:
                    problems.append(
                        Problem(
                            f"{file}:{line}", f"duplicate key {key.value!r} (first given on line {keys[key.value]})"
                        )
                    )
                else:
                    keys[key.value] = line
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return problems


def _yaml_error(file: str, e: yaml.YAMLError) -> Problem:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    reason = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return Problem(f"{file}{line}", f"invalid YAML: {reason}" + (f" ({context})" if context else ""))


def parse_documents(file: str, text: str) -> tuple[list[Document], list[Problem]]:
    """Every object in `text`, in order; or the problems that make the file unusable.

    Empty documents are skipped. A `kind: List` contributes its `items`.
    """
    documents: list[Document] = []
    problems: list[Problem] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            duplicates = _duplicate_keys(file, node)
            if duplicates:
                problems.extend(duplicates)
                continue
            data = loader.construct_document(node)
            _collect(file, data, node, documents, problems)
    except yaml.YAMLError as e:
        problems.append(_yaml_error(file, e))
    except RecursionError:
        problems.append(Problem(f"{file}:1", "invalid YAML: nested too deeply"))
    finally:
        loader.dispose()
    return documents, problems


def _collect(file: str, data: Any, node: yaml.Node, out: list[Document], problems: list[Problem]) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        what = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        problems.append(
            Problem(f"{file}:{node.start_mark.line + 1}", f"a document must be an object (a mapping), not {what}")
        )
        return
    doc = Document(file, data, node)
    if data.get("kind") != "List":
        out.append(doc)
        return
    items = data.get("items")
    if items is None:
        return
    if not isinstance(items, list):
        problems.append(doc.problem(("items",), "must be a list of objects"))
        return
    items_node: yaml.Node | None = None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:  # the last occurrence wins, as in the constructed data
            if isinstance(key, yaml.ScalarNode) and key.value == "items":
                items_node = value
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(doc.problem(("items", i), "must be an object (a mapping)"))
            continue
        item_node = node
        if isinstance(items_node, yaml.SequenceNode) and i < len(items_node.value):
            item_node = items_node.value[i]
        if item.get("kind") == "List":
            problems.append(doc.problem(("items", i, "kind"), "a List cannot contain another List"))
            continue
        out.append(Document(file, item, item_node, ("items", i)))
