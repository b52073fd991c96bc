"""The values that flow from registries through the index to the servers.

Adapters build `Service` values (with their `Endpoint`s) and hand them to their
shard writer (see `discoveryd.registry`). The index merges them into a
`Snapshot`; the xDS and DNS servers read that. Everything here is immutable:
once a value has been handed over, nobody changes it, so a snapshot can be
shared by every connection and every task without copying or locking.

Mappings inside these values (`labels`, `Endpoint.ports`) are plain dicts by
convention never mutated after construction.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

SourceId = NewType("SourceId", str)
"""`<kind>/<name>` of a configured registry, e.g. `kubernetes/cluster1`."""

Hostname = NewType("Hostname", str)
"""A fully qualified name, lower case, without the trailing dot."""


def source_id(kind: str, name: str) -> SourceId:
    return SourceId(f"{kind}/{name}")


def hostname(name: str) -> Hostname:
    """Normalise a DNS name: lower case, no trailing dot."""
    return Hostname(name.strip().rstrip(".").lower())


class PortProtocol(StrEnum):
    """Port protocols, with Istio's names."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    HTTPS = "HTTPS"
    GRPC = "GRPC"
    GRPC_WEB = "GRPC-WEB"
    TCP = "TCP"
    TLS = "TLS"
    UDP = "UDP"
    MONGO = "MONGO"
    REDIS = "REDIS"
    MYSQL = "MYSQL"

    @property
    def is_http2(self) -> bool:
        return self in (PortProtocol.HTTP2, PortProtocol.GRPC, PortProtocol.GRPC_WEB)

    @property
    def is_udp(self) -> bool:
        return self is PortProtocol.UDP


# Port-name prefixes that select a protocol (Istio's protocol selection by name:
# `http`, `http-web`, `grpc-api`, ...). Kubernetes `appProtocol` wins over this.
_PREFIXES: dict[str, PortProtocol] = {
    "http": PortProtocol.HTTP,
    "http2": PortProtocol.HTTP2,
    "https": PortProtocol.HTTPS,
    "grpc": PortProtocol.GRPC,
    "grpc-web": PortProtocol.GRPC_WEB,
    "tcp": PortProtocol.TCP,
    "tls": PortProtocol.TLS,
    "udp": PortProtocol.UDP,
    "mongo": PortProtocol.MONGO,
    "redis": PortProtocol.REDIS,
    "mysql": PortProtocol.MYSQL,
}


def parse_protocol(value: str) -> PortProtocol | None:
    """A protocol from its name in any case (`http2`, `GRPC`, `grpc-web`), or None."""
    return _PREFIXES.get(value.strip().lower())


def protocol_from_port_name(name: str, default: PortProtocol = PortProtocol.TCP) -> PortProtocol:
    """Istio's selection by port name: `grpc-web` → GRPC-WEB, `http-api` → HTTP, `tcp` → TCP."""
    lowered = name.lower()
    if lowered.startswith("grpc-web"):
        return PortProtocol.GRPC_WEB
    prefix = lowered.split("-", 1)[0]
    return _PREFIXES.get(prefix, default)


class Resolution(StrEnum):
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"
    NONE = "NONE"


class Location(StrEnum):
    MESH_INTERNAL = "MESH_INTERNAL"
    MESH_EXTERNAL = "MESH_EXTERNAL"


