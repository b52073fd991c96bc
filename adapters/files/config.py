"""Configuration of a ServiceEntry file registry (`kind: files` in `registries:`).

The supervisor validates each `kind: files` entry with `FilesConfig`; the
registry resolves `paths` against the config file's directory
(`AdapterContext.base_dir`) when it is built, so that `check()` and `run()`
read the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from adapters.toolkit.names import domain_name, is_dns1123_label
from discoveryd.registry import RegistryConfig


class FilesConfig(RegistryConfig):
    """Files and directories of Istio ServiceEntry / WorkloadEntry YAML."""

    kind: Literal["files"]
    paths: list[str] = Field(min_length=1)
    """Files or directories (read recursively); relative to the config file; `~` is expanded."""
    namespace: str = "default"
    """The namespace of objects whose `metadata.namespace` is not set."""
    domain: str = "cluster.local"
    """The cluster domain a DestinationRule/VirtualService short host name resolves under
    (`<name>.<namespace>.svc.<domain>`, as Istio resolves it)."""

    @field_validator("paths")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        for i, p in enumerate(paths):
            if not p.strip():
                raise ValueError(f"paths[{i}] is empty")
        return paths

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not is_dns1123_label(value):
            raise ValueError(f"{value!r} is not a namespace name (a DNS-1123 label)")
        return value

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value)

    def resolved_paths(self, base_dir: Path) -> tuple[Path, ...]:
        """`paths` as absolute paths: `~` expanded, relative ones joined to `base_dir`."""
        out: list[Path] = []
        for p in self.paths:
            path = Path(os.path.expanduser(p.strip()))
            if not path.is_absolute():
                path = base_dir / path
            resolved = Path(os.path.normpath(path.absolute()))
            if resolved not in out:
                out.append(resolved)
        return tuple(out)
