"""The DNS server end to end: dnspython over UDP and TCP against a real server on 127.0.0.1.

`CASES` is the table (query → rcode, flags, answer, authority, additional), run over both
transports against one index holding Kubernetes, Consul, plain-zone and out-of-zone services.
The tests below it cover the rules a table row cannot express (EDNS, truncation, TCP
connection handling, index changes, zone changes).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import REGISTRY

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer, udp
from discoveryd.index import Index
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Port,
    PortProtocol,
    Resolution,
    Service,
    SourceId,
    Zone,
    ZoneFlavor,
)
from tests.fakes.dns import CLUSTER, ask, raw_udp, rrs, running, upstream_server
from tests.helpers import eventually

SOA_CLUSTER = "cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {serial} 7200 1800 86400 30"
SOA_CONSUL = "consul. 30 IN SOA ns.dns.consul. hostmaster.consul. {serial} 7200 1800 86400 30"
SOA_MESH = "mesh.local. 30 IN SOA ns.dns.mesh.local. hostmaster.mesh.local. {serial} 7200 1800 86400 30"


def _ep(address: str, **kw: object) -> Endpoint:
    return Endpoint(address, **kw)  # type: ignore[arg-type]


def k8s_services() -> list[Service]:
    return [
        Service(
            Hostname("web.default.svc.cluster.local"),
            addresses=("10.96.0.10",),
            ports=(Port(80, "http"), Port(53, "dns", PortProtocol.UDP)),
            endpoints=(_ep("10.1.1.1"),),
        ),
        Service(Hostname("v6.default.svc.cluster.local"), addresses=("fd00::10",), ports=(Port(80, "http"),)),
        Service(
            Hostname("db.default.svc.cluster.local"),
            ports=(Port(5432, "pg"),),
            endpoints=(
                _ep("10.1.0.1", hostname="db-0", ports={"pg": 15432}),
                _ep("10.1.0.2"),
                _ep("10.1.0.3", hostname="db-2", health=Health.UNHEALTHY),
            ),
        ),
        Service(
            Hostname("empty.default.svc.cluster.local"),
            ports=(Port(80, "http"),),
            endpoints=(_ep("10.1.2.1", health=Health.UNHEALTHY),),
        ),
        Service(
            Hostname("ext.default.svc.cluster.local"),
            resolution=Resolution.DNS,
            endpoints=(_ep("api.example.org"),),
        ),
    ]


def consul_services() -> list[Service]:
    # As the Consul adapter writes them: canonical name with the datacenter, the local alias, typed tags.
    return [
        Service(
            Hostname("redis.service.dc1.consul"),
            aliases=(Hostname("redis.service.consul"),),
            ports=(Port(6379, "redis"),),
            endpoints=(
                _ep("10.2.0.1", tags=("primary",)),
                _ep("10.2.0.2", tags=("replica",), ports={"redis": 7000}),
                _ep("10.2.0.3", tags=("replica",), health=Health.UNHEALTHY),
            ),
        )
    ]


def plain_services() -> list[Service]:
    return [
        Service(
            Hostname("users.mesh.local"),
            ports=(Port(9090, "grpc", PortProtocol.GRPC),),
            endpoints=(
                _ep("10.3.0.1", weight=10),
                _ep("10.3.0.2", weight=5, priority=1),
                _ep("10.3.0.3", health=Health.DRAINING),
            ),
        ),
        Service(
            Hostname("big.mesh.local"),
            endpoints=tuple(_ep(f"10.5.{i // 250}.{i % 250 + 1}") for i in range(100)),
        ),
        Service(
            Hostname("alias.mesh.local"),
            resolution=Resolution.DNS,
            endpoints=(_ep("users.mesh.local"),),
        ),
    ]


def outside_services() -> list[Service]:
    return [
        Service(
            Hostname("api.stripe.com"),
            addresses=("240.240.0.1",),
            ports=(Port(443, "https", PortProtocol.TLS),),
            resolution=Resolution.DNS,
        ),
        Service(Hostname("*.wild.example.com"), endpoints=(_ep("10.4.0.1"),)),
        Service(
            Hostname("legacy.example.net"),
            resolution=Resolution.DNS,
            endpoints=(_ep("legacy-backend.example.net"),),
        ),
    ]


def fill(index: Index) -> None:
    for source, services in (
        ("kubernetes/c1", k8s_services()),
        ("consul/dc1", consul_services()),
        ("etcd/main", plain_services()),
        ("files/local", outside_services()),
    ):
        shard = index.writer(SourceId(source))
        shard.replace(services)
        shard.mark_synced()


@pytest.fixture
async def server(index: Index) -> AsyncIterator[DnsServer]:
    fill(index)
    async with running(index) as srv:
        yield srv


@dataclass(frozen=True)
class Case:
    qname: str
    qtype: str
    rcode: int = dns.rcode.NOERROR
    answer: tuple[str, ...] = ()
    authority: tuple[str, ...] = ()
    additional: tuple[str, ...] = ()
    aa: bool = True

    def __str__(self) -> str:
        return f"{self.qname}/{self.qtype}"


NX = dns.rcode.NXDOMAIN
CASES = [
    # Kubernetes: ClusterIP
    Case("web.default.svc.cluster.local.", "A", answer=("web.default.svc.cluster.local. 30 IN A 10.96.0.10",)),
    Case("web.default.svc.cluster.local.", "AAAA", authority=(SOA_CLUSTER,)),
    Case("v6.default.svc.cluster.local.", "AAAA", answer=("v6.default.svc.cluster.local. 30 IN AAAA fd00::10",)),
    Case(
        "_http._tcp.web.default.svc.cluster.local.",
        "SRV",
        answer=("_http._tcp.web.default.svc.cluster.local. 30 IN SRV 0 100 80 web.default.svc.cluster.local.",),
        additional=("web.default.svc.cluster.local. 30 IN A 10.96.0.10",),
    ),
    Case(
        "_dns._udp.web.default.svc.cluster.local.",
        "SRV",
        answer=("_dns._udp.web.default.svc.cluster.local. 30 IN SRV 0 100 53 web.default.svc.cluster.local.",),
        additional=("web.default.svc.cluster.local. 30 IN A 10.96.0.10",),
    ),
    Case("_dns._tcp.web.default.svc.cluster.local.", "SRV", NX, authority=(SOA_CLUSTER,)),
    Case("_tcp.web.default.svc.cluster.local.", "SRV", authority=(SOA_CLUSTER,)),  # empty non-terminal
    Case(
        "10.0.96.10.in-addr.arpa.",
        "PTR",
        answer=("10.0.96.10.in-addr.arpa. 30 IN PTR web.default.svc.cluster.local.",),
    ),
    # Kubernetes: headless
    Case(
        "db.default.svc.cluster.local.",
        "A",
        answer=("db.default.svc.cluster.local. 30 IN A 10.1.0.1", "db.default.svc.cluster.local. 30 IN A 10.1.0.2"),
    ),
    Case("db-0.db.default.svc.cluster.local.", "A", answer=("db-0.db.default.svc.cluster.local. 30 IN A 10.1.0.1",)),
    Case(
        "10-1-0-2.db.default.svc.cluster.local.",
        "A",
        answer=("10-1-0-2.db.default.svc.cluster.local. 30 IN A 10.1.0.2",),
    ),
    Case("db-2.db.default.svc.cluster.local.", "A", NX, authority=(SOA_CLUSTER,)),  # not ready
    Case(
        "_pg._tcp.db.default.svc.cluster.local.",
        "SRV",
        answer=(
            "_pg._tcp.db.default.svc.cluster.local. 30 IN SRV 0 1 15432 db-0.db.default.svc.cluster.local.",
            "_pg._tcp.db.default.svc.cluster.local. 30 IN SRV 0 1 5432 10-1-0-2.db.default.svc.cluster.local.",
        ),
        additional=(
            "10-1-0-2.db.default.svc.cluster.local. 30 IN A 10.1.0.2",
            "db-0.db.default.svc.cluster.local. 30 IN A 10.1.0.1",
        ),
    ),
    Case(
        "1.0.1.10.in-addr.arpa.",
        "PTR",
        answer=("1.0.1.10.in-addr.arpa. 30 IN PTR db-0.db.default.svc.cluster.local.",),
    ),
    Case("empty.default.svc.cluster.local.", "A", NX, authority=(SOA_CLUSTER,)),  # headless, none ready
    # Kubernetes: ExternalName, schema version, empty non-terminals, apex, NXDOMAIN
    Case(
        "ext.default.svc.cluster.local.",
        "A",
        answer=("ext.default.svc.cluster.local. 30 IN CNAME api.example.org.",),
    ),
    Case("dns-version.cluster.local.", "TXT", answer=('dns-version.cluster.local. 30 IN TXT "1.1.0"',)),
    Case("default.svc.cluster.local.", "A", authority=(SOA_CLUSTER,)),
    Case("svc.cluster.local.", "SRV", authority=(SOA_CLUSTER,)),
    Case("cluster.local.", "SOA", answer=(SOA_CLUSTER,)),
    Case(
        "cluster.local.",
        "NS",
        answer=("cluster.local. 30 IN NS ns.dns.cluster.local.",),
        additional=("ns.dns.cluster.local. 30 IN A 127.0.0.1",),
    ),
    Case("nope.default.svc.cluster.local.", "A", NX, authority=(SOA_CLUSTER,)),
    Case("cluster.local.", "A", authority=(SOA_CLUSTER,)),
    # Case-insensitive matching; the owner name echoes the query's case.
    Case("WeB.Default.SVC.cluster.LOCAL.", "A", answer=("WeB.Default.SVC.cluster.LOCAL. 30 IN A 10.96.0.10",)),
    # ANY: one RRset (RFC 8482); HTTPS/SVCB for mesh names: NODATA.
    Case("web.default.svc.cluster.local.", "ANY", answer=("web.default.svc.cluster.local. 30 IN A 10.96.0.10",)),
    Case("web.default.svc.cluster.local.", "HTTPS", authority=(SOA_CLUSTER,)),
    Case("web.default.svc.cluster.local.", "SVCB", authority=(SOA_CLUSTER,)),
    # Consul: passing instances only, datacenter and tag forms, RFC 2782 SRV.
    Case(
        "redis.service.consul.",
        "A",
        answer=("redis.service.consul. 30 IN A 10.2.0.1", "redis.service.consul. 30 IN A 10.2.0.2"),
    ),
    Case(
        "redis.service.dc1.consul.",
        "A",
        answer=("redis.service.dc1.consul. 30 IN A 10.2.0.1", "redis.service.dc1.consul. 30 IN A 10.2.0.2"),
    ),
    Case("primary.redis.service.consul.", "A", answer=("primary.redis.service.consul. 30 IN A 10.2.0.1",)),
    Case("replica.redis.service.dc1.consul.", "A", answer=("replica.redis.service.dc1.consul. 30 IN A 10.2.0.2",)),
    Case("nosuchtag.redis.service.consul.", "A", NX, authority=(SOA_CONSUL,)),
    Case(
        "_redis._tcp.service.consul.",
        "SRV",
        answer=(
            "_redis._tcp.service.consul. 30 IN SRV 0 1 6379 0a020001.addr.dc1.consul.",
            "_redis._tcp.service.consul. 30 IN SRV 0 1 7000 0a020002.addr.dc1.consul.",
        ),
        additional=("0a020001.addr.dc1.consul. 30 IN A 10.2.0.1", "0a020002.addr.dc1.consul. 30 IN A 10.2.0.2"),
    ),
    Case(
        "_redis._replica.service.dc1.consul.",
        "SRV",
        answer=("_redis._replica.service.dc1.consul. 30 IN SRV 0 1 7000 0a020002.addr.dc1.consul.",),
        additional=("0a020002.addr.dc1.consul. 30 IN A 10.2.0.2",),
    ),
    Case(
        "redis.service.consul.",
        "SRV",
        answer=(
            "redis.service.consul. 30 IN SRV 0 1 6379 0a020001.addr.dc1.consul.",
            "redis.service.consul. 30 IN SRV 0 1 7000 0a020002.addr.dc1.consul.",
        ),
        additional=("0a020001.addr.dc1.consul. 30 IN A 10.2.0.1", "0a020002.addr.dc1.consul. 30 IN A 10.2.0.2"),
    ),
    Case("3.0.2.10.in-addr.arpa.", "PTR", dns.rcode.REFUSED, aa=False),  # failing instance: not ours
    # Plain zone (etcd): healthy endpoints, SRV priority and weight from the endpoints, in-zone CNAME chased.
    Case(
        "users.mesh.local.",
        "A",
        answer=("users.mesh.local. 30 IN A 10.3.0.1", "users.mesh.local. 30 IN A 10.3.0.2"),
    ),
    Case(
        "_grpc._tcp.users.mesh.local.",
        "SRV",
        answer=(
            "_grpc._tcp.users.mesh.local. 30 IN SRV 0 10 9090 10-3-0-1.users.mesh.local.",
            "_grpc._tcp.users.mesh.local. 30 IN SRV 1 5 9090 10-3-0-2.users.mesh.local.",
        ),
        additional=("10-3-0-1.users.mesh.local. 30 IN A 10.3.0.1", "10-3-0-2.users.mesh.local. 30 IN A 10.3.0.2"),
    ),
    Case(
        "alias.mesh.local.",
        "A",
        answer=(
            "alias.mesh.local. 30 IN CNAME users.mesh.local.",
            "users.mesh.local. 30 IN A 10.3.0.1",
            "users.mesh.local. 30 IN A 10.3.0.2",
        ),
    ),
    Case(
        "alias.mesh.local.",
        "AAAA",
        answer=("alias.mesh.local. 30 IN CNAME users.mesh.local.",),
        authority=(SOA_MESH,),
    ),
    # Hosts outside every zone: the name itself (or under its wildcard) is ours, its relatives are not.
    Case("api.stripe.com.", "A", answer=("api.stripe.com. 30 IN A 240.240.0.1",)),
    Case("api.stripe.com.", "AAAA"),
    Case("api.stripe.com.", "HTTPS"),
    Case("1.0.240.240.in-addr.arpa.", "PTR", answer=("1.0.240.240.in-addr.arpa. 30 IN PTR api.stripe.com.",)),
    Case("stripe.com.", "A", dns.rcode.REFUSED, aa=False),
    Case("www.stripe.com.", "A", dns.rcode.REFUSED, aa=False),
    Case("foo.wild.example.com.", "A", answer=("foo.wild.example.com. 30 IN A 10.4.0.1",)),
    Case("a.b.wild.example.com.", "A", answer=("a.b.wild.example.com. 30 IN A 10.4.0.1",)),
    Case("wild.example.com.", "A", dns.rcode.REFUSED, aa=False),
    Case("legacy.example.net.", "A", answer=("legacy.example.net. 30 IN CNAME legacy-backend.example.net.",)),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_table(server: DnsServer, transport: str) -> None:
    serial = None
    failures = []
    for case in CASES:
        reply = await ask(server, case.qname, case.qtype, transport)
        if serial is None:
            soa = next((r for r in reply.authority if r.rdtype == dns.rdatatype.SOA), None)
            serial = soa[0].serial if soa is not None else None

        def fmt(lines: tuple[str, ...], serial: object = serial) -> list[str]:
            return sorted(line.format(serial=serial) for line in lines)

        got = (
            dns.rcode.to_text(reply.rcode()),
            bool(reply.flags & dns.flags.AA),
            bool(reply.flags & dns.flags.RA),
            bool(reply.flags & dns.flags.QR),
            rrs(reply.answer),
            rrs(reply.authority),
            rrs(reply.additional),
        )
        want = (
            dns.rcode.to_text(case.rcode),
            case.aa,
            False,
            True,
            fmt(case.answer),
            fmt(case.authority),
            fmt(case.additional),
        )
        if got != want:
            failures.append(f"{case}: got {got}\n  want {want}")
    assert not failures, "\n".join(failures)


async def test_negative_answers_carry_soa_with_min_ttl(index: Index) -> None:
    fill(index)
    async with running(index, ttl="45s") as srv:
        reply = await ask(srv, "nope.default.svc.cluster.local.", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    (soa,) = reply.authority
    assert soa.ttl == min(45, soa[0].minimum) == 45


async def test_edns_echoed_and_absent_without(server: DnsServer) -> None:
    with_edns = await ask(server, "web.default.svc.cluster.local.", "A", edns=0, payload=4096)
    assert with_edns.edns == 0 and with_edns.payload == 1232
    without = await ask(server, "web.default.svc.cluster.local.", "A", edns=False)
    assert without.edns == -1 and without.answer


async def test_edns_do_bit_copied(server: DnsServer) -> None:
    query = dns.message.make_query("web.default.svc.cluster.local.", "A", want_dnssec=True)
    reply = dns.message.from_wire(await raw_udp(server, query.to_wire()) or b"")
    assert reply.ednsflags & dns.flags.DO
    plain = dns.message.make_query("web.default.svc.cluster.local.", "A", use_edns=0)
    reply = dns.message.from_wire(await raw_udp(server, plain.to_wire()) or b"")
    assert not reply.ednsflags & dns.flags.DO


async def test_edns_version_above_zero_is_badvers(server: DnsServer) -> None:
    reply = await ask(server, "web.default.svc.cluster.local.", "A", edns=1)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0 and not reply.answer


async def test_two_opt_records_are_formerr(server: DnsServer) -> None:
    query = dns.message.make_query("web.default.svc.cluster.local.", "A", use_edns=0).to_wire()
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    packet = query[:10] + struct.pack("!H", 2) + query[12:] + opt
    reply = dns.message.from_wire(await raw_udp(server, packet) or b"", ignore_trailing=True)
    assert reply.rcode() == dns.rcode.FORMERR


@pytest.mark.parametrize("count", [0, 2])
async def test_qdcount_other_than_one_is_formerr(server: DnsServer, count: int) -> None:
    query = dns.message.make_query("web.default.svc.cluster.local.", "A", use_edns=False).to_wire()
    question = query[12:]
    packet = query[:4] + struct.pack("!H", count) + query[6:12] + question * count
    raw = await raw_udp(server, packet)
    assert raw is not None
    assert raw[:2] == packet[:2] and raw[2] & 0x80 and raw[3] & 0x0F == dns.rcode.FORMERR


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, 9])
async def test_unknown_opcodes_are_notimp(server: DnsServer, opcode: int) -> None:
    query = bytearray(dns.message.make_query("web.default.svc.cluster.local.", "A").to_wire())
    query[2] = (query[2] & 0x87) | (opcode << 3)
    raw = await raw_udp(server, bytes(query))
    assert raw is not None
    assert (raw[2] >> 3) & 0xF == opcode and raw[3] & 0x0F == dns.rcode.NOTIMP


async def test_responses_are_never_answered(server: DnsServer) -> None:
    query = bytearray(dns.message.make_query("web.default.svc.cluster.local.", "A").to_wire())
    query[2] |= 0x80
    assert await raw_udp(server, bytes(query), timeout=0.3) is None


@pytest.mark.parametrize(("edns", "payload", "limit"), [(False, 0, 512), (0, 700, 700), (0, 4096, 1232)])
async def test_truncation_honours_udp_size_and_tcp_gets_all(
    server: DnsServer, edns: int | bool, payload: int, limit: int
) -> None:
    udp = await ask(server, "big.mesh.local.", "A", "udp", edns=edns, payload=payload or 1232)
    assert udp.flags & dns.flags.TC
    assert not udp.answer
    assert [str(q.name) for q in udp.question] == ["big.mesh.local."]
    assert len(udp.to_wire()) <= limit
    tcp = await ask(server, "big.mesh.local.", "A", "tcp", edns=edns, payload=payload or 1232)
    assert not tcp.flags & dns.flags.TC
    assert len(rrs(tcp.answer)) == 100


async def test_answers_rotate(server: DnsServer) -> None:
    firsts = set()
    for _ in range(4):
        reply = await ask(server, "db.default.svc.cluster.local.", "A")
        firsts.add(reply.answer[0][0].address)
    assert firsts == {"10.1.0.1", "10.1.0.2"}


async def test_rd_and_id_copied_from_query(server: DnsServer) -> None:
    for rd in (True, False):
        query = dns.message.make_query("web.default.svc.cluster.local.", "A")
        if not rd:
            query.flags &= ~dns.flags.RD
        raw = await raw_udp(server, query.to_wire())
        assert raw is not None
        reply = dns.message.from_wire(raw)
        assert reply.id == query.id
        assert bool(reply.flags & dns.flags.RD) is rd


async def test_index_change_is_in_the_next_answer(index: Index) -> None:
    shard = index.writer(SourceId("etcd/main"))
    shard.replace([Service(Hostname("svc.mesh.local"), endpoints=(_ep("10.9.0.1"),))])
    async with running(index) as srv:
        first = await ask(srv, "svc.mesh.local.", "A")
        assert rrs(first.answer) == ["svc.mesh.local. 30 IN A 10.9.0.1"]
        gone = await ask(srv, "new.mesh.local.", "A")
        assert gone.rcode() == dns.rcode.NXDOMAIN
        shard.replace(
            [
                Service(Hostname("svc.mesh.local"), endpoints=(_ep("10.9.0.2"),)),
                Service(Hostname("new.mesh.local"), endpoints=(_ep("10.9.0.3"),)),
            ]
        )
        assert rrs((await ask(srv, "svc.mesh.local.", "A")).answer) == ["svc.mesh.local. 30 IN A 10.9.0.2"]
        assert rrs((await ask(srv, "new.mesh.local.", "A")).answer) == ["new.mesh.local. 30 IN A 10.9.0.3"]
        shard.delete(Hostname("svc.mesh.local"))
        assert (await ask(srv, "svc.mesh.local.", "A", "tcp")).rcode() == dns.rcode.NXDOMAIN


async def test_wildcard_added_after_negative_answer(index: Index) -> None:
    shard = index.writer(SourceId("etcd/main"))
    shard.replace([Service(Hostname("a.mesh.local"), endpoints=(_ep("10.9.0.1"),))])
    async with running(index) as srv:
        assert (await ask(srv, "x.dyn.mesh.local.", "A")).rcode() == dns.rcode.NXDOMAIN
        shard.upsert(Service(Hostname("*.dyn.mesh.local"), endpoints=(_ep("10.9.9.9"),)))
        assert rrs((await ask(srv, "x.dyn.mesh.local.", "A")).answer) == ["x.dyn.mesh.local. 30 IN A 10.9.9.9"]


async def test_cname_target_change_reaches_cached_chain(server: DnsServer, index: Index) -> None:
    before = await ask(server, "alias.mesh.local.", "A")
    assert "users.mesh.local. 30 IN A 10.3.0.2" in rrs(before.answer)
    services = plain_services()
    services[0] = services[0].with_endpoints((_ep("10.3.7.7"),))
    index.writer(SourceId("etcd/main")).replace(services)
    after = await ask(server, "alias.mesh.local.", "A")
    assert rrs(after.answer) == [
        "alias.mesh.local. 30 IN CNAME users.mesh.local.",
        "users.mesh.local. 30 IN A 10.3.7.7",
    ]


async def test_set_zones_rebuilds(server: DnsServer) -> None:
    assert (await ask(server, "nope.mesh.local.", "A")).rcode() == dns.rcode.NXDOMAIN
    server.set_zones([CLUSTER])
    assert (await ask(server, "nope.mesh.local.", "A")).rcode() == dns.rcode.REFUSED
    # users.mesh.local is still a host we hold: answered as a single name outside every zone.
    assert rrs((await ask(server, "users.mesh.local.", "A")).answer)
    server.set_zones([CLUSTER, Zone(Hostname("mesh.local"), ZoneFlavor.PLAIN)])
    assert (await ask(server, "nope.mesh.local.", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_tcp_pipelined_queries_on_one_connection(server: DnsServer) -> None:
    host, port = server.addresses[0]
    names = ["web.default.svc.cluster.local.", "users.mesh.local.", "nope.default.svc.cluster.local."]
    queries = [dns.message.make_query(n, "A") for n in names]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
        await writer.drain()
        replies = []
        for _ in queries:
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
            replies.append(dns.message.from_wire(await reader.readexactly(size)))
    finally:
        writer.close()
    by_id = {r.id: r for r in replies}
    assert set(by_id) == {q.id for q in queries}
    assert [by_id[q.id].rcode() for q in queries] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


async def test_tcp_idle_connections_are_closed(index: Index) -> None:
    fill(index)
    async with running(index, tcp_idle_timeout="200ms") as srv:
        host, port = srv.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # EOF from the server
        finally:
            writer.close()


async def test_tcp_connection_cap(index: Index) -> None:
    fill(index)
    async with running(index, tcp_max_connections=2) as srv:
        host, port = srv.addresses[0]
        conns = [await asyncio.open_connection(host, port) for _ in range(2)]
        try:
            gauge = "discoveryd_dns_tcp_connections"
            await eventually(lambda: srv.tcp_connections == 2, what="two connections")
            # A third client is served; the longest idle connection made room for it.
            conns.append(await asyncio.open_connection(host, port))
            query = dns.message.make_query("web.default.svc.cluster.local.", "A").to_wire()
            r2, w2 = conns[2]
            w2.write(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", await asyncio.wait_for(r2.readexactly(2), 5))[0]
            assert dns.message.from_wire(await r2.readexactly(size)).answer
            assert await asyncio.wait_for(conns[0][0].read(1), 5) == b""
            assert srv.tcp_connections == 2
            await eventually(lambda: REGISTRY.get_sample_value(gauge) == 2, what="gauge back at the cap")
        finally:
            for _, w in conns:
                w.close()


async def test_bind_failure_names_the_address(index: Index) -> None:
    async with running(index) as first:
        host, port = first.addresses[0]
        clash = DnsServer(DnsConfig(listen=[f"{host}:{port}"]), index, [])
        with pytest.raises(OSError, match=f"{host}:{port}"):
            await asyncio.wait_for(clash.serve(), 5)


async def test_metrics_count_queries_and_cache_hits(server: DnsServer) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    q0 = sample("discoveryd_dns_queries_total", qtype="A", rcode="NOERROR")
    h0 = sample("discoveryd_dns_answer_cache_total", result="hit")
    for _ in range(3):
        await ask(server, "web.default.svc.cluster.local.", "A")
    assert sample("discoveryd_dns_queries_total", qtype="A", rcode="NOERROR") == q0 + 3
    assert sample("discoveryd_dns_answer_cache_total", result="hit") >= h0 + 2
    t0 = sample("discoveryd_dns_truncated_total")
    for _ in range(2):
        await ask(server, "big.mesh.local.", "A", edns=False)
    assert sample("discoveryd_dns_truncated_total") == t0 + 2


@pytest.mark.parametrize("batched", [True, False])
async def test_udp_readers_answer_hits_misses_and_forwards(
    index: Index, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    if not batched:
        monkeypatch.setattr(udp, "_MMSG", None)
    elif udp._MMSG is None:
        pytest.skip("recvmmsg/sendmmsg not available here")
    fill(index)
    async with upstream_server("ok") as up, running(index, forward=[up.address]) as srv:
        for _ in range(2):  # a miss, then a cache hit
            reply = await ask(srv, "web.default.svc.cluster.local.", "A")
            assert rrs(reply.answer) == ["web.default.svc.cluster.local. 30 IN A 10.96.0.10"]
        forwarded = await ask(srv, "elsewhere.example.", "A")
        assert rrs(forwarded.answer) == ["elsewhere.example. 300 IN A 192.0.2.1"]


async def test_ipv6_listener(index: Index) -> None:
    fill(index)
    async with running(index, listen=["[::1]:0"], forward=[]) as srv:
        assert srv.addresses[0][0] == "::1"
        reply = await ask(srv, "web.default.svc.cluster.local.", "A")
        assert rrs(reply.answer) == ["web.default.svc.cluster.local. 30 IN A 10.96.0.10"]
        assert (await ask(srv, "elsewhere.example.", "A", "tcp")).rcode() == dns.rcode.REFUSED
        ns = await ask(srv, "cluster.local.", "NS")
        assert rrs(ns.additional) == ["ns.dns.cluster.local. 30 IN AAAA ::1"]


@pytest.mark.parametrize("odd", [b"Dot.ted\x00X", b"\xff\xfe", b"\xc3\x89t\xc3\xa9"])
async def test_any_label_bytes_under_wildcard(server: DnsServer, odd: bytes) -> None:
    # Labels may hold any bytes (RFC 2181 11): a dot, NUL, invalid UTF-8, UTF-8.
    name = dns.name.Name([odd, b"wild", b"example", b"com", b""])
    raw = await raw_udp(server, dns.message.make_query(name, "A").to_wire())
    assert raw is not None
    reply = dns.message.from_wire(raw)
    assert [(rrset.name, rrset[0].address) for rrset in reply.answer] == [(name, "10.4.0.1")]
    nx = dns.name.Name([odd, b"mesh", b"local", b""])
    reply = dns.message.from_wire(await raw_udp(server, dns.message.make_query(nx, "A").to_wire()) or b"")
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.question[0].name == nx
