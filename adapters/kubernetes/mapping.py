"""Kubernetes Services and EndpointSlices → model `Service`s, as istiod maps them.

Pure functions over the raw JSON objects the API server sends (dicts from
orjson, never the client's generated models). The registry keeps what these
return (`ServiceInfo`, `SliceInfo`, compact and immutable) and joins them in
`build()` whenever a service, one of its slices or a node it runs on changed.

Mapping rules:
- hostname `<name>.<namespace>.svc.<domain>`; labels from the Service;
- ports: UDP from `protocol`; else the protocol from `appProtocol` (Istio's
  names, and `kubernetes.io/h2c` → HTTP2, `kubernetes.io/ws` → HTTP,
  `kubernetes.io/wss` → HTTPS); else from the port name's prefix (`http-`,
  `grpc-`, ...); SCTP ports are skipped. A numeric `targetPort` becomes the
  port's target; a named one is resolved per endpoint from its slice's ports;
- ClusterIP (`clusterIPs`, dual-stack) → VIPs, resolution STATIC;
  headless (`clusterIP: None`) → no VIP, resolution STATIC with the
  endpoints (EDS for proxies, per-endpoint DNS names); ExternalName → a
  MESH_EXTERNAL service resolved by DNS whose one endpoint is the external
  name (DNS answers a CNAME to it);
- EndpointSlices join their Service by the `kubernetes.io/service-name`
  label; IPv4 and IPv6 slices both count, FQDN slices are skipped (counted
  by the registry); the first address of an endpoint is used (they are
  fungible by the API's definition), duplicates across slices keep the
  healthiest;
- health: `ready` (unset = true) → HEALTHY; else the Service's
  `publishNotReadyAddresses` → HEALTHY; else `serving` and `terminating` →
  DRAINING; else UNHEALTHY;
- locality zone from `endpoints[].zone`, region and subzone from the node's
  labels (when nodes are read); `nodeName`, `targetRef` (`Kind/ns/name`),
  `hostname` (else the pod name when `endpoint_pod_names`) kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Location,
    Port,
    PortProtocol,
    Resolution,
    Service,
    SourceId,
    parse_protocol,
    protocol_from_port_name,
)
from discoveryd.naming import kubernetes as kubernetes_names

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
REGION_LABEL = "topology.kubernetes.io/region"
SUBZONE_LABEL = "topology.istio.io/subzone"

ServiceKey = tuple[str, str]
"""(namespace, name) of a Service."""

_APP_PROTOCOLS: dict[str, PortProtocol] = {
    "kubernetes.io/h2c": PortProtocol.HTTP2,
    "kubernetes.io/ws": PortProtocol.HTTP,
    "kubernetes.io/wss": PortProtocol.HTTPS,
}
_NO_LABELS: Mapping[str, str] = {}
"""Shared by every endpoint without labels; never mutated (the model's convention for mappings)."""
_HEALTH_RANK = {Health.HEALTHY: 0, Health.DRAINING: 1, Health.UNKNOWN: 2, Health.UNHEALTHY: 3}


class MappingError(ValueError):
    """An object that cannot be mapped; `field` is the path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def meta_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of any object; namespace `""` for cluster-scoped ones."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def service_hostname(name: str, namespace: str, domain: str) -> Hostname:
    return Hostname(kubernetes_names.service_name(name, namespace, domain).lower())


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A mapped Service without endpoints, and what building its endpoints needs."""

    template: Service
    publish_not_ready: bool = False
    external_name: str = ""


class SliceEndpoint(NamedTuple):
    """One endpoint of a slice, as `build` needs it (a tuple: tens of thousands are held and made per sync)."""

    address: str
    health: Health
    """Health ignoring `publishNotReadyAddresses` (applied in `build`)."""
    hostname: str
    zone: str
    node: str
    target_ref: str
    pod: str


@dataclass(frozen=True, slots=True)
class SliceInfo:
    service: ServiceKey
    endpoints: tuple[SliceEndpoint, ...]
    ports: Mapping[str, int]
    """Slice port name → number: the endpoints' `ports`, shared by all of them."""


def port_protocol(port: Mapping[str, Any]) -> PortProtocol | None:
    """A Service port's protocol by istiod's rules; None for a port that cannot be served (SCTP)."""
    transport = str(port.get("protocol") or "TCP").upper()
    if transport == "UDP":
        return PortProtocol.UDP
    if transport != "TCP":
        return None
    app = port.get("appProtocol")
    if isinstance(app, str) and app:
        found = _APP_PROTOCOLS.get(app.lower()) or parse_protocol(app)
        if found is not None and found is not PortProtocol.UDP:
            return found
    return protocol_from_port_name(str(port.get("name") or ""))


def parse_service(obj: Mapping[str, Any], domain: str, source: SourceId) -> ServiceInfo:
    """A Service object → its mapping; MappingError for what cannot be mapped."""
    namespace, name = meta_key(obj)
    if not name or not namespace:
        raise MappingError("metadata", "name and namespace are required")
    spec = obj.get("spec") or {}
    labels = (obj.get("metadata") or {}).get("labels") or {}
    ports: list[Port] = []
    seen: set[int] = set()
    for i, p in enumerate(spec.get("ports") or ()):
        number = p.get("port")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise MappingError(f"spec.ports[{i}].port", f"expected a port number, got {number!r}")
        protocol = port_protocol(p)
        if protocol is None or number in seen:
            continue
        seen.add(number)
        target = p.get("targetPort")
        ports.append(
            Port(
                number=number,
                name=str(p.get("name") or ""),
                protocol=protocol,
                target_port=target if isinstance(target, int) and 0 < target < 65536 else None,
            )
        )
    kind = spec.get("type") or "ClusterIP"
    host = service_hostname(name, namespace, domain)
    common: dict[str, Any] = {
        "hostname": host,
        "namespace": namespace,
        "ports": tuple(ports),
        "labels": dict(labels) if isinstance(labels, dict) else {},
        "source": source,
        "name": name,
    }
    if kind == "ExternalName":
        external = str(spec.get("externalName") or "").strip().rstrip(".").lower()
        if not external:
            raise MappingError("spec.externalName", "required for type ExternalName")
        template = Service(**common, resolution=Resolution.DNS, location=Location.MESH_EXTERNAL)
        return ServiceInfo(template, external_name=external)
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    vips = tuple(str(ip) for ip in ips if ip and ip != "None")
    template = Service(**common, addresses=vips, resolution=Resolution.STATIC)
    return ServiceInfo(template, publish_not_ready=bool(spec.get("publishNotReadyAddresses")))


_HEALTHY, _DRAINING, _UNHEALTHY = Health.HEALTHY, Health.DRAINING, Health.UNHEALTHY


def _health(conditions: Mapping[str, Any]) -> Health:
    ready = conditions.get("ready")
    if ready is None or ready is True:
        return _HEALTHY
    if conditions.get("serving") is True and conditions.get("terminating") is True:
        return _DRAINING
    return _UNHEALTHY


def parse_slice(obj: Mapping[str, Any]) -> SliceInfo | None:
    """An EndpointSlice → its endpoints, or None when it belongs to no Service or is an FQDN slice."""
    namespace, _ = meta_key(obj)
    labels = (obj.get("metadata") or {}).get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    ports = {}
    for p in obj.get("ports") or ():
        number = p.get("port")
        if isinstance(number, int) and 0 < number < 65536 and str(p.get("protocol") or "TCP").upper() != "SCTP":
            ports[str(p.get("name") or "")] = number
    endpoints: list[SliceEndpoint] = []
    append = endpoints.append
    for ep in obj.get("endpoints") or ():
        addresses = ep.get("addresses")
        if not addresses:
            continue
        ref = ep.get("targetRef")
        target_ref = pod = ""
        if ref:
            ref_kind, ref_name = ref.get("kind") or "", ref.get("name") or ""
            if ref_kind and ref_name:
                target_ref = f"{ref_kind}/{ref.get('namespace') or namespace}/{ref_name}"
                pod = ref_name if ref_kind == "Pod" else ""
        conditions = ep.get("conditions")
        # Values are JSON strings already (orjson); `or ""` only replaces null.
        append(
            SliceEndpoint(
                str(addresses[0]),
                _health(conditions) if conditions else _HEALTHY,
                ep.get("hostname") or "",
                ep.get("zone") or "",
                ep.get("nodeName") or "",
                target_ref,
                pod,
            )
        )
    return SliceInfo((namespace, str(service)), tuple(endpoints), ports)


def node_locality(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(region, subzone) from a Node's topology labels."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return str(labels.get(REGION_LABEL) or ""), str(labels.get(SUBZONE_LABEL) or "")


def _dns_label(name: str) -> bool:
    return 0 < len(name) <= 63 and name.replace("-", "a").isalnum() and name.isascii() and name[0] != "-"


def build(
    info: ServiceInfo,
    slices: Iterable[SliceInfo],
    *,
    nodes: Mapping[str, tuple[str, str]] | None = None,
    network: str = "",
    pod_names: bool = False,
) -> Service:
    """The Service with its endpoints from its slices. Runs for one service at a time: O(its endpoints)."""
    template = info.template
    source = template.source
    if info.external_name:
        ep = Endpoint(address=info.external_name, network=network, source=source)
        return dataclasses.replace(template, endpoints=(ep,))
    best: dict[str, Endpoint] = {}
    localities: dict[tuple[str, str, str], Locality] = {}
    for sl in slices:
        for se in sl.endpoints:
            health = Health.HEALTHY if info.publish_not_ready else se.health
            previous = best.get(se.address)
            if previous is not None and _HEALTH_RANK[previous.health] <= _HEALTH_RANK[health]:
                continue
            region, subzone = nodes.get(se.node, ("", "")) if nodes is not None and se.node else ("", "")
            key = (region, se.zone, subzone)
            locality = localities.get(key)
            if locality is None:
                locality = localities[key] = Locality(region, se.zone, subzone)
            label = se.hostname or (se.pod if pod_names and _dns_label(se.pod) else "")
            # Positional: several times cheaper than keywords on this path (the order of `Endpoint`'s fields).
            best[se.address] = Endpoint(
                se.address, sl.ports, _NO_LABELS, locality, 1, health, network, "", label, 0, source, (), se.node,
                se.target_ref,
            )  # fmt: skip
    return dataclasses.replace(template, endpoints=tuple(best[a] for a in sorted(best)))
