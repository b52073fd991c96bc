"""A CNAME from our data to a name outside our zones, chased through the forwarder for recursive clients.

`legacy.mesh.local` is a DNS-resolution service whose endpoint is `backend.example.com` (outside every
zone). A client that may forward and sets RD gets the whole chain with RA set, as from a recursive
resolver; a client outside `allow_forward_from`, or one without RD, gets the bare CNAME.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Resolution, Service, SourceId
from tests.fakes.dns import ask, rrs, running, upstream_server

CHAIN = "legacy.mesh.local. 30 IN CNAME backend.example.com."


@pytest.fixture
def index() -> Index:
    index = Index()
    index.writer(SourceId("files/local")).replace(
        [
            Service(
                Hostname("legacy.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("backend.example.com"),)
            ),
            Service(
                Hostname("loop.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("bounce.example.com"),)
            ),
            Service(Hostname("svc.mesh.local"), endpoints=(Endpoint("10.9.0.1"),)),
        ]
    )
    return index


async def test_recursive_client_gets_the_whole_chain(index: Index) -> None:
    async with upstream_server("ok") as up, running(index, forward=[up.address]) as srv:
        for transport in ("udp", "tcp"):
            reply = await ask(srv, "legacy.mesh.local.", "A", transport)
            assert reply.rcode() == dns.rcode.NOERROR
            assert reply.flags & dns.flags.RA
            assert rrs(reply.answer) == sorted([CHAIN, "backend.example.com. 300 IN A 192.0.2.1"])
        assert up.queries.total() == 1, "the target's answer comes from the forward cache the second time"


async def test_dnspython_stub_resolver_gets_an_address(index: Index) -> None:
    async with upstream_server("ok") as up, running(index, forward=[up.address]) as srv:
        host, port = srv.addresses[0]
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
        answer = await resolver.resolve("legacy.mesh.local.", "A", lifetime=5)
        assert [r.address for r in answer] == ["192.0.2.1"]
        assert str(answer.canonical_name) == "backend.example.com."
        # What a glibc stub needs: the A RRset of the last chain name in the same response, RD echoed.
        response = answer.response
        assert response.flags & dns.flags.RD and response.flags & dns.flags.RA
        assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]


async def test_authoritative_only_clients_keep_the_bare_cname(index: Index) -> None:
    async with (
        upstream_server("ok") as up,
        running(index, listen=["127.0.0.1:0"], forward=[up.address], allow_forward_from=["127.0.0.2/32"]) as srv,
    ):
        reply = await ask(srv, "legacy.mesh.local.", "A", source="127.0.0.1")
        assert rrs(reply.answer) == [CHAIN] and not reply.flags & dns.flags.RA
        # No RD: the bare CNAME too, even for a client that may forward.
        query = dns.message.make_query("legacy.mesh.local.", "A")
        query.flags &= ~dns.flags.RD
        host, port = srv.addresses[0]
        norec = await dns.asyncquery.udp(query, host, port=port, timeout=5, source="127.0.0.2")
        assert rrs(norec.answer) == [CHAIN]
        assert up.queries.total() == 0


async def test_nxdomain_target_keeps_the_chain_and_the_upstream_soa(index: Index) -> None:
    async with upstream_server("nxdomain") as up, running(index, forward=[up.address]) as srv:
        reply = await ask(srv, "legacy.mesh.local.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.RA
        assert rrs(reply.answer) == [CHAIN]
        assert [r.rdtype for r in reply.authority] == [dns.rdatatype.SOA]


async def test_upstream_failure_is_servfail(index: Index) -> None:
    async with upstream_server("servfail") as up, running(index, forward=[up.address]) as srv:
        reply = await ask(srv, "legacy.mesh.local.", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL and reply.flags & dns.flags.RA


@contextlib.asynccontextmanager
async def bouncing_upstream() -> AsyncIterator[list[str]]:
    """An upstream that answers `bounce.example.com` with a CNAME back into our zone (loop.mesh.local)."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            query = DNSRecord.parse(data)
            name = str(query.q.qname).lower()
            seen.append(name)
            reply = query.reply()
            reply.header.ra = 1
            if name.startswith("bounce."):
                reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=60, rdata=CNAME("loop.mesh.local")))
            else:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=60, rdata=A("192.0.2.7")))
            self.transport.sendto(reply.pack(), addr)

    transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
    seen.insert(0, f"127.0.0.1:{transport.get_extra_info('sockname')[1]}")
    try:
        yield seen
    finally:
        transport.close()


async def test_a_chain_looping_back_into_our_zone_ends(index: Index) -> None:
    async with bouncing_upstream() as seen, running(index, forward=[seen[0]]) as srv:
        reply = await ask(srv, "loop.mesh.local.", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert len(seen) - 1 <= 8, f"the loop was followed {len(seen) - 1} times"
        # Other names keep working.
        assert rrs((await ask(srv, "svc.mesh.local.", "A")).answer) == ["svc.mesh.local. 30 IN A 10.9.0.1"]
