"""Forwarding names outside our zones to the configured upstream resolvers, with a TTL cache.

Data flow: the server calls `Forwarder.resolve()` (in a task of its own, one
per forwarded query) only for clients inside `dns.allow_forward_from`. The
upstream query is ours, not the client's: a fresh random ID, a fresh UDP
socket (random source port), the name's letters in random case (0x20, unless
`forward_case_randomization` is off), RD set, EDNS with our 1232-byte size and
the client's DO bit. Each upstream is tried in order with `forward_timeout` per
try; a truncated UDP reply is retried over TCP with the same upstream; a
timeout, an unusable reply or SERVFAIL/REFUSED moves on to the next upstream.
When all fail the client gets SERVFAIL.

Spoofing: a datagram counts as the reply only if it comes from the upstream's
address and port and carries our ID and our question byte for byte (the 0x20
case pattern included); anything else is counted
(`discoveryd_dns_upstream_rejected_total`) and ignored while the exchange keeps
waiting for the genuine reply until its timeout. Of a reply, only the answer
records on the CNAME chain from the question's name are kept, and only the
additional records owned by a name the kept answer or authority records point
to (targets of CNAME, NS, MX, SRV).

Concurrent queries for the same question share one upstream exchange.
Replies are cached by (lower-cased name, type, class, DO) for the smallest TTL
in the answer, or for negative replies min(SOA TTL, SOA MINIMUM) (RFC 2308);
the cache is an LRU of `cache_size` entries. A cached reply is served with
its TTLs decreased by its age, and re-encoded for each client (ID, question
case, OPT, size limit).

Upstream replies are read with dnslib; the client's response is written by
`message.pack`, each upstream record's rdata copied with its names
uncompressed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, DNSBuffer, DNSRecord

from discoveryd.dns.answer import Edns, encode, response_limit
from discoveryd.dns.message import NOERROR, NXDOMAIN, OPT, RR, SERVFAIL, SOA, opt_record, pack
from discoveryd.dns.metrics import DnsMetrics

MAX_CACHE_TTL = 86400
"""Cap on how long any forwarded reply is kept."""
_RD = 0x0100
_MAX_CHAIN = 16
"""CNAME links followed inside one upstream reply when keeping its answer records."""


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class _Entry:
    reply: Any
    """The upstream's DNSRecord (never mutated)."""
    stored: float
    expires: float


_Key = tuple[bytes, int, int, bool]
"""(lower-cased wire name, type, class, DO)."""


class UpstreamError(Exception):
    """One exchange with one upstream did not give a usable reply."""


