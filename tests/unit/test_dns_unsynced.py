"""Names under a zone whose registry has not synced yet: SERVFAIL, never NXDOMAIN (issue 12 finding 1).

A client caches NXDOMAIN; before the registry that owns a zone has synced (or been restored, or
timed out), "no such name" is a guess. Positive answers from what is known are still given.
"""

from __future__ import annotations

import dns.message
import dns.rcode

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId, Zone, ZoneFlavor
from discoveryd.supervisor import zones_for

CONSUL_SOURCE = SourceId("consul/dc1")
CONSUL = Zone(Hostname("consul"), ZoneFlavor.CONSUL, sources=(CONSUL_SOURCE,))
MESH = Zone(Hostname("mesh.local"))


def _ask(server: DnsServer, name: str, rdtype: str = "A") -> dns.message.Message:
    out = server.handle(dns.message.make_query(name, rdtype).to_wire(), "127.0.0.1", False)
    assert isinstance(out, bytes)
    return dns.message.from_wire(out)


async def test_negative_answers_under_an_unsynced_zone_are_servfail() -> None:
    index = Index([CONSUL_SOURCE, SourceId("files/local")])
    consul = index.writer(CONSUL_SOURCE)
    files = index.writer(SourceId("files/local"))
    consul.upsert(Service(Hostname("web.service.dc1.consul"), endpoints=(Endpoint("10.0.0.1"),)))
    files.mark_synced()
    server = DnsServer(DnsConfig(), index, [CONSUL, MESH])
    await server.sync()
    missing = _ask(server, "nope.service.dc1.consul.")
    assert missing.rcode() == dns.rcode.SERVFAIL
    assert not missing.flags & dns.flags.AA
    assert _ask(server, "web.service.dc1.consul.", "TXT").rcode() == dns.rcode.SERVFAIL  # NODATA too
    known = _ask(server, "web.service.dc1.consul.")
    assert known.rcode() == dns.rcode.NOERROR and known.answer
    # A zone without an unsynced registry answers NXDOMAIN as usual.
    assert _ask(server, "nope.mesh.local.").rcode() == dns.rcode.NXDOMAIN
    consul.mark_synced()
    await server.sync()
    assert _ask(server, "nope.service.dc1.consul.").rcode() == dns.rcode.NXDOMAIN


async def test_a_registry_past_its_ready_timeout_no_longer_blocks_its_zone() -> None:
    index = Index([CONSUL_SOURCE])
    consul = index.writer(CONSUL_SOURCE)
    server = DnsServer(DnsConfig(), index, [CONSUL])
    await server.sync()
    assert _ask(server, "nope.service.consul.").rcode() == dns.rcode.SERVFAIL
    consul.mark_failing("connection refused")
    await server.sync()
    assert _ask(server, "nope.service.consul.").rcode() == dns.rcode.SERVFAIL  # failing alone is not ready
    index.set_timed_out(CONSUL_SOURCE, True)
    await server.sync()
    assert _ask(server, "nope.service.consul.").rcode() == dns.rcode.NXDOMAIN


def test_zones_name_the_registries_that_fill_them() -> None:
    class Offers:
        def __init__(self, source: str, zone: str) -> None:
            self.source = SourceId(source)
            self._zone = zone

        def zones(self) -> list[Zone]:
            return [Zone(Hostname(self._zone), ZoneFlavor.CONSUL)]

    class Cfg:
        class dns:
            zones: list[str] = []

    zones = zones_for(Cfg(), [Offers("consul/a", "consul"), Offers("consul/b", "consul")])  # type: ignore[arg-type, list-item]
    assert zones == [Zone(Hostname("consul"), ZoneFlavor.CONSUL, sources=(SourceId("consul/a"), SourceId("consul/b")))]
