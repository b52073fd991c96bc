"""The Kubernetes registry: Services, EndpointSlices and Istio CRDs of one cluster, listed and watched.

The entry point `kubernetes = "adapters.kubernetes:ADAPTER"` makes
`kind: kubernetes` available in `registries:`; see README.md in this folder.
"""

from __future__ import annotations

from adapters.kubernetes.config import KubernetesConfig
from adapters.kubernetes.registry import KubernetesRegistry
from discoveryd.registry import AdapterContext, AdapterSpec

__all__ = ["ADAPTER", "KubernetesConfig", "KubernetesRegistry"]


def _create(config: KubernetesConfig, context: AdapterContext) -> KubernetesRegistry:
    return KubernetesRegistry(config, context.base_dir)


ADAPTER = AdapterSpec(kind="kubernetes", config_model=KubernetesConfig, factory=_create)
