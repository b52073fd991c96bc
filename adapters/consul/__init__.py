"""The Consul registry: services of one or more Consul datacenters, followed through blocking queries.

The entry point `consul = "adapters.consul:ADAPTER"` makes `kind: consul`
available in `registries:`; see README.md in this folder for the keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.consul.config import ConsulConfig
from discoveryd.registry import AdapterContext, AdapterSpec

if TYPE_CHECKING:
    from adapters.consul.registry import ConsulRegistry

__all__ = ["ADAPTER", "ConsulConfig", "ConsulRegistry"]


def _create(config: ConsulConfig, context: AdapterContext) -> ConsulRegistry:
    from adapters.consul.registry import ConsulRegistry  # the registry's imports: only once one is built

    return ConsulRegistry(config, context.base_dir)


ADAPTER = AdapterSpec(kind="consul", config_model=ConsulConfig, factory=_create)


def __getattr__(name: str) -> Any:
    """`ConsulRegistry`, imported when first asked for: reading a config needs only `ADAPTER` and the config model."""
    if name == "ConsulRegistry":
        from adapters.consul.registry import ConsulRegistry

        return ConsulRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
