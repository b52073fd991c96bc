"""Forwarding names outside our zones to loopback upstreams that the tests control."""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from prometheus_client import REGISTRY

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import ask, raw_udp, rrs, running, upstream_server
from tests.helpers import eventually


async def test_forwarded_answer_has_ra_not_aa_and_is_cached(index: Index) -> None:
    async with upstream_server("ok") as up, running(index, forward=[up.address]) as srv:
        first = await ask(srv, "Www.Example.COM.", "A")
        assert first.rcode() == dns.rcode.NOERROR
        assert first.flags & dns.flags.RA and not first.flags & dns.flags.AA
        assert rrs(first.answer) == ["Www.Example.COM. 300 IN A 192.0.2.1"]
        assert first.edns == 0 and first.payload == 1232
        second = await ask(srv, "www.example.com.", "A", "tcp")
        assert rrs(second.answer) in (["www.example.com. 300 IN A 192.0.2.1"], ["www.example.com. 299 IN A 192.0.2.1"])
        assert up.queries["udp"] == 1, "second query must come from the cache"


async def test_cache_honours_ttl(index: Index) -> None:
    async with upstream_server("ok", ttl=1) as up, running(index, forward=[up.address]) as srv:
        await ask(srv, "short.example.", "A")
        await ask(srv, "short.example.", "A")
        assert up.queries["udp"] == 1

        async def refetched() -> bool:
            await ask(srv, "short.example.", "A")
            return up.queries["udp"] == 2

        await eventually(refetched, timeout=10, interval=0.2, what="expired entry fetched again")


async def test_negative_answers_forwarded_and_cached(index: Index) -> None:
    async with upstream_server("nxdomain") as up, running(index, forward=[up.address]) as srv:
        for _ in range(2):
            reply = await ask(srv, "missing.example.", "A")
            assert reply.rcode() == dns.rcode.NXDOMAIN
            assert [r.rdtype for r in reply.authority] == [dns.rdatatype.SOA]
            assert reply.authority[0].ttl <= 60  # min(SOA TTL 120, MINIMUM 60)
        assert up.queries["udp"] == 1


async def test_timeout_then_next_upstream(index: Index) -> None:
    async with (
        upstream_server("silent") as dead,
        upstream_server("ok") as alive,
        running(index, forward=[dead.address, alive.address], forward_timeout="300ms") as srv,
    ):
        reply = await ask(srv, "failover.example.", "A")
        assert rrs(reply.answer) == ["failover.example. 300 IN A 192.0.2.1"]
        assert dead.queries["udp"] == 1 and alive.queries["udp"] == 1
        timeouts = REGISTRY.get_sample_value(
            "discoveryd_dns_upstream_duration_seconds_count", {"upstream": dead.address, "result": "timeout"}
        )
        assert timeouts == 1


async def test_servfail_from_one_upstream_tries_the_next(index: Index) -> None:
    async with (
        upstream_server("servfail") as bad,
        upstream_server("ok") as good,
        running(index, forward=[bad.address, good.address]) as srv,
    ):
        reply = await ask(srv, "next.example.", "A")
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer


