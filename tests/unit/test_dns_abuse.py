"""What one client can make the authoritative side hold or spend (issue 11, findings 1-3).

Costs are compared as ratios against a baseline measured in the same test (never absolute
times); memory is the answer cache's own accounting plus what tracemalloc sees the process keep.
"""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import MESH

BIG = "big.mesh.local."


@pytest.fixture
def server() -> DnsServer:
    index = Index()
    shard = index.writer(SourceId("etcd/main"))
    shard.replace(
        [
            Service(Hostname("big.mesh.local"), endpoints=tuple(Endpoint(f"10.5.0.{i}") for i in range(1, 101))),
            Service(Hostname("one.mesh.local"), endpoints=(Endpoint("10.6.0.1"),)),
        ]
    )
    shard.mark_synced()
    srv = DnsServer(DnsConfig(), index, [MESH])
    asyncio.run(srv.sync())
    return srv


def _wire(
    name: str, rdtype: str = "A", *, edns: bool = True, option: bytes | None = None, payload: int = 1232
) -> bytes:
    options = [dns.edns.GenericOption(65001, option)] if option is not None else []
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, payload=payload, options=options)
    query.id = 0x4242
    return query.to_wire()


def _reply(server: DnsServer, packet: bytes, tcp: bool = True) -> dns.message.Message:
    out = server.handle(packet, "127.0.0.1", tcp)
    assert isinstance(out, bytes)
    return dns.message.from_wire(out)


# -- finding 1: memory -----------------------------------------------------------------------


def test_distinct_edns_options_share_one_cached_answer(server: DnsServer) -> None:
    # Queries differing only in an unknown EDNS option's bytes (and the name's case) change nothing
    # in the answer: they must not each keep a copy of the 100-address response.
    first = _reply(server, _wire(BIG, option=b"\x00\x00\x00\x00"))
    assert len(first.answer[0]) == 100
    for i in range(50):
        _reply(server, _wire(BIG, option=i.to_bytes(4, "big")))
    queries = 2000
    packets = []
    for i in range(queries):
        name = "".join(c.upper() if (i >> n) & 1 else c for n, c in enumerate(BIG))
        packets.append(_wire(name, option=(i + 1000).to_bytes(4, "big")))
    size = len(server.handle(packets[0], "127.0.0.1", True) or b"")
    assert size > 1600
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for packet in packets:
            out = server.handle(packet, "127.0.0.1", True)
            assert isinstance(out, bytes) and len(out) == size and out[:2] == packet[:2]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One response is ~1.7 KB and was kept in 8 rotations per distinct query (~14 KB each).
    assert grown / queries < 400, f"{grown / queries:.0f} bytes kept per distinct query"
    assert server._authority.cached() <= 2


def test_answer_cache_is_bounded_in_bytes(server: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from discoveryd.dns import answer as answer_module

    monkeypatch.setattr(answer_module, "_CACHE_BYTES", 64 * 1024)
    monkeypatch.setattr(answer_module, "_EXACT_BYTES", 16 * 1024)
    authority = server._authority
    for i in range(400):
        _reply(server, _wire(f"n{i}.big.mesh.local.", "A"))
        _reply(server, _wire(BIG, "A", payload=512 + i))
        _reply(server, _wire(BIG, "TXT", option=bytes([i % 256])))
    assert 0 < authority.cache_bytes() <= 64 * 1024 + 2 * 16 * 1024
    assert authority.cached() < 400, "nothing was evicted"
    assert server.metrics.cache_bytes.n == authority.cache_bytes()


# -- finding 2: CPU ---------------------------------------------------------------------------


def _many_questions(size: int) -> bytes:
    """One real name, then questions that each point back at it (compression): the most questions per byte."""
    body = b"\x03big\x04mesh\x05local\x00" + struct.pack("!HH", 1, 1)
    count = 1
    while 12 + len(body) + 6 <= size:
        body += b"\xc0\x0c" + struct.pack("!HH", 1, 1)
        count += 1
    return struct.pack("!HHHHHH", 0x4242, 0x0100, count, 0, 0, 0) + body


def _garbage(size: int) -> bytes:
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\xff" * (size - 12)


def _cpu_per_packet(server: DnsServer, packet: bytes, tcp: bool, rounds: int = 200) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            server.handle(packet, "127.0.0.1", tcp)
        best = min(best, time.process_time() - start)
    return best / rounds


@pytest.mark.parametrize(("size", "tcp"), [(4096, False), (65535, True)])
def test_many_questions_cost_no_more_than_garbage(server: DnsServer, size: int, tcp: bool) -> None:
    packet = _many_questions(size)
    reply = server.handle(packet, "127.0.0.1", tcp)
    assert isinstance(reply, bytes)
    assert reply[3] & 0xF == dns.rcode.FORMERR and reply[4:6] == b"\x00\x00"
    ratio = _cpu_per_packet(server, packet, tcp) / _cpu_per_packet(server, _garbage(size), tcp)
    assert ratio < 3, f"a packet of many questions costs {ratio:.1f}x garbage of the same size"


def test_many_records_in_other_sections_cost_no_more_than_garbage(server: DnsServer) -> None:
    question = b"\x03big\x04mesh\x05local\x00" + struct.pack("!HH", 1, 1)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 0)
    count = (4096 - 12 - len(question)) // len(record)
    packet = struct.pack("!HHHHHH", 1, 0x0100, 1, count, 0, 0) + question + record * count
    reply = server.handle(packet, "127.0.0.1", False)
    assert isinstance(reply, bytes) and reply[3] & 0xF == dns.rcode.FORMERR
    ratio = _cpu_per_packet(server, packet, False) / _cpu_per_packet(server, _garbage(len(packet)), False)
    assert ratio < 3, f"a packet of many answer records costs {ratio:.1f}x garbage"


