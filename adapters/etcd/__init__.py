"""The etcd registry: services registered in etcd (etcd naming or SkyDNS records), watched.

The entry point `etcd = "adapters.etcd:ADAPTER"` makes `kind: etcd` available
in `registries:`; see README.md in this folder for the keys and layouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.etcd.config import EtcdConfig
from discoveryd.registry import AdapterContext, AdapterSpec, RegistryConfig

if TYPE_CHECKING:
    from adapters.etcd.registry import EtcdRegistry

__all__ = ["ADAPTER", "EtcdConfig", "EtcdRegistry"]


def _create(config: RegistryConfig, context: AdapterContext) -> EtcdRegistry:
    if not isinstance(config, EtcdConfig):
        raise TypeError(f"expected an EtcdConfig, got {type(config).__name__}")
    from adapters.etcd.registry import EtcdRegistry  # the registry's imports: only once one is built

    return EtcdRegistry(config, context.base_dir)


ADAPTER = AdapterSpec(kind="etcd", config_model=EtcdConfig, factory=_create)


def __getattr__(name: str) -> Any:
    """`EtcdRegistry`, imported when first asked for: reading a config needs only `ADAPTER` and the config model."""
    if name == "EtcdRegistry":
        from adapters.etcd.registry import EtcdRegistry

        return EtcdRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
