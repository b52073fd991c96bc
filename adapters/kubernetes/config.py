"""Configuration of a Kubernetes registry (`kind: kubernetes` in `registries:`).

The supervisor validates each `kind: kubernetes` entry with `KubernetesConfig`.
The kubeconfig file named here is read when the registry connects (each
session), relative to the config file's directory, so a rotated credential
is picked up on the next reconnect; without `kubeconfig` the in-cluster
service account is used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from adapters.toolkit.backoff import check_backoff
from adapters.toolkit.names import domain_name, is_dns1123_label
from discoveryd.registry import Duration, RegistryConfig

_SELECTOR_WORD = re.compile(r"^[A-Za-z0-9_./!=(), -]*$")


class KubernetesConfig(RegistryConfig):
    """One Kubernetes cluster: where its API server is and what to read from it."""

    kind: Literal["kubernetes"]
    kubeconfig: Path | None = None
    """A kubeconfig file (`~` expanded); omitted: the in-cluster service account."""
    context: str | None = None
    """The kubeconfig context; omitted: its current-context."""
    domain: str = "cluster.local"
    """The cluster domain: services are `<name>.<namespace>.svc.<domain>`, and the DNS zone served."""
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to read; empty: all (one cluster-wide watch per kind)."""
    label_selector: str | None = None
    """Only Services matching this label selector (Kubernetes syntax, applied by the API server)."""
    watch_nodes: bool = False
    """Read Nodes for each endpoint's region/subzone (`topology.kubernetes.io/region`,
    `topology.istio.io/subzone`); needs get/list/watch on nodes."""
    istio: bool = True
    """Read Istio's ServiceEntry, WorkloadEntry, DestinationRule and VirtualService CRDs when they are installed."""
    pods: bool = False
    """Read Pods as workloads for ServiceEntries with a `workloadSelector` (needs get/list/watch on pods)."""
    istio_version: str = "v1"
    """The networking.istio.io API version read."""
    endpoint_pod_names: bool = False
    """Per-endpoint DNS names from the pod name when an endpoint has no `hostname` (CoreDNS's option)."""
    network: str = ""
    """The network recorded on every endpoint of this cluster (Istio multi-network); empty: none."""
    page_size: int = Field(default=500, ge=1, le=100_000)
    """Objects per list request (`limit`)."""
    watch_timeout: Duration = 300.0
    """`timeoutSeconds` asked for each watch; the stream ends cleanly then and is re-watched."""
    request_timeout: Duration = 30.0
    """Per list page, per watch connect, and the longest silence on a watch (bookmarks keep it talking)."""
    coalesce: Duration = 0.02
    """Under a stream of watch events, at most one index version per this interval (after a reserve of 4);
    what arrives meanwhile goes into the next one. Sparse events are published at once."""
    backoff_initial: Duration = 0.2
    backoff_max: Duration = 30.0
    crd_retry: Duration = 60.0
    """How often a missing CRD (Istio not installed) is looked for again."""

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value)

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for ns in value:
            if not is_dns1123_label(ns):
                raise ValueError(f"{ns!r} is not a namespace name (a DNS label)")
        return sorted(set(value))

    @field_validator("label_selector")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        if value is not None and not _SELECTOR_WORD.match(value):
            raise ValueError(f"{value!r} is not a label selector")
        return value or None

    @field_validator("istio_version")
    @classmethod
    def _istio_version(cls, value: str) -> str:
        if value not in ("v1", "v1beta1", "v1alpha3"):
            raise ValueError("expected v1, v1beta1 or v1alpha3")
        return value

    @model_validator(mode="after")
    def _check(self) -> KubernetesConfig:
        check_backoff(self.backoff_initial, self.backoff_max)
        if self.watch_timeout < 1:
            raise ValueError("watch_timeout must be at least 1s")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        return self
