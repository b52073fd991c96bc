"""What a DNS operator expects: response rate limiting with slip, the query log, malformed-packet
metrics, and counters that belong to one server (two servers in one process count apart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer, udp
from discoveryd.dns.metrics import DnsMetrics
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import ask, raw_udp, rrs, running, upstream_server

NAME = "svc.mesh.local."


@pytest.fixture
def index() -> Index:
    index = Index()
    index.writer(SourceId("etcd/main")).replace(
        [Service(Hostname("svc.mesh.local"), endpoints=(Endpoint("10.9.0.1"),))]
    )
    return index


async def _burst(host: str, port: int, count: int, source: str = "127.0.0.1") -> list[dns.message.Message | None]:
    """`count` UDP queries sent at once from one socket; the replies that came back within 1 s (by ID)."""
    loop = asyncio.get_running_loop()
    queries = [dns.message.make_query(NAME, "A") for _ in range(count)]
    for i, q in enumerate(queries):
        q.id = 1000 + i  # distinct IDs: replies are matched by ID (random ones collide ~1% of the time)
    replies: dict[int, dns.message.Message] = {}
    done = asyncio.Event()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            msg = dns.message.from_wire(data)
            replies[msg.id] = msg
            if len(replies) == count:
                done.set()

    transport, _ = await loop.create_datagram_endpoint(Client, local_addr=(source, 0), remote_addr=(host, port))
    try:
        for q in queries:
            transport.sendto(q.to_wire())
        with contextlib.suppress(TimeoutError):  # dropped queries never get a reply
            await asyncio.wait_for(done.wait(), 1.0)
    finally:
        transport.close()
    return [replies.get(q.id) for q in queries]


async def test_rrl_off_by_default_answers_every_query(index: Index) -> None:
    async with running(index) as srv:
        host, port = srv.addresses[0]
        replies = await _burst(host, port, 50)
        assert all(r is not None and r.answer and not r.flags & dns.flags.TC for r in replies)


@pytest.mark.parametrize("batched", [True, False])
async def test_rrl_slips_truncated_answers_and_tcp_retry_succeeds(
    index: Index, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    if not batched:
        monkeypatch.setattr(udp, "_MMSG", None)
    metrics = DnsMetrics()
    config = DnsConfig(listen=["127.0.0.1:0"], rrl={"responses_per_second": 5, "slip": 2})
    server = DnsServer(config, index, [], metrics)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.started.wait(), 5)
        host, port = server.addresses[0]
        started = time.monotonic()
        replies = await _burst(host, port, 40)
        elapsed = time.monotonic() - started
        full = [r for r in replies if r is not None and not r.flags & dns.flags.TC]
        slipped = [r for r in replies if r is not None and r.flags & dns.flags.TC]
        # The bucket holds about a second's worth and refills at 5/s while the burst lasts.
        assert 1 <= len(full) <= 7 + 5 * elapsed, f"{len(full)} full answers at 5/s in {elapsed:.2f} s"
        # Every second limited response slips (TC, question only); the others are dropped.
        limited = len(replies) - len(full)
        assert limited >= 20
        assert abs(len(slipped) - limited / 2) <= 1, f"{len(slipped)} of {limited} limited responses slipped"
        assert all(not r.answer and r.question[0].name == dns.name.from_text(NAME) for r in slipped)
        assert replies.count(None) == limited - len(slipped)
        # What a resolver does with TC: ask again over TCP, which is not rate limited.
        for _ in range(3):
            tcp = await dns.asyncquery.tcp(dns.message.make_query(NAME, "A"), host, port=port, timeout=5)
            assert rrs(tcp.answer) == [f"{NAME} 30 IN A 10.9.0.1"]
        registry = CollectorRegistry()
        registry.register(metrics)
        assert registry.get_sample_value("discoveryd_dns_rrl_total", {"action": "slipped"}) == len(slipped)
        assert registry.get_sample_value("discoveryd_dns_rrl_total", {"action": "dropped"}) == replies.count(None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_rrl_buckets_are_per_prefix(index: Index) -> None:
    async with running(index, listen=["127.0.0.1:0"], rrl={"responses_per_second": 5, "slip": 0}) as srv:
        host, port = srv.addresses[0]
        first = await _burst(host, port, 20, source="127.0.0.1")
        assert sum(r is not None for r in first) <= 7
        # Another /24 (127.0.1.0/24) has its own bucket.
        other = await _burst(host, port, 5, source="127.0.1.1")
        assert all(r is not None and r.answer for r in other)


async def test_query_log_off_by_default(index: Index, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="discoveryd.dns.query")
    async with running(index) as srv:
        await ask(srv, NAME, "A")
        await ask(srv, NAME, "A", "tcp")
    assert [r for r in caplog.records if r.name == "discoveryd.dns.query"] == []


async def test_query_log_lines_escape_untrusted_names(index: Index, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="discoveryd.dns.query")
    async with upstream_server("ok") as up, running(index, query_log=True, forward=[up.address]) as srv:
        await ask(srv, NAME, "A")
        await ask(srv, NAME, "AAAA", "tcp")
        await ask(srv, "nope.mesh.local.", "A")
        await ask(srv, "elsewhere.example.", "A")
        odd = dns.name.Name([b"evil\nname=forged rcode=NOERROR", b"\x1b[31m", b"mesh", b"local", b""])
        assert await raw_udp(srv, dns.message.make_query(odd, "TXT").to_wire()) is not None
        lines = [r.getMessage() for r in caplog.records if r.name == "discoveryd.dns.query"]
    assert len(lines) == 5
    assert (
        lines[0].startswith("query client=127.0.0.1:")
        and " proto=udp name=svc.mesh.local. type=A rcode=NOERROR " in lines[0]
    )
    assert " proto=tcp name=svc.mesh.local. type=AAAA rcode=NOERROR " in lines[1]
    assert " name=nope.mesh.local. type=A rcode=NXDOMAIN " in lines[2]
    assert " name=elsewhere.example. type=A rcode=NOERROR " in lines[3]  # forwarded, logged when sent
    assert all("duration_ms=" in line for line in lines)
    assert "\n" not in lines[4] and "\x1b" not in lines[4]
    assert " name=evil\\010name=forged\\032rcode=NOERROR.\\027[31m.mesh.local. type=TXT rcode=NXDOMAIN " in lines[4]


async def test_query_log_is_rate_limited(index: Index, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="discoveryd.dns.query")
    async with running(index, query_log=True, query_log_rate=5) as srv:
        host, port = srv.addresses[0]
        replies = await _burst(host, port, 40)
        assert all(r is not None for r in replies)
        lines = [r.getMessage() for r in caplog.records if r.name == "discoveryd.dns.query"]
        assert 1 <= len(lines) <= 7
        await asyncio.sleep(0.5)  # the bucket refills: the next line reports what was withheld
        await ask(srv, NAME, "A")
        lines = [r.getMessage() for r in caplog.records if r.name == "discoveryd.dns.query"]
    summary = [line for line in lines if "suppressed" in line]
    assert len(summary) == 1 and summary[0].startswith(f"query log: {40 - (len(lines) - 2)} lines suppressed")


async def test_malformed_packets_are_counted_by_reason(index: Index) -> None:
    metrics = DnsMetrics()
    server = DnsServer(DnsConfig(listen=["127.0.0.1:0"]), index, [], metrics)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.started.wait(), 5)
        query = dns.message.make_query(NAME, "A").to_wire()
        assert await raw_udp(server, b"\x00\x01\x00", timeout=0.3) is None  # short
        two_questions = query[:4] + b"\x00\x02" + query[6:] + query[12:]
        assert await raw_udp(server, two_questions) is not None  # qdcount: FORMERR
        bad_pointer = query[:12] + b"\xc0\x20" + query[-4:]
        assert await raw_udp(server, bad_pointer) is not None  # unreadable: FORMERR
        registry = CollectorRegistry()
        registry.register(metrics)

        def malformed(reason: str) -> float:
            return registry.get_sample_value("discoveryd_dns_malformed_total", {"reason": reason}) or 0.0

        assert (malformed("short"), malformed("qdcount"), malformed("unreadable")) == (1, 1, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_two_servers_in_one_process_count_apart(index: Index) -> None:
    first, second = DnsMetrics(), DnsMetrics()
    servers = [DnsServer(DnsConfig(listen=["127.0.0.1:0"]), index, [], m) for m in (first, second)]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    try:
        for s in servers:
            await asyncio.wait_for(s.started.wait(), 5)
        for _ in range(3):
            await ask(servers[0], NAME, "A")
        await ask(servers[1], NAME, "A", "tcp")
        r1, r2 = CollectorRegistry(), CollectorRegistry()
        r1.register(first)
        r2.register(second)
        sample = {"qtype": "A", "rcode": "NOERROR"}
        assert r1.get_sample_value("discoveryd_dns_queries_total", sample) == 3
        assert r2.get_sample_value("discoveryd_dns_queries_total", sample) == 1
        assert r1.get_sample_value("discoveryd_dns_tcp_connections") == 0
        assert r1.get_sample_value("discoveryd_dns_answer_cache_total", {"result": "hit"}) == 2
        assert r2.get_sample_value("discoveryd_dns_answer_cache_total", {"result": "hit"}) == 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
