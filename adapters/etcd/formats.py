"""Key layouts: how one etcd key and its value become members of services.

The registry hands each key (relative to the configured prefix) and its value
to the configured `Format`, which returns the `Member`s the key contributes:
one endpoint (with its port) for each service it belongs to. The registry
groups members by hostname and calls `assemble` for every hostname whose
members changed. Formats are pure functions of one key; nothing here does I/O.

A value that cannot be used raises `FormatError`; the registry reports it
against the key and keeps everything else. Adding a layout (kratos, go-micro)
is one class with `parse` and an entry in `FORMATS`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.toolkit.hostport import split_hostport
from adapters.toolkit.names import is_dns_name
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Port,
    PortProtocol,
    Resolution,
    Service,
    SourceId,
    hostname,
    is_ip,
    parse_protocol,
)

_MAX_WEIGHT = 65535
"""Weights and priorities end up in 16-bit SRV fields."""


def valid_dns_name(name: str) -> bool:
    """A lower-case DNS name without trailing dot: labels of letters, digits, `-`, `_`."""
    return is_dns_name(name, underscore=True)


class FormatError(ValueError):
    """A value (or key) that does not follow the layout; `field` names the offending part."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Member:
    """What one etcd key contributes to one service."""

    service: Hostname
    name: str
    """The registry's own name for the service (etcd-naming target, SkyDNS name)."""
    endpoint: Endpoint
    port: Port | None
    """The service port this endpoint serves (its own number), or None (address only)."""
    by_name: bool = False
    """The endpoint's address is a DNS name, not an IP: the service is DNS-resolved."""


class Format(Protocol):
    def parse(self, key: str, value: bytes) -> tuple[Member, ...]:
        """Members for `key` (relative to the prefix); `()` when it defines no endpoint. Raises FormatError."""


@dataclass(frozen=True, slots=True)
class FormatSpec:
    default_prefix: str
    create: Callable[[Hostname, SourceId], Format]
    """Builds the format for a registry's `domain`; its endpoints carry the registry's `SourceId`."""


def assemble(host: Hostname, members: Sequence[tuple[str, Member]], source: SourceId) -> Service | None:
    """The service for `host` from its members, as (key, member), in key order, reported by `source`.

    Ports are merged by name; a port's number is the one most endpoints use
    (the lowest on a tie) and each endpoint maps the port name to its own
    number. A hostname among the endpoint addresses makes the service DNS-resolved.
    """
    if not members:
        return None
    numbers: dict[str, Counter[int]] = {}
    protocols: dict[str, PortProtocol] = {}
    for _, m in members:
        if m.port is not None:
            numbers.setdefault(m.port.name, Counter())[m.port.number] += 1
            protocols.setdefault(m.port.name, m.port.protocol)
    ports = tuple(
        Port(number=min(c, key=lambda n: (-c[n], n)), name=name, protocol=protocols[name])
        for name, c in sorted(numbers.items())
    )
    endpoints = tuple(m.endpoint for _, m in members)
    dns = any(m.by_name for _, m in members)
    return Service(
        hostname=host,
        name=members[0][1].name,
        ports=ports,
        resolution=Resolution.DNS if dns else Resolution.STATIC,
        endpoints=endpoints,
        source=source,
    )


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _int(doc: Mapping[str, Any], name: str, field: str, low: int, high: int, default: int) -> int:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"expected an integer {low}-{high}, got {value!r}", field)
    return value


def _str(doc: Mapping[str, Any], name: str, field: str) -> str:
    value = doc.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"expected a string, got {value!r}", field)
    return value


def _split_addr(addr: str) -> tuple[str, int]:
    """`10.0.0.1:8080`, `[fd00::1]:8080` → (ip, port)."""
    try:
        host, port = split_hostport(addr)
    except ValueError:
        raise FormatError(f"expected ip:port, got {addr!r}", "Addr") from None
    if not is_ip(host):
        raise FormatError(f"the host in {addr!r} must be an IP address", "Addr")
    return host, port


_HEALTH = {h.value.lower(): h for h in Health}


