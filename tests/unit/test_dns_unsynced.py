"""Names under a zone whose registry has not synced yet: SERVFAIL, never NXDOMAIN (issue 12 finding 1).

A client caches NXDOMAIN; before the registry that owns a zone has synced (or been restored, or
timed out), "no such name" is a guess. Positive answers from what is known are still given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId, Zone, ZoneFlavor
from discoveryd.supervisor import zones_for
from tests.helpers import eventually

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


def hold_builds(server: DnsServer) -> asyncio.Event:
    """Make `server`'s table builds wait until the returned event is set."""
    gate = asyncio.Event()
    build = server.sync

    async def held_build() -> None:
        await gate.wait()
        await build()

    server.sync = held_build  # type: ignore[method-assign]
    return gate


@contextlib.asynccontextmanager
async def serving_unbuilt(index: Index) -> AsyncIterator[tuple[DnsServer, asyncio.Event, str, int]]:
    """A server on the mesh zone that listens with its first table build held: (server, the gate
    that lets the build go on, host, port)."""
    server = DnsServer(DnsConfig(listen=["127.0.0.1:0"]), index, [MESH])
    gate = hold_builds(server)
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: bool(server.addresses), timeout=10, what="listening before the first build")
        host, port = server.addresses[0]
        yield server, gate, host, port
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def test_the_server_listens_and_answers_servfail_while_its_first_table_is_built() -> None:
    """After a restart the first build takes seconds at 100k names: a resolver that does not listen
    meanwhile fails every lookup, forwarded names included. Listening comes first; names under our
    zones are SERVFAIL (retried, never cached as absent) until the table holds the index."""
    index = Index([SourceId("files/local")])
    files = index.writer(SourceId("files/local"))
    files.upsert(Service(Hostname("web.mesh.local"), endpoints=(Endpoint("10.0.0.1"),)))
    files.upsert(Service(Hostname("api.example.com"), endpoints=(Endpoint("10.0.0.2"),)))  # in no zone
    files.mark_synced()
    async with serving_unbuilt(index) as (server, gate, host, port):
        for name in ("web.mesh.local.", "nope.mesh.local.", "API.example.com.", "1.0.0.10.in-addr.arpa."):
            rdtype = "PTR" if name.endswith("arpa.") else "A"
            reply = await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=5)
            assert reply.rcode() == dns.rcode.SERVFAIL, name
        # A name that cannot be ours is handled as always (no upstream here: refused).
        reply = await dns.asyncquery.udp(dns.message.make_query("example.org.", "A"), host, port=port, timeout=5)
        assert reply.rcode() == dns.rcode.REFUSED
        assert not server.started.is_set()
        gate.set()
        await asyncio.wait_for(server.started.wait(), 30)
        reply = await dns.asyncquery.udp(dns.message.make_query("web.mesh.local.", "A"), host, port=port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        reply = await dns.asyncquery.udp(dns.message.make_query("nope.mesh.local.", "A"), host, port=port, timeout=5)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        reply = await dns.asyncquery.udp(dns.message.make_query("api.example.com.", "A"), host, port=port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer


async def test_names_under_a_host_outside_every_zone_are_servfail_before_the_first_build() -> None:
    """A host outside every zone has records at names under it too (`_http._tcp.<host>` SRV, the
    per-endpoint `<address>.<host>`): before the first build they are not forwarded (an upstream
    "no such name" would be cached by the client) but SERVFAIL, like the host itself."""
    index = Index([SourceId("files/local")])
    files = index.writer(SourceId("files/local"))
    files.upsert(
        Service(
            Hostname("api.example.com"), ports=(Port(80, "http", PortProtocol.HTTP),), endpoints=(Endpoint("10.0.0.2"),)
        )
    )
    files.mark_synced()
    names = [("_http._tcp.api.example.com.", "SRV"), ("10-0-0-2.api.example.com.", "A")]
    async with serving_unbuilt(index) as (server, gate, host, port):
        for name, rdtype in names:
            reply = await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=5)
            assert reply.rcode() == dns.rcode.SERVFAIL, name
        gate.set()
        await asyncio.wait_for(server.started.wait(), 30)
        for name, rdtype in names:  # the names are the table's indeed
            reply = await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=5)
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer, name
