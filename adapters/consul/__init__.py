"""The Consul registry: services of one or more Consul datacenters, followed through blocking queries.

The entry point `consul = "adapters.consul:ADAPTER"` makes `kind: consul`
available in `registries:`; see README.md in this folder for the keys.
"""

from __future__ import annotations

from adapters.consul.config import ConsulConfig
from adapters.consul.registry import ConsulRegistry
from discoveryd.registry import AdapterContext, AdapterSpec

__all__ = ["ADAPTER", "ConsulConfig", "ConsulRegistry"]


def _create(config: ConsulConfig, context: AdapterContext) -> ConsulRegistry:
    return ConsulRegistry(config, context.base_dir)


ADAPTER = AdapterSpec(kind="consul", config_model=ConsulConfig, factory=_create)