class Forwarder:
    """Upstream exchanges and the forward cache. Used from one event loop."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        timeout: float,
        cache_size: int,
        *,
        randomize_case: bool = True,
        metrics: DnsMetrics | None = None,
    ) -> None:
        """`metrics`: the owning server's (a private set when None)."""
        self.metrics = metrics if metrics is not None else DnsMetrics()
        self.upstreams = tuple(upstreams)
        self._timeout = timeout
        self._randomize_case = randomize_case
        self._cache_size = cache_size
        self._cache: OrderedDict[_Key, _Entry] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Future[Any]] = {}

    async def resolve(
        self,
        qname: Sequence[bytes],
        qtype: int,
        qclass: int,
        edns: Edns | None,
        tcp: bool,
        qid: int,
        rd: bool,
    ) -> bytes:
        """The client's response: from the cache, else from the first upstream that answers, else SERVFAIL."""
        found = await self.lookup(qname, qtype, qclass, edns is not None and edns.do)
        if found is None:
            self.metrics.query_counter(qtype, SERVFAIL).inc()
            return encode(qname, qtype, qclass, SERVFAIL, aa=False, ra=True, rd=rd, qid=qid, edns=edns)
        reply, age = found
        rcode = reply.header.rcode
        self.metrics.query_counter(qtype, rcode).inc()
        out = encode(
            qname,
            qtype,
            qclass,
            rcode,
            aa=False,
            ra=True,
            rd=rd,
            qid=qid,
            answer=[for_client(rr, age, qname) for rr in reply.rr],
            authority=[for_client(rr, age, qname, negative=not reply.rr) for rr in reply.auth],
            additional=[for_client(rr, age, qname) for rr in reply.ar if rr.rtype != OPT],
            edns=edns,
            limit=response_limit(edns, tcp),
        )
        if out[2] & 0x02:
            self.metrics.truncated.inc()
        return out

    async def lookup(self, qname: Sequence[bytes], qtype: int, qclass: int, do: bool) -> tuple[Any, int] | None:
        """The upstream reply (a dnslib DNSRecord, never to be mutated) and its age in seconds, from the
        cache or the first upstream that answers; None when all fail."""
        key = (b"".join(bytes((len(p),)) + p.lower() for p in qname), qtype, qclass, do)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            self._cache.move_to_end(key)
            self.metrics.forwarded.labels("cached").inc()
            return entry.reply, int(now - entry.stored)
        reply = await self._fetch(key, qname, qtype, qclass, do)
        if reply is None:
            self.metrics.forwarded.labels("failed").inc()
            return None
        self.metrics.forwarded.labels("answered").inc()
        return reply, 0

    async def _fetch(self, key: _Key, qname: Sequence[bytes], qtype: int, qclass: int, do: bool) -> Any:
        """The upstream reply for `key` (cached when cacheable), or None; concurrent identical
        queries share one exchange. Cancelling the task that started it cancels it for all."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._exchange(qname, qtype, qclass, do)
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[key]
        future.set_result(reply)
        if reply is not None:
            self._store(key, reply, time.monotonic())
        return reply

    async def _exchange(self, qname: Sequence[bytes], qtype: int, qclass: int, do: bool) -> Any:
        for upstream in self.upstreams:
            qid = secrets.randbits(16)
            sent = _random_case(qname) if self._randomize_case else tuple(qname)
            wire = pack(qid, _RD, (sent, qtype, qclass), opt=opt_record(do))
            expect = _Expect(qid, sent, qtype, qclass)
            started = time.monotonic()
            try:
                reply = await _udp(upstream, wire, expect, self._timeout, self.metrics)
                if reply.header.tc:
                    reply = expect.check(await _tcp(upstream, wire, self._timeout))
                if reply.header.rcode not in (NOERROR, NXDOMAIN):
                    raise UpstreamError(f"rcode {reply.header.rcode}")
            except (UpstreamError, OSError, TimeoutError) as e:
                result = "timeout" if isinstance(e, TimeoutError) else "error"
                self.metrics.upstream_seconds.labels(str(upstream), result).observe(time.monotonic() - started)
                continue
            self.metrics.upstream_seconds.labels(str(upstream), "ok").observe(time.monotonic() - started)
            return _in_bailiwick(reply, qname)
        return None

    def _store(self, key: _Key, reply: Any, now: float) -> None:
        ttl = min(_cache_ttl(reply), MAX_CACHE_TTL)
        if ttl <= 0 or self._cache_size <= 0:
            return
        self._cache[key] = _Entry(reply, now, now + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def cached(self) -> int:
        return len(self._cache)


def _cache_ttl(reply: Any) -> int:
    rcode = reply.header.rcode
    if rcode == NOERROR and reply.rr:
        return int(min(rr.ttl for rr in reply.rr))
    if rcode in (NOERROR, NXDOMAIN):
        for rr in reply.auth:
            if rr.rtype == SOA:
                return int(min(rr.ttl, rr.rdata.times[4]))
    return 0


def for_client(rr: Any, age: int, qname: Sequence[bytes], *, negative: bool = False) -> RR:
    """The upstream record `rr` with its TTL decreased by `age`, a negative answer's SOA TTL capped
    at its MINIMUM (RFC 2308), and the question's own name in the client's case. Names inside its
    rdata are written uncompressed."""
    ttl = rr.ttl
    if negative and rr.rtype == SOA:
        ttl = min(ttl, rr.rdata.times[4])
    owner = tuple(rr.rname.label)
    if len(owner) == len(qname) and all(a.lower() == b.lower() for a, b in zip(owner, qname, strict=True)):
        owner = tuple(qname)
    rdata = _FlatBuffer()
    rr.rdata.pack(rdata)
    return RR(owner, rr.rtype, max(0, ttl - age), bytes(rdata.data), rr.rclass)


class _FlatBuffer(DNSBuffer):  # type: ignore[misc]
    """A dnslib buffer that writes names without compression pointers, so that rdata stands alone."""

    def encode_name(self, name: Any) -> None:
        self.encode_name_nocompress(name)


_LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _random_case(qname: Sequence[bytes]) -> tuple[bytes, ...]:
    """`qname` with each letter's case chosen at random (draft-vixie-dnsext-dns0x20)."""
    bits = secrets.randbits(sum(len(label) for label in qname) or 1)
    out = []
    for label in qname:
        chars = bytearray(label)
        for i, c in enumerate(chars):
            if c in _LETTERS:
                chars[i] = c | 0x20 if bits & 1 else c & ~0x20
            bits >>= 1
        out.append(bytes(chars))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Expect:
    """What the genuine reply to one upstream query carries: our ID and our question, byte for byte."""

    qid: int
    qname: tuple[bytes, ...]
    qtype: int
    qclass: int

    def check(self, wire: bytes) -> Any:
        """The parsed reply, if it answers this query; else UpstreamError (with the metric reason)."""
        if len(wire) < 12 or int.from_bytes(wire[:2], "big") != self.qid:
            raise UpstreamError("id")
        try:
            reply = DNSRecord.parse(wire)
        except Exception as e:  # dnslib raises several types on malformed input
            raise UpstreamError("malformed") from e
        if not reply.header.qr or len(reply.questions) != 1:
            raise UpstreamError("question")
        q = reply.questions[0]
        if q.qtype != self.qtype or q.qclass != self.qclass:
            raise UpstreamError("question")
        labels = tuple(q.qname.label)
        if labels != self.qname:
            lowered = tuple(p.lower() for p in labels) == tuple(p.lower() for p in self.qname)
            raise UpstreamError("case" if lowered else "question")
        return reply


