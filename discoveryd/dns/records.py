"""DNS records, built in one place from the index snapshot.

Data flow: the server hands every snapshot (in full once, then only the
hostnames the index says changed) to `RecordTable`. For each service hostname
the table computes the records that service contributes (`service_records`),
keyed by owner name, and merges them into one map `owner name → type →
rdata`. `update()` returns the owner names whose content or existence changed,
which is exactly what the answer cache must forget.

Naming rules: a registry's own (Kubernetes service names, Consul's
interface) live in `discoveryd.naming`, chosen by the flavor of the zone a
name falls in; they write through the generic assembly here (`_Builder`, a
`RecordSink`). Every name they do not cover (ServiceEntry hosts, etcd names,
hosts outside every zone) gets the generic rules: VIPs if the service has any,
else a CNAME for DNS resolution with hostname endpoints, else the serving
endpoints' addresses, with per-endpoint names (`<hostname or a-b-c-d>.<host>`)
for SRV targets. `*.example.com` hosts own the wildcard name itself.

`Service.aliases` are answered exactly like the hostname, each under its own
zone's rules. Every IP we answer for also gets a PTR record at its reverse
name, naming the hostname (never an alias). Each zone
apex has SOA and NS records; the NS target `ns.dns.<zone>` resolves to the
addresses the server listens on.

Owner names are lower-case dotted strings without the trailing dot. A label
that contains a dot cannot come from the index; query names with such labels
are escaped by the caller and never match.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar, cast

from discoveryd import gcpause
from discoveryd.dns.message import AAAA, CNAME, NS, PTR, SOA, SRV, TXT, A, Named, Rdata, Soa, srv, txt
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Port,
    Resolution,
    Service,
    Zone,
)
from discoveryd.naming import naming_of
from discoveryd.naming.consul import hex_address as consul_hex  # noqa: F401 - the name callers and tests know

K = TypeVar("K")
V = TypeVar("V")

_STATIC = Hostname("")
"""Contributor key of the zone apex records (no service has an empty hostname)."""


class Node(tuple[int | Rdata, ...]):
    """The records at one owner name, flat: (type, rdata, type, rdata, ...), records of one type
    together, types in the order they were added.

    Immutable and compared by value; a name with one record is a tuple of two.
    """

    __slots__ = ()

    @classmethod
    def of(cls, by_type: Mapping[int, Iterable[Rdata]]) -> Node:
        flat: list[int | Rdata] = []
        for rtype, rdatas in by_type.items():
            for rdata in rdatas:
                flat += (rtype, rdata)
        return cls(flat)

    def get(self, rtype: int) -> tuple[Rdata, ...] | None:
        """The rdata of type `rtype`, in order, or None when there is none."""
        if len(self) == 2:
            return (cast(Rdata, self[1]),) if self[0] == rtype else None
        found = tuple(cast(Rdata, self[i + 1]) for i in range(0, len(self), 2) if self[i] == rtype)
        return found or None

    def types(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(cast("tuple[int, ...]", self[::2])))

    def records(self) -> Iterator[tuple[int, Rdata]]:
        for i in range(0, len(self), 2):
            yield cast(int, self[i]), cast(Rdata, self[i + 1])


EMPTY = Node()
"""The node of an empty non-terminal."""


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(value: str) -> IP | None:
    """The address `value` spells, or None. A canonical dotted quad takes a C fast path; anything
    else gets `ipaddress`'s rules."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
        if socket.inet_ntop(socket.AF_INET, packed) == value:
            return ipaddress.IPv4Address(packed)
    except OSError:
        pass
    if ":" in value and "%" not in value:
        try:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, value))
        except OSError:
            return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _parsed(ip: str | IP) -> IP:
    return ipaddress.ip_address(ip) if isinstance(ip, str) else ip


def reverse_name(ip: str | IP) -> str:
    parsed = _parsed(ip)
    if parsed.version == 6:
        return ".".join(parsed.packed.hex()[::-1]) + ".ip6.arpa"
    return parsed.reverse_pointer


