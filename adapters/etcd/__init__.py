"""The etcd registry: services registered in etcd (etcd naming or SkyDNS records), watched.

The entry point `etcd = "adapters.etcd:ADAPTER"` makes `kind: etcd` available
in `registries:`; see README.md in this folder for the keys and layouts.
"""

from __future__ import annotations

from adapters.etcd.config import EtcdConfig
from adapters.etcd.registry import EtcdRegistry
from discoveryd.registry import AdapterContext, AdapterSpec, RegistryConfig

__all__ = ["ADAPTER", "EtcdConfig", "EtcdRegistry"]


def _create(config: RegistryConfig, context: AdapterContext) -> EtcdRegistry:
    if not isinstance(config, EtcdConfig):
        raise TypeError(f"expected an EtcdConfig, got {type(config).__name__}")
    return EtcdRegistry(config, context.base_dir)


ADAPTER = AdapterSpec(kind="etcd", config_model=EtcdConfig, factory=_create)