# -- finding 3: EDNS in the cache key and in error responses ----------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_opt_in_the_reply_follows_the_query_not_the_cache(server: DnsServer, tcp: bool) -> None:
    for order in ((True, False, True), (False, True, False)):
        for edns in order:
            reply = _reply(server, _wire("one.mesh.local.", "NAPTR", edns=edns, payload=512), tcp)
            assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
            assert (reply.edns >= 0) == edns, f"EDNS {'expected' if edns else 'not expected'} (order {order})"


def test_error_responses_carry_opt_when_the_query_had_one(server: DnsServer) -> None:
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    no_question = struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 1) + opt
    for packet, rcode in (
        (no_question, dns.rcode.FORMERR),
        (bytearray(_wire("one.mesh.local.")), dns.rcode.NOTIMP),
    ):
        if isinstance(packet, bytearray):
            packet[2] = (packet[2] & 0x87) | (dns.opcode.STATUS << 3)
            packet = bytes(packet)
        reply = _reply(server, packet, False)
        assert reply.rcode() == rcode
        assert reply.edns == 0, "the error response has no OPT record although the query had one"
        without = packet[:11] + b"\x00" if packet is no_question else _wire("one.mesh.local.", edns=False)
        if packet is not no_question:
            wb = bytearray(without)
            wb[2] = (wb[2] & 0x87) | (dns.opcode.STATUS << 3)
            without = bytes(wb)
        else:
            without = struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0)
        assert _reply(server, without, False).edns == -1


def test_notimp_for_an_update_echoes_no_question(server: DnsServer) -> None:
    packet = bytearray(_wire("one.mesh.local.", edns=False))
    packet[2] = (packet[2] & 0x87) | (dns.opcode.UPDATE << 3)
    reply = _reply(server, bytes(packet), False)
    assert reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == dns.opcode.UPDATE


@pytest.mark.parametrize("length", [0, 5, 9, 15, 41])
def test_a_malformed_cookie_gets_formerr(server: DnsServer, length: int) -> None:
    # RFC 7873 5.2.2: a COOKIE option of 8 bytes (client cookie) or 16 to 40 (with a server cookie).
    cookie = dns.edns.GenericOption(10, b"\x01" * length)
    query = dns.message.make_query("one.mesh.local.", "A", use_edns=0, options=[cookie])
    for _ in range(2):  # the second time the answer for the name is cached: still FORMERR
        reply = _reply(server, query.to_wire(), False)
        assert reply.rcode() == dns.rcode.FORMERR and reply.edns == 0
    good = dns.message.make_query("one.mesh.local.", "A", use_edns=0, options=[dns.edns.GenericOption(10, b"\x01" * 8)])
    assert _reply(server, good.to_wire(), False).rcode() == dns.rcode.NOERROR
