"""What a registry's DNS naming rules see and write: the generic record sink, the rules' interface."""

from __future__ import annotations

import ipaddress
from typing import Protocol

from discoveryd.model import Hostname, Service, Zone

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class RecordSink(Protocol):
    """Collects one service's records (the DNS server's generic assembly); names that cannot go on the
    wire are left out by the sink, and PTR records are kept for the canonical hostname only."""

    def parse_ip(self, value: str) -> IP | None:
        """The address `value` spells, or None (a name, or not canonical)."""

    def address(self, owner: str, ip: IP) -> None:
        """An A or AAAA record."""

    def ptr(self, ip: IP, target: str) -> None:
        """A PTR record at the reverse name of `ip`."""

    def srv(self, owner: str, priority: int, weight: int, port: int, target: str) -> None:
        """An SRV record (values clamped to 0-65535)."""

    def txt(self, owner: str, text: bytes) -> None:
        """A TXT record of one string."""

    def plain(self, svc: Service, *, vip_srv_weight: int = 1, healthy_only: bool = False) -> None:
        """The generic rules for `svc.hostname`: its VIPs, else a CNAME, else its endpoints' addresses
        with a name per endpoint (`<hostname or a-b-c-d>.<host>`), PTR and SRV records.

        `vip_srv_weight` is the weight of the SRV records pointing at a VIP service's own name;
        `healthy_only` answers only HEALTHY endpoints (else every serving one: unknown health counts).
        """


class ZoneNaming(Protocol):
    """A registry's naming rules under its zones (chosen by `Zone.flavor`), like a CoreDNS plugin's."""

    def service(self, svc: Service, zone: Zone, out: RecordSink, canonical: Hostname) -> bool:
        """Write the records of `svc.hostname` (the hostname or one of its aliases) under `zone`.

        `canonical` is the service's own hostname (an alias's records may depend on it).
        Returns False when the name is not one these rules cover: the generic rules apply.
        """

    def zone(self, zone: Zone, out: RecordSink) -> None:
        """Records of the zone itself, besides its SOA and NS."""
