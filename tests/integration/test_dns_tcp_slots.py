"""TCP connection slots under abuse (RFC 7766 §6.2.3): one source cannot hold every slot, only a
complete query keeps a connection alive, idle timeouts shrink under pressure, and a full table makes
room for a new client by closing the connection that has been idle longest."""

from __future__ import annotations

import asyncio
import struct

import dns.message
import dns.rcode
import pytest

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import ask, running, upstream_server
from tests.helpers import eventually

NAME = "svc.mesh.local."

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def index() -> Index:
    index = Index()
    index.writer(SourceId("etcd/main")).replace(
        [Service(Hostname("svc.mesh.local"), endpoints=(Endpoint("10.9.0.1"),))]
    )
    return index


async def _connect(host: str, port: int, source: str) -> Conn:
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def _closed(conn: Conn, timeout: float = 5.0) -> bool:
    """True once the server has closed `conn` (EOF or reset) within `timeout`."""
    try:
        return await asyncio.wait_for(conn[0].read(1), timeout) == b""
    except ConnectionError:
        return True


async def _query(conn: Conn) -> dns.message.Message:
    reader, writer = conn
    wire = dns.message.make_query(NAME, "A").to_wire()
    writer.write(struct.pack("!H", len(wire)) + wire)
    await writer.drain()
    size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(size), 5))


def _close(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


async def test_zero_length_messages_do_not_keep_a_connection_open(index: Index) -> None:
    async with running(index, tcp_idle_timeout="300ms") as srv:
        host, port = srv.addresses[0]
        conn = await _connect(host, port, "127.0.0.2")
        try:

            async def keepalive() -> None:
                while True:
                    conn[1].write(b"\x00\x00")
                    await asyncio.sleep(0.1)

            ticker = asyncio.create_task(keepalive())
            try:
                assert await _closed(conn, 3.0), "zero-length messages kept the connection open"
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
        finally:
            _close([conn])


async def test_partial_message_does_not_reset_the_idle_timer(index: Index) -> None:
    async with running(index, tcp_idle_timeout="400ms") as srv:
        host, port = srv.addresses[0]
        conn = await _connect(host, port, "127.0.0.2")
        try:
            conn[1].write(b"\x00\x40")  # announces 64 bytes, then dribbles them
            for _ in range(30):
                conn[1].write(b"\x00")
                await asyncio.sleep(0.05)
                if conn[0].at_eof():
                    break
            assert await _closed(conn, 2.0)
        finally:
            _close([conn])


async def test_a_complete_query_resets_the_idle_timer(index: Index) -> None:
    async with running(index, tcp_idle_timeout="400ms") as srv:
        host, port = srv.addresses[0]
        conn = await _connect(host, port, "127.0.0.1")
        try:
            for _ in range(4):  # 4 x 200 ms: twice the idle timeout, answered throughout
                assert (await _query(conn)).rcode() == dns.rcode.NOERROR
                await asyncio.sleep(0.2)
            assert (await _query(conn)).answer
        finally:
            _close([conn])


async def test_one_source_cannot_take_every_slot(index: Index) -> None:
    async with running(index, tcp_max_connections=16, tcp_max_connections_per_source=4) as srv:
        host, port = srv.addresses[0]
        hog: list[Conn] = []
        try:
            for _ in range(16):
                hog.append(await _connect(host, port, "127.0.0.2"))
            # The source's connections over its cap are closed at once; the first four stay.
            over = await asyncio.gather(*(_closed(c, 5.0) for c in hog[4:]))
            assert all(over)
            answered = 0
            for _ in range(20):
                reply = await ask(srv, NAME, "A", "tcp", source="127.0.0.1")
                answered += reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)
            assert answered == 20
            for conn in hog[:4]:
                assert not conn[0].at_eof()
                assert (await _query(conn)).answer, "connections within the cap are served"
        finally:
            _close(hog)


async def test_full_table_closes_the_longest_idle_connection(index: Index) -> None:
    async with running(index, tcp_max_connections=3, tcp_max_connections_per_source=3) as srv:
        host, port = srv.addresses[0]
        held = [await _connect(host, port, "127.0.0.2") for _ in range(3)]
        try:
            await eventually(lambda: srv.tcp_connections == 3, what="three connections held")
            assert (await _query(held[0])).answer  # held[0] is active: held[1] is now idle longest
            fresh = await _connect(host, port, "127.0.0.1")
            held.append(fresh)
            assert (await _query(fresh)).answer
            assert await _closed(held[1])
            assert (await _query(held[0])).answer and (await _query(held[2])).answer
        finally:
            _close(held)


async def test_idle_timeout_shrinks_under_pressure(index: Index) -> None:
    async with running(index, tcp_max_connections=8, tcp_max_connections_per_source=8, tcp_idle_timeout="30s") as srv:
        host, port = srv.addresses[0]
        idle = [await _connect(host, port, "127.0.0.2") for _ in range(5)]
        try:
            await eventually(lambda: srv.tcp_connections == 5, what="five connections held")
            await asyncio.sleep(1.2)  # older than the shortest idle timeout under pressure (1 s)
            busy = [await _connect(host, port, "127.0.0.1") for _ in range(3)]
            idle += busy
            # 8 of 8 slots in use: connections idle longer than 1 s are closed, long before 30 s.
            assert all(await asyncio.gather(*(_closed(c, 5.0) for c in idle[:5])))
            for conn in busy:
                assert (await _query(conn)).answer
        finally:
            _close(idle)


async def test_a_connection_waiting_for_a_forwarded_answer_is_not_idle(index: Index) -> None:
    async with (
        upstream_server("ok", delay=0.8) as up,
        running(index, forward=[up.address], tcp_idle_timeout="300ms") as srv,
    ):
        host, port = srv.addresses[0]
        conn = await _connect(host, port, "127.0.0.1")
        try:
            wire = dns.message.make_query("slow.example.", "A").to_wire()
            conn[1].write(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", await asyncio.wait_for(conn[0].readexactly(2), 5))[0]
            reply = dns.message.from_wire(await conn[0].readexactly(size))
            assert reply.answer, "the forwarded answer outlived the idle timeout"
            assert await _closed(conn, 3.0), "idle again after the answer: closed"
        finally:
            _close([conn])