def dashed(ip: str | IP) -> str:
    """The endpoint label Kubernetes DNS uses when an endpoint has no hostname: `10-0-0-1`."""
    parsed = _parsed(ip)
    if parsed.version == 4:
        return str(parsed).replace(".", "-")
    digits = parsed.packed.hex()
    return "-".join(digits[i : i + 4] for i in range(0, 32, 4))


def _u16(value: int) -> int:
    return min(max(value, 0), 0xFFFF)


def _srv_owner(port: Port, host: str) -> str | None:
    if not port.name:
        return None
    proto = "udp" if port.protocol.is_udp else "tcp"
    return f"_{port.name.lower()}._{proto}.{host}"


def _cname_target(svc: Service) -> str | None:
    """The external name of an ExternalName service or a DNS-resolution host with hostname endpoints.

    An endpoint that is the service's own name (a DNS ServiceEntry without
    endpoints resolves its host itself) is no alias: such a service has no
    records here, so the name is forwarded upstream, as Istio's DNS proxy does.
    """
    if svc.resolution not in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        return None
    for ep in svc.endpoints:
        if ep.health.serving and not ep.is_ip and "://" not in ep.address and ep.address:
            target = ep.address.rstrip(".").lower()
            if target != svc.hostname:
                return target
    return None


def encodable(name: str) -> bool:
    """Whether `name` fits the wire: labels of 1..63 bytes, 253 characters in all (the root is `""`)."""
    if not name:
        return True
    if len(name) > 253:
        return False
    if name.isascii():
        if len(name) <= 63:  # no label can be too long: only empty ones are wrong
            return name[0] != "." and name[-1] != "." and ".." not in name
        return all(0 < len(part) <= 63 for part in name.split("."))
    return all(0 < len(part) <= 63 for part in name.encode("ascii", "replace").split(b"."))


class _Builder:
    """Accumulates one service's records by owner name, leaving out names that cannot go on the wire.

    Equal rdata values (an endpoint's address at the service name and at its own name) are one object.
    """

    def __init__(self) -> None:
        self.ptrs = True
        """False while building an alias's records: PTR records name the canonical hostname only."""
        self.names: dict[str, dict[int, list[Rdata]]] = defaultdict(dict)
        self._packed: dict[IP, tuple[int, bytes]] = {}
        self._encodable: dict[str, bool] = {"": True}

    def _fits(self, name: str) -> bool:
        fits = self._encodable.get(name)
        if fits is None:
            fits = self._encodable[name] = encodable(name)
        return fits

    def add(self, owner: str, rtype: int, rdata: Rdata, target: str = "") -> None:
        if self._fits(owner) and self._fits(target):
            self.names[owner].setdefault(rtype, []).append(rdata)

    def address(self, owner: str, ip: IP) -> None:
        packed = self._packed.get(ip)
        if packed is None:
            packed = self._packed[ip] = (A if ip.version == 4 else AAAA, ip.packed)
        self.add(owner, *packed)

    def ptr(self, ip: IP, target: str) -> None:
        if self.ptrs:
            self.add(reverse_name(ip), PTR, Named(b"", target), target)

    def srv(self, owner: str, priority: int, weight: int, port: int, target: str) -> None:
        self.add(owner, SRV, srv(_u16(priority), _u16(weight), _u16(port), target), target)

    def cname(self, owner: str, target: str) -> None:
        self.add(owner, CNAME, Named(b"", target), target)

    def txt(self, owner: str, text: bytes) -> None:
        self.add(owner, TXT, txt(text))

    def parse_ip(self, value: str) -> IP | None:
        return parse_ip(value)

    def plain(self, svc: Service, *, vip_srv_weight: int = 1, healthy_only: bool = False) -> None:
        _plain(svc, self, vip_srv_weight=vip_srv_weight, healthy_only=healthy_only)

    def nodes(self) -> dict[str, Node]:
        """The records by owner name, each RRset without duplicates (an IP listed twice is one record)."""
        return {
            name: Node.of({t: dict.fromkeys(rdatas) if len(rdatas) > 1 else rdatas for t, rdatas in by_type.items()})
            for name, by_type in self.names.items()
        }