def _in_bailiwick(reply: Any, qname: Sequence[bytes]) -> Any:
    """`reply` with the answer records off the CNAME chain from `qname` and the additional records
    that no kept record points to removed. Mutates and returns `reply` (ours alone, not yet shared)."""
    chain = {b".".join(qname).lower()}
    kept: set[int] = set()
    for _ in range(_MAX_CHAIN):
        grew = False
        for rr in reply.rr:
            if id(rr) not in kept and _key(rr.rname) in chain:
                kept.add(id(rr))
                grew = True
                if rr.rtype == QTYPE.CNAME:
                    chain.add(_key(rr.rdata.label))
        if not grew:
            break
    answer = [rr for rr in reply.rr if id(rr) in kept]
    targets = set(chain)
    for rr in (*answer, *reply.auth):
        target = _target(rr)
        if target is not None:
            targets.add(target)
    reply.rr = answer
    reply.ar = [rr for rr in reply.ar if rr.rtype == OPT or _key(rr.rname) in targets]
    return reply


def _key(name: Any) -> bytes:
    return b".".join(name.label).lower()


def _target(rr: Any) -> bytes | None:
    """The name an answer or authority record points to, for glue and additional data."""
    if rr.rtype in (QTYPE.CNAME, QTYPE.NS, QTYPE.MX, QTYPE.PTR):
        return _key(rr.rdata.label)
    if rr.rtype == QTYPE.SRV:
        return _key(rr.rdata.target)
    return None


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, expect: _Expect, upstream: tuple[str, int], metrics: DnsMetrics) -> None:
        self.metrics = metrics
        self.expect = expect
        self.upstream = upstream
        self.reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Anything but the genuine reply (late replies, forgeries, garbage) is ignored: keep waiting.
        if self.reply.done():
            return
        if (_normal(addr[0]), addr[1]) != self.upstream:
            self.metrics.upstream_rejected.labels("source").inc()
            return
        try:
            reply = self.expect.check(data)
        except UpstreamError as e:
            self.metrics.upstream_rejected.labels(str(e)).inc()
            return
        self.reply.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return host


async def _udp(upstream: Upstream, wire: bytes, expect: _Expect, timeout: float, metrics: DnsMetrics) -> Any:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(expect, (_normal(upstream.host), upstream.port), metrics),
            remote_addr=(upstream.host, upstream.port),
        )
        try:
            transport.sendto(wire)
            return await protocol.reply
        finally:
            transport.close()


async def _tcp(upstream: Upstream, wire: bytes, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        except asyncio.IncompleteReadError as e:
            raise UpstreamError("connection closed mid-reply") from e
        finally:
            writer.close()