class Health(StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    UNKNOWN = "UNKNOWN"

    @property
    def serving(self) -> bool:
        """Whether a client without a proxy should be handed this endpoint (DNS)."""
        return self in (Health.HEALTHY, Health.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    name: str
    protocol: PortProtocol = PortProtocol.TCP
    target_port: int | None = None
    """The port the workloads listen on, when it differs from `number`."""


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


NO_LOCALITY = Locality()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload instance of a service.

    `address` is an IP literal, a `unix://` path, or a hostname (for
    DNS-resolution services). `ports` maps a service port *name* to the port
    number on this endpoint; a port not listed here uses the service port's
    `target_port`, else its `number`.
    """

    address: str
    ports: Mapping[str, int] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: Locality = NO_LOCALITY
    weight: int = 1
    health: Health = Health.HEALTHY
    network: str = ""
    service_account: str = ""
    hostname: str = ""
    """Per-endpoint DNS label (Kubernetes pod hostname), `""` when none."""
    priority: int = 0
    """SRV priority (SkyDNS); lower is preferred."""
    source: SourceId = SourceId("")
    """The registry that reported this endpoint; set by the index on write."""
    tags: tuple[str, ...] = ()
    """Registry tags of this instance (Consul service tags), answered by DNS tag lookups."""
    node_name: str = ""
    """The node the workload runs on (Kubernetes `nodeName`, Consul node), `""` when unknown."""
    target_ref: str = ""
    """The object behind the endpoint, `Kind/namespace/name` (Kubernetes `targetRef`), `""` when none."""

    @property
    def is_ip(self) -> bool:
        return is_ip(self.address)

    def port_for(self, port: Port) -> int:
        """The number this endpoint serves `port` on."""
        found = self.ports.get(port.name)
        if found is not None:
            return found
        return port.target_port if port.target_port is not None else port.number


@dataclass(frozen=True, slots=True)
class Service:
    """A service as one registry (or, after merging, the index) sees it."""

    hostname: Hostname
    namespace: str = "default"
    ports: tuple[Port, ...] = ()
    addresses: tuple[str, ...] = ()
    """VIPs (ClusterIPs, ServiceEntry `addresses`); may hold CIDRs for NONE/STATIC."""
    resolution: Resolution = Resolution.STATIC
    location: Location = Location.MESH_INTERNAL
    labels: Mapping[str, str] = field(default_factory=dict)
    source: SourceId = SourceId("")
    endpoints: tuple[Endpoint, ...] = ()
    name: str = ""
    """The registry's own name for the object (ServiceEntry/Service name, Consul service)."""
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    aliases: tuple[Hostname, ...] = ()
    """Other names of the same service, answered by DNS like `hostname` (a Consul service's
    `<svc>.service.<domain>` next to its canonical `<svc>.service.<dc>.<domain>`). xDS names
    clusters after `hostname` only."""

    def port(self, number: int) -> Port | None:
        for p in self.ports:
            if p.number == number:
                return p
        return None

    def with_endpoints(self, endpoints: tuple[Endpoint, ...]) -> Service:
        return dataclasses.replace(self, endpoints=endpoints)

    @property
    def is_wildcard(self) -> bool:
        return self.hostname.startswith("*.")


_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)


def is_ip(value: str) -> bool:
    """An IPv4 or IPv6 literal (as `ipaddress.ip_address` reads it).

    Dotted-quad IPv4, the common case, is checked by a pattern of the same rules
    (no leading zeros, each octet at most 255): the xDS and DNS builds ask this of
    every endpoint, and the parser took half of a 50k-endpoint xDS build.
    """
    if _IPV4.fullmatch(value) is not None:
        return True
    if ":" not in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class Severity(StrEnum):
    """How bad an input problem is.

    ERROR: the object (or the field's part of it) was rejected; the last good version is served.
    WARNING: the object is served as written, but probably does not do what its author meant
    (as Istio's analyzer warns: a route to a subset no rule defines, a duplicate subset)."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """A problem with registry input: where it is and what is wrong.

    `where` is `file:line` for files, the key for etcd, the object for
    Kubernetes; `field` is the dotted path of the offending field, if any.
    """

    where: str
    message: str
    field: str = ""
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        message = f"warning: {self.message}" if self.severity is Severity.WARNING else self.message
        if self.field:
            return f"{self.where}: {self.field}: {message}"
        return f"{self.where}: {message}"


class ZoneFlavor(StrEnum):
    """Which naming rules the DNS server applies under a zone."""

    PLAIN = "plain"
    KUBERNETES = "kubernetes"
    CONSUL = "consul"


@dataclass(frozen=True, slots=True)
class Zone:
    """A DNS zone the daemon is authoritative for, and the naming rules under it."""

    name: Hostname
    flavor: ZoneFlavor = ZoneFlavor.PLAIN
    sources: tuple[SourceId, ...] = ()
    """The registries whose names live under the zone (set by the supervisor from the registries
    that offer it). Until every one of them is ready, DNS answers SERVFAIL instead of a negative
    answer under the zone; empty: the zone never waits."""
