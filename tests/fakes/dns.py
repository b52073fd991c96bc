"""Harness for the DNS tests: a running DnsServer, dnspython queries, and a loopback upstream we control.

tests/unit/test_dns_harness.py checks the harness itself (the upstream answers as configured).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from dnslib import QTYPE, RR, SOA, A, DNSRecord

from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Hostname, Zone, ZoneFlavor
from tests.helpers import free_port

CLUSTER = Zone(Hostname("cluster.local"), ZoneFlavor.KUBERNETES)
CONSUL = Zone(Hostname("consul"), ZoneFlavor.CONSUL)
MESH = Zone(Hostname("mesh.local"), ZoneFlavor.PLAIN)


@contextlib.asynccontextmanager
async def running(
    index: Index, zones: Sequence[Zone] = (CLUSTER, CONSUL, MESH), **config: Any
) -> AsyncIterator[DnsServer]:
    """A DnsServer on 127.0.0.1 (port 0 unless `listen` is given), cancelled on exit."""
    config.setdefault("listen", ["127.0.0.1:0"])
    server = DnsServer(DnsConfig(**config), index, zones)
    task = asyncio.create_task(server.serve())
    started = asyncio.create_task(server.started.wait())
    try:
        await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert server.started.is_set(), "DNS server did not start"
        yield server
    finally:
        started.cancel()
        task.cancel()
        await asyncio.gather(task, started, return_exceptions=True)


async def ask(
    server: DnsServer,
    name: str,
    rdtype: str | int = "A",
    transport: str = "udp",
    *,
    edns: int | bool = 0,
    payload: int = 1232,
    source: str | None = None,
    address: int = 0,
) -> dns.message.Message:
    """One query with dnspython; `edns=False` sends none."""
    use_edns = False if edns is False else int(edns)
    query = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload)
    host, port = server.addresses[address]
    if transport == "udp":
        return await dns.asyncquery.udp(query, host, port=port, timeout=5, source=source)
    return await dns.asyncquery.tcp(query, host, port=port, timeout=5, source=source)


async def raw_udp(server: DnsServer, packet: bytes, timeout: float = 2.0) -> bytes | None:
    """Send one datagram, return the reply (None if none arrives in `timeout`)."""
    loop = asyncio.get_running_loop()
    host, port = server.addresses[0]
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(host, port))
    try:
        transport.sendto(packet)
        try:
            return await asyncio.wait_for(replies.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


def rrs(section: Sequence[Any]) -> list[str]:
    """A message section as sorted presentation lines (`name ttl IN type rdata`)."""
    return sorted(line for rrset in section for line in rrset.to_text().splitlines())


@dataclass
class Upstream:
    """A tiny loopback DNS server (UDP and TCP on one port) whose behaviour a test sets.

    mode: "ok" answers A 192.0.2.1 (TTL `ttl`); "nxdomain" answers NXDOMAIN with an SOA;
    "servfail"; "silent" never replies; "truncate" sets TC over UDP and answers fully over TCP.
    Every reply leaves `delay` seconds after the query arrived.
    """

    mode: str = "ok"
    ttl: int = 300
    port: int = 0
    delay: float = 0.0
    queries: Counter[str] = field(default_factory=Counter)

    def reply(self, data: bytes, tcp: bool) -> bytes | None:
        self.queries["tcp" if tcp else "udp"] += 1
        query = DNSRecord.parse(data)
        if self.mode == "silent":
            return None
        reply = query.reply()
        reply.header.ra = 1
        if self.mode == "servfail":
            reply.header.rcode = 2
        elif self.mode == "nxdomain":
            reply.header.rcode = 3
            soa = SOA("ns.upstream.test", "hostmaster.upstream.test", (1, 2, 3, 4, 60))
            reply.add_auth(RR("upstream.test", QTYPE.SOA, ttl=120, rdata=soa))
        elif self.mode == "truncate" and not tcp:
            reply.header.tc = 1
        else:
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=self.ttl, rdata=A("192.0.2.1")))
            if self.mode == "truncate":
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=self.ttl, rdata=A("192.0.2.2")))
        packed: bytes = reply.pack()
        return packed

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def upstream_server(mode: str = "ok", ttl: int = 300, delay: float = 0.0) -> AsyncIterator[Upstream]:
    up = Upstream(mode, ttl, free_port(), delay)
    loop = asyncio.get_running_loop()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            out = up.reply(data, False)
            if out is not None:
                loop.call_later(up.delay, self.send, out, addr)

        def send(self, out: bytes, addr: Any) -> None:
            if not self.transport.is_closing():
                self.transport.sendto(out, addr)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            out = up.reply(await reader.readexactly(size), True)
            await asyncio.sleep(up.delay)
            if out is not None:
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", up.port))
    server = await asyncio.start_server(tcp, "127.0.0.1", up.port)
    try:
        yield up
    finally:
        udp.close()
        server.close()
        await server.wait_closed()
