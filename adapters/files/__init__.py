"""Istio ServiceEntry / WorkloadEntry files as a registry (`kind: files`).

See README.md in this directory for the config keys and behaviour.
"""

from __future__ import annotations

from adapters.files.config import FilesConfig
from adapters.files.registry import FilesRegistry
from discoveryd.registry import AdapterContext, AdapterSpec, RegistryConfig

__all__ = ["ADAPTER", "FilesConfig", "FilesRegistry"]


def _factory(config: RegistryConfig, context: AdapterContext) -> FilesRegistry:
    if not isinstance(config, FilesConfig):
        raise TypeError(f"expected FilesConfig, got {type(config).__name__}")
    return FilesRegistry(config, context)


ADAPTER = AdapterSpec(kind="files", config_model=FilesConfig, factory=_factory)
