"""Field paths and YAML node → line: the daemon's own helpers (`discoveryd.location`)."""

from __future__ import annotations

from discoveryd.location import FieldPath, dotted, yaml_line

__all__ = ["FieldPath", "dotted", "yaml_line"]