class EtcdNaming:
    """etcd's gRPC naming layout: `<prefix><service>/<id>` = `{"Op":0,"Addr":"ip:port","Metadata":{...}}`.

    Each key is one endpoint of `<service>.<domain>`. Metadata (any JSON; only
    an object is read) may carry `weight`, `region`/`zone`/`subzone`,
    `labels`, `protocol` (default gRPC), `health` and `network`. The port is
    named after its protocol (`grpc`, `http`, ...).
    """

    def __init__(self, domain: Hostname, source: SourceId) -> None:
        self._domain = domain
        self._source = source

    def parse(self, key: str, value: bytes) -> tuple[Member, ...]:
        service, _, instance = key.partition("/")
        if not service or not instance:
            raise FormatError("expected a key <prefix><service>/<id>")
        host = hostname(f"{service}.{self._domain}")
        if not valid_dns_name(host):
            raise FormatError(f"service {service!r} does not make a DNS name")
        doc = _json_object(value)
        if _int(doc, "Op", "Op", 0, 1, 0) != 0:
            raise FormatError("a stored endpoint must have Op 0 (Add)", "Op")
        addr = doc.get("Addr")
        if not isinstance(addr, str):
            raise FormatError("required, an ip:port string", "Addr")
        ip, number = _split_addr(addr)
        meta = doc.get("Metadata")
        meta = meta if isinstance(meta, dict) else {}

        protocol = PortProtocol.GRPC
        if proto_name := _str(meta, "protocol", "Metadata.protocol"):
            parsed = parse_protocol(proto_name)
            if parsed is None:
                raise FormatError(f"unknown protocol {proto_name!r}", "Metadata.protocol")
            protocol = parsed
        health = Health.HEALTHY
        if health_name := _str(meta, "health", "Metadata.health"):
            found = _HEALTH.get(health_name.lower())
            if found is None:
                raise FormatError(f"expected one of {', '.join(_HEALTH)}, got {health_name!r}", "Metadata.health")
            health = found
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise FormatError("expected an object of string values", "Metadata.labels")

        port = Port(number=number, name=protocol.value.lower(), protocol=protocol)
        endpoint = Endpoint(
            address=ip,
            ports={port.name: number},
            labels=dict(labels),
            locality=Locality(
                region=_str(meta, "region", "Metadata.region"),
                zone=_str(meta, "zone", "Metadata.zone"),
                subzone=_str(meta, "subzone", "Metadata.subzone"),
            ),
            weight=_int(meta, "weight", "Metadata.weight", 1, _MAX_WEIGHT, 1),
            health=health,
            network=_str(meta, "network", "Metadata.network"),
            source=self._source,
        )
        return (Member(service=host, name=service, endpoint=endpoint, port=port),)


class SkyDns:
    """SkyDNS/CoreDNS records: `<prefix><reversed labels>` = `{"host","port","priority","weight","ttl","text"}`.

    A key names a DNS name (`/skydns/local/mesh/api` is `api.mesh.local`; a
    trailing `/` names the directory itself). Its record is an endpoint of
    that name and, like CoreDNS's lookup one level down, of its parent when
    the parent is the zone (`domain`) or inside it: `/skydns/local/mesh/api/1`
    and `/2` make `api.mesh.local` answer with both (each endpoint carrying
    its label as `hostname`). A `host` that is an IP is an endpoint address;
    a name makes the service DNS-resolved. `priority` and `weight` are kept
    for SRV; `ttl` and text-only records are not modelled.
    """

    def __init__(self, domain: Hostname, source: SourceId) -> None:
        self._domain = domain
        self._source = source

    def _in_zone(self, name: str) -> bool:
        return name == self._domain or name.endswith("." + self._domain)

    def parse(self, key: str, value: bytes) -> tuple[Member, ...]:
        segments = key.split("/")
        leaf = True
        if segments[-1] == "":
            segments.pop()
            leaf = False
        if not segments or any(s == "" for s in segments):
            raise FormatError("expected a key <prefix><reversed labels>, without empty labels")
        labels = [s.lower() for s in reversed(segments)]
        name = hostname(".".join(labels))
        if not valid_dns_name(name):
            raise FormatError(f"{name!r} is not a DNS name")
        doc = _json_object(value)
        host = _str(doc, "host", "host").strip().rstrip(".").lower()
        if not host:
            if doc.get("text") is not None:
                return ()
            raise FormatError("required (an IP or a DNS name)", "host")
        by_name = not is_ip(host)
        if by_name and not valid_dns_name(host):
            raise FormatError(f"{host!r} is neither an IP nor a DNS name", "host")
        number = _int(doc, "port", "port", 0, 65535, 0)
        port = Port(number=number, name="tcp", protocol=PortProtocol.TCP) if number else None
        weight = _int(doc, "weight", "weight", 0, _MAX_WEIGHT, 0) or 1
        priority = _int(doc, "priority", "priority", 0, _MAX_WEIGHT, 0)
        endpoint = Endpoint(
            address=host,
            ports={"tcp": number} if number else {},
            weight=weight,
            priority=priority,
            source=self._source,
        )
        members = [Member(service=name, name=name, endpoint=endpoint, port=port, by_name=by_name)]
        parent = hostname(".".join(labels[1:]))
        if leaf and len(labels) > 1 and self._in_zone(parent):
            instance = Endpoint(
                address=host,
                ports=endpoint.ports,
                weight=weight,
                priority=priority,
                hostname=labels[0],
                source=self._source,
            )
            members.append(Member(service=parent, name=parent, endpoint=instance, port=port, by_name=by_name))
        return tuple(members)


FORMATS: Mapping[str, FormatSpec] = {
    "etcd-naming": FormatSpec(default_prefix="/services/", create=EtcdNaming),
    "skydns": FormatSpec(default_prefix="/skydns/", create=SkyDns),
}
