"""Consul's health rows → one mesh `Service`: pure functions, no I/O.

The registry hands `build` the decoded body of `/v1/health/service/<name>`
for one datacenter (a list of {Node, Service, Checks} rows, one per
instance) and gets back the `Service` to publish (None: no instance left)
and the problems found in the rows. The rules:

- Names: canonical `<name>.service.<dc>.<domain>`; in the agent's own
  datacenter also the alias `<name>.service.<domain>` (Consul's DNS answers
  both there). A name that is not a DNS label is skipped as a problem.
- Address: with `tagged_address` (lan/wan) the instance's own tagged address
  of that kind (`<kind>_ipv4`, `<kind>_ipv6`, `<kind>`), else the node's;
  otherwise, and as the fallback, `Service.Address`, else `Node.Address`.
  A tagged service address may carry its own port.
- Health: over every check of the row, node checks included. Any critical
  (maintenance mode is a critical check) → UNHEALTHY (kept for /debug,
  excluded from load balancing and DNS); any warning → weight
  `Weights.Warning`, and 0 there means UNHEALTHY too; otherwise weight
  `Weights.Passing`. Weights are clamped to 1..65535.
- Tags: kept in `Endpoint.tags` (DNS tag lookups); a `key=value` tag is
  also a label. `ServiceMeta` is merged into the labels (meta wins);
  `ServiceMeta.protocol` selects the port protocol (default TCP).
- One port, named after its protocol (`tcp`, `http`, `grpc`, ...), numbered
  with the port most instances use (the previous number while any instance
  still uses it: a stable cluster name); each endpoint maps it to its own port.
- Locality: region = datacenter, zone = the node meta key `zone_node_meta`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adapters.toolkit.names import is_dns_label
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Port,
    PortProtocol,
    Problem,
    Resolution,
    Service,
    SourceId,
    hostname,
    is_ip,
    parse_protocol,
)
from discoveryd.naming import consul as consul_names

_MAX_WEIGHT = 65535


@dataclass(frozen=True, slots=True)
class Naming:
    """What `build` needs to know about the registry (fixed for one registry's run)."""

    source: SourceId
    domain: str
    local_dc: str
    """The agent's own datacenter: its services also get the `<svc>.service.<domain>` alias."""
    tagged_address: str | None = None
    zone_node_meta: str = "zone"
    namespace: str = "default"
    tags: tuple[str, ...] = ()
    """Only instances carrying all of these."""


def names(service: str, dc: str, naming: Naming) -> tuple[Hostname, tuple[Hostname, ...]] | None:
    """(canonical hostname, aliases) of a Consul service, or None if its name cannot be a DNS label."""
    label = service.lower()
    if not is_dns_label(label):
        return None
    canonical = hostname(consul_names.canonical_name(label, dc, naming.domain))
    aliases = (hostname(consul_names.local_name(label, naming.domain)),) if dc == naming.local_dc else ()
    return canonical, aliases


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    return value if isinstance(value, str) else ""


def _map(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _weight(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return max(0, min(value, _MAX_WEIGHT))


def _health(checks: Any) -> str:
    """The worst status over all checks: `critical`, `warning` or `passing` (no checks: passing)."""
    worst = "passing"
    for check in checks if isinstance(checks, list) else ():
        status = _str(check, "Status") if isinstance(check, dict) else ""
        if status == "critical" or status not in ("passing", "warning"):
            return "critical"
        if status == "warning":
            worst = "warning"
    return worst


def _address(node: Mapping[str, Any], svc: Mapping[str, Any], kind: str | None) -> tuple[str, int | None]:
    """The instance's address and, when a tagged service address has one, its own port."""
    if kind is not None:
        tagged = _map(svc, "TaggedAddresses")
        for key in (f"{kind}_ipv4", f"{kind}_ipv6", kind):
            entry = _map(tagged, key)
            address = _str(entry, "Address")
            if address:
                port = entry.get("Port")
                return address, port if isinstance(port, int) and 0 < port <= 65535 else None
        node_tagged = _map(node, "TaggedAddresses")
        for key in (f"{kind}_ipv4", f"{kind}_ipv6", kind):
            address = _str(node_tagged, key)
            if address:
                return address, None
    return _str(svc, "Address") or _str(node, "Address"), None


@dataclass(frozen=True, slots=True)
class _Instance:
    endpoint: Endpoint
    port: int
    protocol: str


def _instance(row: Mapping[str, Any], dc: str, naming: Naming) -> _Instance | Problem | None:
    """One row's endpoint; a Problem when the row cannot be used; None when the tag filter leaves it out."""
    node, svc = _map(row, "Node"), _map(row, "Service")
    sid = _str(svc, "ID") or _str(svc, "Service")
    where = f"{_str(node, 'Node') or '?'}/{sid or '?'}"
    address, tagged_port = _address(node, svc, naming.tagged_address)
    if not address:
        return Problem(where=where, message="no address (neither Service.Address nor Node.Address)")
    port = svc.get("Port")
    if tagged_port is not None:
        port = tagged_port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        return Problem(where=where, message=f"port {port!r} is not 0-65535", field="Service.Port")
    raw_tags = svc.get("Tags")
    tags = tuple(t for t in raw_tags if isinstance(t, str)) if isinstance(raw_tags, list) else ()
    if not all(t in tags for t in naming.tags):
        return None
    labels: dict[str, str] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if sep and key:
            labels[key] = value
    meta = _map(svc, "Meta")
    labels.update((k, v) for k, v in meta.items() if isinstance(k, str) and isinstance(v, str))
    weights = _map(svc, "Weights")
    status = _health(row.get("Checks"))
    if status == "critical":
        health, weight = Health.UNHEALTHY, 1
    elif status == "warning":
        weight = _weight(weights.get("Warning"), 1)
        health = Health.HEALTHY if weight > 0 else Health.UNHEALTHY
    else:
        weight = _weight(weights.get("Passing"), 1)
        health = Health.HEALTHY if weight > 0 else Health.UNHEALTHY
    endpoint = Endpoint(
        address=address,
        labels=labels,
        locality=Locality(region=dc, zone=_str(_map(node, "Meta"), naming.zone_node_meta)),
        weight=max(weight, 1),
        health=health,
        source=naming.source,
        tags=tags,
        node_name=_str(node, "Node"),
    )
    return _Instance(endpoint, port, _str(meta, "protocol"))


def build(
    service: str, dc: str, rows: Any, naming: Naming, previous: Service | None = None
) -> tuple[Service | None, list[Problem]]:
    """The service for `service` in `dc` from its health rows, and the problems of rows that were skipped.

    None when the name is unusable or no row gives an instance (the service has none left). `previous`
    is the last service built for it: its port number is kept while any instance still uses it, so the
    cluster name (`outbound|<port>||<host>`) does not move when instances come and go.
    """
    named = names(service, dc, naming)
    if named is None:
        return None, [Problem(where=f"{dc}/{service}", message="the service name is not a DNS label; skipped")]
    if not isinstance(rows, list):
        return None, [Problem(where=f"{dc}/{service}", message="the health answer is not a list")]
    problems: list[Problem] = []
    instances: list[_Instance] = []
    for row in rows:
        if not isinstance(row, dict):
            problems.append(Problem(where=f"{dc}/{service}", message="a health row is not an object"))
            continue
        found = _instance(row, dc, naming)
        if isinstance(found, Problem):
            problems.append(Problem(f"{dc}/{found.where}", found.message, found.field))
        elif found is not None:
            instances.append(found)
    if not instances:
        return None, problems
    instances.sort(key=lambda i: (i.endpoint.node_name, i.endpoint.address, i.port))
    canonical, aliases = named

    protocol = PortProtocol.TCP
    named_protocols = Counter(i.protocol for i in instances if i.protocol)
    if named_protocols:
        name = min(named_protocols, key=lambda p: (-named_protocols[p], p))
        parsed = parse_protocol(name)
        if parsed is None:
            problems.append(
                Problem(f"{dc}/{service}", f"unknown protocol {name!r}; using TCP", field="ServiceMeta.protocol")
            )
        else:
            protocol = parsed
    numbers = Counter(i.port for i in instances if i.port)
    ports: tuple[Port, ...] = ()
    endpoints: Sequence[Endpoint]
    if numbers:
        kept = previous.ports[0].number if previous is not None and previous.ports else None
        number = kept if kept is not None and kept in numbers else min(numbers, key=lambda n: (-numbers[n], n))
        port = Port(number=number, name=protocol.value.lower(), protocol=protocol)
        ports = (port,)
        endpoints = [
            _with_port(i.endpoint, port.name, i.port) if i.port and i.port != port.number else i.endpoint
            for i in instances
        ]
    else:
        endpoints = [i.endpoint for i in instances]
    by_name = any(not is_ip(ep.address) for ep in endpoints)
    return (
        Service(
            hostname=canonical,
            aliases=aliases,
            namespace=naming.namespace,
            name=service,
            ports=ports,
            resolution=Resolution.DNS if by_name else Resolution.STATIC,
            source=naming.source,
            endpoints=tuple(endpoints),
        ),
        problems,
    )


def _with_port(ep: Endpoint, name: str, number: int) -> Endpoint:
    return replace(ep, ports={name: number})
