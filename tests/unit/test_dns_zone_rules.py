"""Zone rules operators rely on (issue 11 finding 7): forwarded DNS-resolution hosts inside a zone,
and an SOA serial that moves with the content."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdatatype

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Resolution, Service, SourceId
from tests.fakes.dns import MESH

_SOURCE = SourceId("files/local")


def _ask(server: DnsServer, name: str, rdtype: str = "A") -> object:
    return server.handle(dns.message.make_query(name, rdtype).to_wire(), "127.0.0.1", False)


async def test_a_dns_serviceentry_without_endpoints_inside_a_zone_is_forwarded() -> None:
    index = Index()
    shard = index.writer(_SOURCE)
    shard.replace(
        [
            # Resolves its own host (no endpoints, or itself as the endpoint): not ours to answer.
            Service(Hostname("ext.mesh.local"), resolution=Resolution.DNS),
            Service(Hostname("self.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("self.mesh.local"),)),
            Service(Hostname("alias.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("ext.mesh.local"),)),
        ]
    )
    shard.mark_synced()
    refusing = DnsServer(DnsConfig(), index, [MESH])
    forwarding = DnsServer(DnsConfig(forward=["127.0.0.1:9"]), index, [MESH])
    for server in (refusing, forwarding):
        await server.sync()
    for name in ("ext.mesh.local.", "self.mesh.local."):
        out = _ask(refusing, name)
        assert isinstance(out, bytes) and dns.message.from_wire(out).rcode() == dns.rcode.REFUSED
        job = _ask(forwarding, name)
        assert not isinstance(job, bytes) and job is not None, "not handed to the forwarder"
    # A CNAME into such a name ends the chain there (a recursive client gets it chased).
    out = _ask(refusing, "alias.mesh.local.")
    assert isinstance(out, bytes)
    reply = dns.message.from_wire(out)
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer] == [
        "alias.mesh.local. 30 IN CNAME ext.mesh.local."
    ]
    # Other names in the zone stay ours.
    out = _ask(refusing, "nope.mesh.local.")
    assert isinstance(out, bytes) and dns.message.from_wire(out).rcode() == dns.rcode.NXDOMAIN
    # Given endpoints, the name has records again.
    shard.upsert(Service(Hostname("ext.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("10.0.0.7"),)))
    await refusing.sync()
    out = _ask(refusing, "ext.mesh.local.")
    assert isinstance(out, bytes) and [r.to_text() for r in dns.message.from_wire(out).answer] == [
        "ext.mesh.local. 30 IN A 10.0.0.7"
    ]


def _serial(server: DnsServer) -> int:
    out = _ask(server, "mesh.local.", "SOA")
    assert isinstance(out, bytes)
    return int(dns.message.from_wire(out).answer[0][0].serial)


async def test_soa_serial_moves_with_every_applied_change() -> None:
    index = Index()
    shard = index.writer(_SOURCE)
    shard.replace([Service(Hostname("a.mesh.local"), endpoints=(Endpoint("10.0.0.1"),))])
    server = DnsServer(DnsConfig(), index, [MESH])
    await server.sync()
    first = _serial(server)
    await server.sync()
    assert _serial(server) == first, "the serial moved without a change"
    for i in range(3):
        shard.upsert(Service(Hostname("a.mesh.local"), endpoints=(Endpoint(f"10.0.1.{i + 1}"),)))
        await server.sync()
        serial = _serial(server)
        assert serial > first, "the serial did not move with the content"
        first = serial


async def test_nodata_for_a_reverse_name_carries_its_network_soa() -> None:
    index = Index()
    shard = index.writer(_SOURCE)
    shard.replace(
        [
            Service(Hostname("a.mesh.local"), addresses=("10.0.0.1",)),
            Service(Hostname("b.mesh.local"), addresses=("fd00::1",)),
        ]
    )
    server = DnsServer(DnsConfig(), index, [MESH])
    await server.sync()
    for name, zone in (
        ("1.0.0.10.in-addr.arpa.", "0.0.10.in-addr.arpa."),
        (
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
            "0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
        ),
    ):
        out = _ask(server, name, "A")
        assert isinstance(out, bytes)
        reply = dns.message.from_wire(out)
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
        assert [rrset.name.to_text() for rrset in reply.authority] == [zone]
        assert reply.authority[0].rdtype == dns.rdatatype.SOA
        ptr = _ask(server, name, "PTR")
        assert isinstance(ptr, bytes) and dns.message.from_wire(ptr).answer
    # Another address of the network is not ours to deny: forwarded (here REFUSED), never NXDOMAIN.
    out = _ask(server, "9.0.0.10.in-addr.arpa.", "PTR")
    assert isinstance(out, bytes) and dns.message.from_wire(out).rcode() == dns.rcode.REFUSED
    shard.replace([Service(Hostname("b.mesh.local"), addresses=("fd00::1",))])
    await server.sync()
    assert server._authority.table.reverse_zone("1.0.0.10.in-addr.arpa") is None
