"""Fuzzing the DNS server with random and mutated packets.

In process, every packet goes through `DnsServer.handle` (the function both transports call):
it must never raise, never hit its own last-resort error path, and return either nothing, a
forwarding job, or a response carrying the query's ID. Over the wire, a server running in a
thread of its own gets the same packets over UDP and TCP (including lying length prefixes and
half-sent messages), and must keep answering a valid query within a deadline after each one. That
server runs on uvloop, the loop production uses; every other DNS test runs on asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, Service, SourceId
from tests.fakes.dns import CLUSTER, CONSUL, MESH

NAMES = ["web.default.svc.cluster.local.", "users.mesh.local.", "nope.mesh.local.", "example.com.", "."]
TYPES = ["A", "AAAA", "SRV", "PTR", "ANY", "HTTPS", "TXT", "SOA", "NS", "CNAME", "AXFR", "OPT"]


def _index() -> Index:
    index = Index()
    shard = index.writer(SourceId("kubernetes/c1"))
    shard.replace(
        [
            Service(Hostname("web.default.svc.cluster.local"), addresses=("10.96.0.10",), ports=(Port(80, "http"),)),
            Service(
                Hostname("users.mesh.local"),
                ports=(Port(9090, "grpc"),),
                endpoints=tuple(Endpoint(f"10.3.0.{i}") for i in range(1, 60)),
            ),
        ]
    )
    shard.mark_synced()
    return index


def _queries() -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        edns = draw(st.sampled_from([False, 0, 1]))
        query = dns.message.make_query(
            draw(st.sampled_from(NAMES)),
            draw(st.sampled_from(TYPES)),
            use_edns=edns,
            payload=draw(st.integers(0, 65535)),
            want_dnssec=draw(st.booleans()),
        )
        query.id = draw(st.integers(0, 0xFFFF))
        return query.to_wire()

    return build()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_queries()))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


PACKETS = st.one_of(st.binary(max_size=600), _queries(), _mutated())


def _errors() -> float:
    return REGISTRY.get_sample_value("discoveryd_dns_dropped_total", {"reason": "error"}) or 0.0


@pytest.fixture(scope="module")
def handler() -> DnsServer:
    server = DnsServer(DnsConfig(forward=["127.0.0.1:9"]), _index(), [CLUSTER, CONSUL, MESH])
    asyncio.run(server.sync())
    return server


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=PACKETS, tcp=st.booleans())
# An UPDATE whose first section holds an A question: a NOTIMP echoing it is no UPDATE message dnspython can read.
@example(packet=b"\x12\x34\x28\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01", tcp=False)
def test_handler_never_raises(handler: DnsServer, packet: bytes, tcp: bool) -> None:
    before = _errors()
    out = handler.handle(packet, "127.0.0.1", tcp)
    assert _errors() == before, "the handler hit its last-resort error path"
    if isinstance(out, bytes):
        assert len(out) >= 12 and out[:2] == packet[:2] and out[2] & 0x80
        if not tcp:
            assert len(out) <= 1232
        dns.message.from_wire(out, ignore_trailing=True)


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[tuple[str, int]]:
    """A DnsServer on its own uvloop (as in production) in a thread, so that blocking sockets can drive it."""
    server = DnsServer(DnsConfig(listen=["127.0.0.1:0"], tcp_idle_timeout="1s"), _index(), [CLUSTER, CONSUL, MESH])
    loop = uvloop.new_event_loop()
    task: asyncio.Task[None] | None = None

    def run() -> None:
        nonlocal task
        task = loop.create_task(server.serve())
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, name="dns-fuzz-server", daemon=True)
    thread.start()
    try:
        deadline = 100
        while not server.addresses and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert server.addresses, "server did not start"
        yield server.addresses[0]
    finally:
        if task is not None:
            loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        loop.close()


def _still_answers(host: str, port: int) -> None:
    query = dns.message.make_query("web.default.svc.cluster.local.", "A")
    for reply in (
        dns.query.udp(query, host, port=port, timeout=3),
        dns.query.tcp(query, host, port=port, timeout=3),
    ):
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer


@settings(max_examples=150, deadline=None)
@given(packets=st.lists(PACKETS, min_size=1, max_size=4), lie=st.integers(-3, 3), half=st.booleans())
def test_server_survives_garbage_over_udp_and_tcp(
    threaded_server: tuple[str, int], packets: list[bytes], lie: int, half: bool
) -> None:
    host, port = threaded_server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for packet in packets:
            udp.sendto(packet, (host, port))
    with socket.create_connection((host, port), timeout=3) as tcp:
        stream = b"".join(struct.pack("!H", len(p)) + p for p in packets[:-1])
        last = packets[-1]
        stream += struct.pack("!H", max(0, min(0xFFFF, len(last) + lie))) + last
        if half:
            stream = stream[: len(stream) // 2]
        tcp.sendall(stream)
    _still_answers(host, port)