def service_records(
    svc: Service, zone: Zone | None, zone_of: Callable[[str], Zone | None] | None = None
) -> dict[str, Node]:
    """The records `svc` contributes, by owner name, under the naming rules of `zone` (None: outside every zone).

    Each of `svc.aliases` is answered exactly like the hostname, under the rules of its own zone
    (`zone_of`; without it, `zone` when the alias is under it); PTR records name the hostname only.
    A registry's naming rules get the canonical hostname with each alias (Consul's local alias keeps
    the canonical name's datacenter for its SRV targets).
    """
    b = _Builder()
    _one(svc, zone, b, svc.hostname)
    if svc.aliases:
        b.ptrs = False
        for alias in svc.aliases:
            if alias == svc.hostname:
                continue
            if zone_of is not None:
                alias_zone = zone_of(alias)
            else:
                alias_zone = (
                    zone if zone is not None and (alias == zone.name or alias.endswith("." + zone.name)) else None
                )
            _one(dataclasses.replace(svc, hostname=alias, aliases=()), alias_zone, b, svc.hostname)
    return b.nodes()


def _one(svc: Service, zone: Zone | None, b: _Builder, canonical: Hostname) -> None:
    if zone is not None:
        naming = naming_of(zone.flavor)
        if naming is not None and naming.service(svc, zone, b, canonical):
            return
    _plain(svc, b)


def _vips(svc: Service) -> list[IP]:
    return [ip for ip in (parse_ip(a) for a in svc.addresses) if ip is not None]


def _with_vips(svc: Service, vips: list[IP], b: _Builder, *, srv_weight: int) -> None:
    host = svc.hostname
    for ip in vips:
        b.address(host, ip)
        if not svc.is_wildcard:
            b.ptr(ip, host)
    if svc.is_wildcard:
        return
    for port in svc.ports:
        owner = _srv_owner(port, host)
        if owner is not None:
            b.srv(owner, 0, srv_weight, port.number, host)


def _with_endpoints(svc: Service, endpoints: Iterable[Endpoint], b: _Builder) -> None:
    """A/AAAA for each endpoint at the service name, plus a per-endpoint name, PTR and SRV records."""
    host = svc.hostname
    for ep in endpoints:
        ip = parse_ip(ep.address)
        if ip is None:
            continue
        b.address(host, ip)
        if svc.is_wildcard:
            continue
        name = f"{(ep.hostname or dashed(ip)).lower()}.{host}"
        b.address(name, ip)
        b.ptr(ip, name)
        for port in svc.ports:
            owner = _srv_owner(port, host)
            if owner is not None:
                b.srv(owner, ep.priority, ep.weight, ep.port_for(port), name)


def _plain(svc: Service, b: _Builder, *, vip_srv_weight: int = 1, healthy_only: bool = False) -> None:
    """VIPs, else a CNAME, else the endpoints' addresses (see `RecordSink.plain`).

    A registry's rules may set the SRV weight of a VIP service (Kubernetes: 100) and answer only
    HEALTHY endpoints (Kubernetes headless services: none ready leaves the name without records).
    """
    vips = _vips(svc)
    if vips:
        _with_vips(svc, vips, b, srv_weight=vip_srv_weight)
        return
    target = _cname_target(svc)
    if target is not None:
        b.cname(svc.hostname, target)
        return
    if healthy_only:
        _with_endpoints(svc, (ep for ep in svc.endpoints if ep.health is Health.HEALTHY), b)
    else:
        _with_endpoints(svc, (ep for ep in svc.endpoints if ep.health.serving), b)