async def test_all_upstreams_failing_is_servfail(index: Index) -> None:
    async with (
        upstream_server("servfail") as bad,
        upstream_server("silent") as dead,
        running(index, forward=[bad.address, dead.address], forward_timeout="200ms") as srv,
    ):
        reply = await ask(srv, "down.example.", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert reply.flags & dns.flags.RA and not reply.answer
        again = await ask(srv, "down.example.", "A")
        assert again.rcode() == dns.rcode.SERVFAIL
        assert bad.queries["udp"] == 2, "failures are not cached"


async def test_truncated_upstream_reply_retried_over_tcp(index: Index) -> None:
    async with upstream_server("truncate") as up, running(index, forward=[up.address]) as srv:
        reply = await ask(srv, "big.example.", "A")
        assert not reply.flags & dns.flags.TC
        assert rrs(reply.answer) == ["big.example. 300 IN A 192.0.2.1", "big.example. 300 IN A 192.0.2.2"]
        assert up.queries == {"udp": 1, "tcp": 1}


async def test_refused_for_clients_outside_allow_forward_from(index: Index) -> None:
    shard = index.writer(SourceId("etcd/main"))
    shard.replace([Service(Hostname("svc.mesh.local"), endpoints=(Endpoint("10.9.0.1"),))])
    async with (
        upstream_server("ok") as up,
        running(
            index,
            listen=["127.0.0.1:0", "127.0.0.2:0"],
            forward=[up.address],
            allow_forward_from=["127.0.0.2/32"],
        ) as srv,
    ):
        outsider = await ask(srv, "www.example.com.", "A", source="127.0.0.1")
        assert outsider.rcode() == dns.rcode.REFUSED
        assert not outsider.flags & (dns.flags.RA | dns.flags.AA) and not outsider.answer
        outsider_tcp = await ask(srv, "www.example.com.", "A", "tcp", source="127.0.0.1", address=1)
        assert outsider_tcp.rcode() == dns.rcode.REFUSED
        assert up.queries.total() == 0, "a refused client must not reach the upstream"
        # Our own names are answered for every client.
        ours = await ask(srv, "svc.mesh.local.", "A", source="127.0.0.1")
        assert rrs(ours.answer) == ["svc.mesh.local. 30 IN A 10.9.0.1"]
        insider = await ask(srv, "www.example.com.", "A", source="127.0.0.2", address=1)
        assert insider.rcode() == dns.rcode.NOERROR and insider.answer
        assert up.queries["udp"] == 1


async def test_mesh_host_answered_and_its_relatives_forwarded(index: Index) -> None:
    shard = index.writer(SourceId("files/local"))
    shard.replace([Service(Hostname("api.partner.example"), addresses=("240.240.0.9",))])
    async with upstream_server("ok") as up, running(index, forward=[up.address]) as srv:
        for qtype in ("HTTPS", "SVCB", "AAAA", "TXT"):
            reply = await ask(srv, "api.partner.example.", qtype)
            assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
            assert reply.flags & dns.flags.AA
        assert up.queries.total() == 0
        # Its parent and siblings are not ours: forwarded, never NXDOMAIN'd.
        for name in ("partner.example.", "www.partner.example.", "x.api.partner.example."):
            reply = await ask(srv, name, "A")
            assert rrs(reply.answer) == [f"{name} 300 IN A 192.0.2.1"] and reply.flags & dns.flags.RA
        assert up.queries.total() == 3


async def test_concurrent_identical_queries_share_one_upstream_exchange(index: Index) -> None:
    async with upstream_server("ok", delay=0.3) as up, running(index, forward=[up.address]) as srv:
        transports = ["udp"] * 4 + ["tcp"] * 2
        replies = await asyncio.gather(*(ask(srv, "Same.example.", "A", t) for t in transports))
        assert [rrs(r.answer) for r in replies] == [["Same.example. 300 IN A 192.0.2.1"]] * len(transports)
        assert up.queries.total() == 1


async def test_shutdown_with_forwards_in_flight_leaves_nothing_behind(index: Index) -> None:
    async with upstream_server("silent") as up:
        async with running(index, forward=[up.address], forward_timeout="5s") as srv:
            host, port = srv.addresses[0]
            query = dns.message.make_query("pending.example.", "A").to_wire()
            assert await raw_udp(srv, query, timeout=0.2) is None
            reader, writer = await asyncio.open_connection(host, port)
            other = dns.message.make_query("other.example.", "A").to_wire()
            writer.write(len(other).to_bytes(2, "big") + other)
            await writer.drain()
            await eventually(lambda: up.queries.total() >= 2, what="both queries forwarded")
        # The server is gone: its connection was closed and its port can be bound again.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        again = DnsServer(DnsConfig(listen=[f"{host}:{port}"]), index, [])
        task = asyncio.create_task(again.serve())
        try:
            await asyncio.wait_for(again.started.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
