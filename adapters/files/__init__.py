"""Istio ServiceEntry / WorkloadEntry files as a registry (`kind: files`).

See README.md in this directory for the config keys and behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.files.config import FilesConfig
from discoveryd.registry import AdapterContext, AdapterSpec, RegistryConfig

if TYPE_CHECKING:
    from adapters.files.registry import FilesRegistry

__all__ = ["ADAPTER", "FilesConfig", "FilesRegistry"]


def _factory(config: RegistryConfig, context: AdapterContext) -> FilesRegistry:
    if not isinstance(config, FilesConfig):
        raise TypeError(f"expected FilesConfig, got {type(config).__name__}")
    from adapters.files.registry import FilesRegistry  # the registry's imports: only once one is built

    return FilesRegistry(config, context)


ADAPTER = AdapterSpec(kind="files", config_model=FilesConfig, factory=_factory)


def __getattr__(name: str) -> Any:
    """`FilesRegistry`, imported when first asked for: reading a config needs only `ADAPTER` and the config model."""
    if name == "FilesRegistry":
        from adapters.files.registry import FilesRegistry

        return FilesRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
