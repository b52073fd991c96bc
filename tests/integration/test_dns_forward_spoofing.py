"""Forged upstream replies: a loopback upstream that sends forgeries before its genuine answer.

The forwarder must ignore datagrams whose source, ID or question (including the 0x20 case pattern of
the name it sent) do not match and keep waiting for the genuine reply; additional records that are not
about the answer's names never reach the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.rcode
from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSLabel, DNSQuestion, DNSRecord

from discoveryd.index import Index
from tests.fakes.dns import ask, rrs, running

NAME = "spoof-target-with-many-letters.example.com"


def _swapcase(label: bytes) -> bytes:
    return bytes(c ^ 0x20 if chr(c).isalpha() else c for c in label)


@dataclass
class Forger:
    """Answers each query with forgeries first (each kind in `forgeries`), then the genuine reply."""

    port: int = 0
    forgeries: tuple[str, ...] = ()
    seen: list[tuple[bytes, ...]] = field(default_factory=list)

    def genuine(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply()
        reply.header.ra = 1
        qname = query.q.qname
        if str(qname).lower().startswith("alias."):
            target = "real-host.example.net"
            reply.add_answer(RR(qname, QTYPE.CNAME, ttl=300, rdata=CNAME(target)))
            reply.add_answer(RR(target, QTYPE.A, ttl=300, rdata=A("192.0.2.9")))
            reply.add_ar(RR(target, QTYPE.AAAA, ttl=300, rdata=AAAA("2001:db8::9")))
        else:
            reply.add_answer(RR(qname, QTYPE.A, ttl=300, rdata=A("192.0.2.1")))
        # Not about the answer's names: must be dropped.
        reply.add_answer(RR("bank.example.org", QTYPE.A, ttl=86400, rdata=A("6.6.6.1")))
        reply.add_ar(RR("bank.example.org", QTYPE.A, ttl=86400, rdata=A("6.6.6.2")))
        return reply

    def forged(self, kind: str, query: DNSRecord) -> bytes:
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=86400, rdata=A("6.6.6.6")))
        if kind == "question":
            reply.questions = [DNSQuestion("other.example.com", query.q.qtype)]
        elif kind == "case":
            swapped = DNSLabel([_swapcase(label) for label in query.q.qname.label])
            reply.questions = [DNSQuestion(swapped, query.q.qtype)]  # a new question: the query's is shared
        elif kind == "id":
            reply.header.id ^= 0x5555
        elif kind == "garbage":
            return query.pack()[:2] + b"\x81\x80\xff\xff\x00\x07garbage"
        packed: bytes = reply.pack()
        return packed


@contextlib.asynccontextmanager
async def forger(*forgeries: str) -> AsyncIterator[Forger]:
    up = Forger(forgeries=forgeries)
    loop = asyncio.get_running_loop()
    elsewhere = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elsewhere.bind(("127.0.0.1", 0))
    elsewhere.setblocking(False)

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            query = DNSRecord.parse(data)
            up.seen.append(tuple(query.q.qname.label))
            for kind in up.forgeries:
                if kind == "source":  # right ID and question, from another port
                    reply = up.genuine(query)
                    reply.rr = [RR(query.q.qname, QTYPE.A, ttl=86400, rdata=A("6.6.6.6"))]
                    elsewhere.sendto(reply.pack(), addr)
                else:
                    self.transport.sendto(up.forged(kind, query), addr)
            loop.call_later(0.05, self.transport.sendto, up.genuine(query).pack(), addr)

    transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
    up.port = transport.get_extra_info("sockname")[1]
    try:
        yield up
    finally:
        transport.close()
        elsewhere.close()


async def test_forgeries_before_the_genuine_reply_are_ignored(index: Index) -> None:
    async with (
        forger("question", "garbage", "id", "case", "source") as up,
        running(index, forward=[f"127.0.0.1:{up.port}"], forward_timeout="2s") as srv,
    ):
        reply = await ask(srv, NAME + ".", "A")
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.RA
        assert rrs(reply.answer) == [f"{NAME}. 300 IN A 192.0.2.1"]
        assert rrs(reply.additional) == []


async def test_unrelated_records_are_dropped_and_the_chain_kept(index: Index) -> None:
    async with forger() as up, running(index, forward=[f"127.0.0.1:{up.port}"]) as srv:
        reply = await ask(srv, "alias.example.com.", "A")
        assert rrs(reply.answer) == [
            "alias.example.com. 300 IN CNAME real-host.example.net.",
            "real-host.example.net. 300 IN A 192.0.2.9",
        ]
        assert rrs(reply.additional) == ["real-host.example.net. 300 IN AAAA 2001:db8::9"]


async def test_query_name_case_is_randomised_towards_upstreams(index: Index) -> None:
    async with forger() as up, running(index, forward=[f"127.0.0.1:{up.port}"], cache_size=0) as srv:
        for _ in range(4):
            reply = await ask(srv, NAME + ".", "A")
            assert rrs(reply.answer) == [f"{NAME}. 300 IN A 192.0.2.1"]  # the client's own case back
        assert {tuple(label.lower() for label in seen) for seen in up.seen} == {tuple(NAME.encode().split(b"."))}
        assert len(set(up.seen)) > 1, f"the upstream saw one case pattern only: {up.seen}"


async def test_case_randomisation_can_be_turned_off(index: Index) -> None:
    async with (
        forger() as up,
        running(index, forward=[f"127.0.0.1:{up.port}"], cache_size=0, forward_case_randomization=False) as srv,
    ):
        for _ in range(3):
            assert (await ask(srv, NAME + ".", "A")).answer
        assert set(up.seen) == {tuple(NAME.encode().split(b"."))}
