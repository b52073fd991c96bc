"""Consul's DNS interface under a Consul domain.

A service is canonical `<svc>.service.<dc>.<domain>`, with the alias
`<svc>.service.<domain>` for the local datacenter (`Service.aliases`), as the
Consul adapter writes them (`canonical_name`, `local_name`). Under each:
`[tag.]<svc>.<suffix>` answers the passing instances (A/AAAA and SRV; tags
from `Endpoint.tags`), `_<svc>._<tag|tcp>.<suffix>` is the RFC 2782 SRV
form, and SRV targets are `<hex ip>.addr.<dc>.<domain>`, `<dc>` taken from
the canonical name (an alias without a datacenter points at the same
targets). Other names under the domain get the generic rules.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from discoveryd.model import Endpoint, Health, Hostname, Service, Zone
from discoveryd.naming.base import IP, RecordSink


def canonical_name(service: str, datacenter: str, domain: str) -> Hostname:
    """`<svc>.service.<dc>.<domain>`."""
    return Hostname(f"{service}.service.{datacenter}.{domain}")


def local_name(service: str, domain: str) -> Hostname:
    """`<svc>.service.<domain>`: the local datacenter's alias."""
    return Hostname(f"{service}.service.{domain}")


def hex_address(ip: str | IP) -> str:
    """Consul's `addr` label: the address as hex, `c000022a` for 192.0.2.42."""
    parsed = ip if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) else ipaddress.ip_address(ip)
    return parsed.packed.hex()


def name_parts(host: str, zone: Zone) -> tuple[str, str] | None:
    """(service, datacenter or "") of a Consul name `<svc>.service[.<dc>].<domain>`, else None."""
    rest = host[: -len(zone.name) - 1].split(".") if host.endswith("." + zone.name) else []
    if len(rest) in (2, 3) and rest[1] == "service":
        return rest[0], rest[2] if len(rest) == 3 else ""
    return None


class ConsulNaming:
    """The `ZoneNaming` of ZoneFlavor.CONSUL zones."""

    def service(self, svc: Service, zone: Zone, out: RecordSink, canonical: Hostname) -> bool:
        parts = name_parts(svc.hostname, zone)
        if parts is None:
            return False
        name = parts[0]
        suffix = svc.hostname[len(name) + 1 :]
        home = name_parts(canonical, zone)
        dc = (home[1] if home is not None else "") or parts[1]
        addr_suffix = f"addr.{dc}.{zone.name}" if dc else f"addr.{zone.name}"
        port = svc.ports[0] if svc.ports else None
        passing: list[tuple[Endpoint, IP, str]] = []
        for ep in svc.endpoints:
            ip = out.parse_ip(ep.address)
            if ep.health is Health.HEALTHY and ip is not None:
                target = f"{hex_address(ip)}.{addr_suffix}"
                passing.append((ep, ip, target))
                out.address(target, ip)
                out.ptr(ip, target)

        def answer(owner: str, members: list[tuple[Endpoint, IP, str]], *, addresses: bool) -> None:
            for ep, ip, target in members:
                if addresses:
                    out.address(owner, ip)
                if port is not None:
                    out.srv(owner, ep.priority, ep.weight, ep.port_for(port), target)

        tags: dict[str, list[tuple[Endpoint, IP, str]]] = defaultdict(list)
        for member in passing:
            for tag in dict.fromkeys(t.lower() for t in member[0].tags if t):
                tags[tag].append(member)
        answer(f"{name}.{suffix}", passing, addresses=True)
        answer(f"_{name}._tcp.{suffix}", passing, addresses=False)
        for tag, members in tags.items():
            answer(f"{tag}.{name}.{suffix}", members, addresses=True)
            answer(f"_{name}._{tag}.{suffix}", members, addresses=False)
        return True

    def zone(self, zone: Zone, out: RecordSink) -> None:
        return None


NAMING = ConsulNaming()
