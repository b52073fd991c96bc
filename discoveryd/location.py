"""Where in its source a value came from: field paths, and YAML node → line.

`FieldPath` is a path into a document (`("spec", "ports", 1, "name")`),
`dotted` its display form (`spec.ports[1].name`), `yaml_line(node, path)`
the line of the deepest composed YAML node along it. Used for the config file's
errors and, through `adapters.toolkit.location`, by adapters.
"""

from __future__ import annotations

import re

import yaml

FieldPath = tuple[str | int, ...]
"""A path into an object: `("spec", "ports", 1, "name")`."""

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


def yaml_line(node: yaml.Node, path: FieldPath) -> int:
    """1-based line of the deepest node along `path` that exists (a mapping field: its key's line).

    A key given twice: the last occurrence, as in the constructed data.
    """
    line: int = node.start_mark.line + 1
    current: yaml.Node = node
    for part in path:
        nxt: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, nxt = key.start_mark.line + 1, value
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            nxt = current.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        current = nxt
    return line