def _network(name: str) -> str | None:
    """The reverse zone of the /24 (IPv4) or /64 (IPv6) network a reverse name lies in, or None."""
    if name.endswith(".in-addr.arpa"):
        parts = name.split(".")
        return ".".join(parts[-5:]) if len(parts) >= 5 else None
    if name.endswith(".ip6.arpa"):
        parts = name.split(".")
        return ".".join(parts[-18:]) if len(parts) >= 18 else None
    return None


def _count(shared: dict[int, dict[Rdata, int]], node: Node, step: int) -> None:
    """Add (step 1) or remove (step -1) one contributor's records to a shared name's counts."""
    for rtype, rdata in node.records():
        counts = shared.setdefault(rtype, {})
        left = counts.get(rdata, 0) + step
        if left > 0:
            counts[rdata] = left
        else:
            counts.pop(rdata, None)
            if not counts:
                del shared[rtype]


def _ancestors(name: str) -> Iterable[str]:
    """Proper ancestors of `name`, nearest first, ending with the root `""`."""
    while name:
        _, _, name = name.partition(".")
        yield name


_PARTS = 64


class Parts(Generic[K, V]):
    """A dict split in `_PARTS` dicts by key hash, so that growing it never copies more than
    1/`_PARTS` of it at once: a plain dict of 400k names doubles in one 50 ms step."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: tuple[dict[K, V], ...] = tuple({} for _ in range(_PARTS))

    def __getitem__(self, key: K) -> V:
        return self._parts[hash(key) & (_PARTS - 1)][key]

    def __setitem__(self, key: K, value: V) -> None:
        self._parts[hash(key) & (_PARTS - 1)][key] = value

    def __delitem__(self, key: K) -> None:
        del self._parts[hash(key) & (_PARTS - 1)][key]

    def __contains__(self, key: object) -> bool:
        return key in self._parts[hash(key) & (_PARTS - 1)]

    def __len__(self) -> int:
        return sum(map(len, self._parts))

    def __iter__(self) -> Iterator[K]:
        for part in self._parts:
            yield from part

    def get(self, key: K) -> V | None:
        return self._parts[hash(key) & (_PARTS - 1)].get(key)

    def pop(self, key: K) -> V | None:
        return self._parts[hash(key) & (_PARTS - 1)].pop(key, None)

    def setdefault(self, key: K, default: V) -> V:
        return self._parts[hash(key) & (_PARTS - 1)].setdefault(key, default)

    def items(self) -> Iterator[tuple[K, V]]:
        for part in self._parts:
            yield from part.items()


class RecordTable:
    """Owner name → type → records, for every service in the snapshot plus the zone apexes.

    Owned by one `DnsServer`; written only by its index-sync task, read by its packet handlers on
    the same loop. Every write costs O(the records of the hostnames written), never O(the other
    contributors of a shared name): a name many services share (the reverse name of an ingress IP)
    keeps a reference count per record, and its merged node is rebuilt on the first read after a
    change, which costs what answering that name costs anyway.
    """

    def __init__(self, zones: Sequence[Zone], ttl: int, ns_addresses: Sequence[str], serial: int) -> None:
        self.ttl = ttl
        self.zones = tuple(sorted(zones, key=lambda z: -len(z.name)))
        self._serial = serial
        self._ns_addresses = tuple(ns_addresses)
        self._networks: dict[str, int] = {}
        """Reverse zone name of a network → how many reverse names we hold in it."""
        self.forwarded: set[Hostname] = set()
        """Hostnames of DNS-resolution services that contribute no records (a ServiceEntry
        resolving its own host, no endpoints): their names are forwarded, also inside a zone."""
        self.unready: frozenset[str] = frozenset()
        """Zones (by name) with a registry not ready yet: negative answers under them are SERVFAIL.
        Set by the server's sync task from each snapshot's shard status."""
        # Per hostname, its records flat: (name, node, name, node, ...); a third of a dict's size.
        self._contributions: Parts[Hostname, tuple[str | Node, ...]] = Parts()
        self._names: Parts[str, Node] = Parts()
        # One hostname, or a set of several: most names have a single contributor.
        self._contributors: Parts[str, Hostname | set[Hostname]] = Parts()
        # Names with several contributors: type → rdata → how many contributors hold it, in the
        # order first added. `_stale` holds those whose node in `_names` is out of date.
        self._shared: Parts[str, dict[int, dict[Rdata, int]]] = Parts()
        self._stale: set[str] = set()
        # Name → how many of its direct children own records or have descendants (absent: none).
        self._below: Parts[str, int] = Parts()
        self._set(_STATIC, self._zone_records())

    # -- lookups ----------------------------------------------------------------------

    def zone_of(self, name: str) -> Zone | None:
        """The most specific zone `name` is at or under."""
        for zone in self.zones:
            z = zone.name
            if name == z or name.endswith("." + z) or not z:
                return zone
        return None

    def node(self, name: str) -> Node | None:
        """The records at `name` by type, or None when no records are owned there."""
        if self._stale and name in self._stale:
            return self._refresh(name)
        return self._names.get(name)

    def has_descendants(self, name: str) -> bool:
        """Some owner name lies strictly below `name` (so `name` exists, at least as an empty non-terminal)."""
        return name in self._below

    def soa(self, zone: Zone) -> Soa:
        return Soa(
            f"ns.dns.{zone.name}" if zone.name else "ns.dns",
            f"hostmaster.{zone.name}" if zone.name else "hostmaster",
            self._serial,
            7200,
            1800,
            86400,
            self.ttl,
        )

    def names(self) -> int:
        return len(self._names)

    def owners(self) -> dict[str, Node]:
        """Every owner name with its current node (for tests and debugging: O(names))."""
        for name in list(self._stale):
            self._refresh(name)
        return dict(self._names.items())

    # -- updates ----------------------------------------------------------------------

    def load(self, services: Mapping[Hostname, Service]) -> None:
        """Replace every service's records (first snapshot, lost history, zones changed).

        The cyclic garbage collector is paused meanwhile: the build makes no reference cycles, and
        collections triggered by its allocations would rescan the growing table (40% of the time).
        """
        with gcpause.paused():
            for host in [h for h in self._contributions if h != _STATIC]:
                self._set(host, {})
            self.forwarded.clear()
            for svc in services.values():
                records = service_records(svc, self.zone_of(svc.hostname), self.zone_of)
                self._set(svc.hostname, records)
                self._note_forwarded(svc.hostname, svc, records)

    def update(self, services: Mapping[Hostname, Service], changed: Iterable[Hostname]) -> set[str]:
        """Apply the changed hostnames; return the owner names whose records or existence changed."""
        affected: set[str] = set()
        for host in changed:
            svc = services.get(host)
            new = service_records(svc, self.zone_of(host), self.zone_of) if svc is not None else {}
            affected |= self._set(host, new)
            if self._note_forwarded(host, svc, new):
                affected.add(host)
        return affected

    def _note_forwarded(self, host: Hostname, svc: Service | None, records: dict[str, Node]) -> bool:
        """Track `host` in `forwarded`; True when that changed."""
        forward = (
            svc is not None
            and not records
            and not svc.is_wildcard
            and svc.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
        )
        if forward == (host in self.forwarded):
            return False
        if forward:
            self.forwarded.add(host)
        else:
            self.forwarded.discard(host)
        return True

    def set_serial(self, serial: int) -> set[str]:
        """Put `serial` in every zone's SOA; return the apex names whose records changed."""
        if serial == self._serial:
            return set()
        self._serial = serial
        return self._set(_STATIC, self._zone_records())

    @property
    def serial(self) -> int:
        return self._serial

    def _set(self, host: Hostname, records: dict[str, Node]) -> set[str]:
        flat = self._contributions.pop(host) or ()
        if records:
            self._contributions[host] = tuple(item for pair in records.items() for item in pair)
        if flat:
            old = dict(zip(cast("tuple[str, ...]", flat[::2]), cast("tuple[Node, ...]", flat[1::2]), strict=True))
            touched = {n for n in old if old[n] != records.get(n)} | {n for n in records if n not in old}
        else:
            old, touched = {}, set(records)
        contributors, below = self._contributors, self._below
        for name in touched:
            existed = name in contributors
            self._apply(name, host, old.get(name), records.get(name))
            if existed != (name in contributors):
                if not below.get(name):
                    self._propagate(name, 1 if not existed else -1)
                if name.endswith(".arpa"):
                    self._count_network(name, 1 if not existed else -1)
        return touched

    def _count_network(self, name: str, step: int) -> None:
        """A reverse name appeared (1) or went (-1): count it for its network's reverse zone."""
        network = _network(name)
        if network is None:
            return
        left = self._networks.get(network, 0) + step
        if left > 0:
            self._networks[network] = left
        else:
            self._networks.pop(network, None)

    def reverse_zone(self, name: str) -> Zone | None:
        """The reverse zone (/24 for IPv4, /64 for IPv6) of a reverse name, when we hold a name in it.

        Such zones are partial: names we hold get answers, and a NODATA among them carries the
        network's SOA (RFC 2308); names we do not hold there are not ours (forwarded), since the
        index is no authority for the other addresses of the network.
        """
        network = _network(name)
        if network is None or network not in self._networks:
            return None
        return Zone(Hostname(network))

    def _propagate(self, name: str, step: int) -> None:
        """`name` turned present (step 1) or absent (-1); update the counts of its ancestors.

        `_below[n]` counts the direct children of `n` that are present (own records or have
        descendants), so the walk stops at the first ancestor whose own presence does not change.
        """
        contributors, below = self._contributors, self._below
        while name:
            _, _, parent = name.partition(".")
            was = parent in contributors or parent in below
            left = (below.get(parent) or 0) + step
            if left:
                below[parent] = left
            else:
                del below[parent]
            if was == (parent in contributors or parent in below):
                return
            name = parent

    def _apply(self, name: str, host: Hostname, old: Node | None, new: Node | None) -> None:
        """Replace `host`'s contribution `old` at `name` with `new` (either may be None). O(len(old) + len(new))."""
        current = self._contributors.get(name)
        if current is None or current == host:
            if new is None:
                self._contributors.pop(name)
                self._names.pop(name)
            else:
                self._contributors[name] = host
                self._names[name] = new
            return
        shared = self._shared.get(name)
        if isinstance(current, str):  # a second contributor arrives
            if new is None:
                return
            other = self._contribution(current, name)
            shared = self._shared[name] = {}
            _count(shared, other, 1)
            current = self._contributors[name] = {current}
        assert shared is not None
        if old is not None:
            _count(shared, old, -1)
            current.discard(host)
        if new is not None:
            _count(shared, new, 1)
            current.add(host)
        if len(current) == 1:  # back to one contributor: its own node, no counts
            (last,) = current
            self._contributors[name] = last
            self._names[name] = self._contribution(last, name)
            del self._shared[name]
            self._stale.discard(name)
        else:
            self._names.setdefault(name, EMPTY)
            self._stale.add(name)

    def _refresh(self, name: str) -> Node:
        """Rebuild a shared name's node from its counts (on the first read after a change)."""
        self._stale.discard(name)
        node = self._names[name] = Node.of(self._shared[name])
        return node

    def _contribution(self, host: Hostname, name: str) -> Node:
        flat = self._contributions[host]
        return cast(Node, flat[2 * flat[::2].index(name) + 1])

    def _zone_records(self) -> dict[str, Node]:
        b = _Builder()
        for zone in self.zones:
            ns = f"ns.dns.{zone.name}" if zone.name else "ns.dns"
            b.add(zone.name, SOA, self.soa(zone))
            b.add(zone.name, NS, Named(b"", ns))
            for ip in self._ns_addresses:
                b.address(ns, ipaddress.ip_address(ip))
            naming = naming_of(zone.flavor)
            if naming is not None:
                naming.zone(zone, b)
        return b.nodes()
