"""Authoritative answers: resolution over the record table, the answer cache and its hot path.

Data flow: `Authority.repeated()` and `fast()` are the hot path. A query
whose bytes after the ID were seen before is answered from an exact-bytes
map: the stored response minus its ID, which the caller prefixes with the
query's ID (`repeated()` takes and returns the bytes after the ID, so that
the UDP reader copies each datagram once). Otherwise `fast()` reads the question
straight from the packet (`wire.scan`), looks it up in the cache by the
lower-cased question name, then by what changes the answer (`wire.subkey`:
type, class, size limit, OPT presence, DO), and returns the pre-built response
with the query's ID, RD/CD bits and question case patched in. Answer owner names are compressed against the question, so
patching the question's case also gives the owner names the query's case.
Multi-address answers are pre-built in up to `_ROTATIONS` orders and served
in turn.

On a miss the server reads the query (`wire.parse`) and calls `answer()`:
`resolve()` walks the table (CNAME chains, wildcards per RFC 4592, empty
non-terminals), `encode()` packs the response with truncation, and the
result is cached unless the name is not ours (then the caller forwards).

The cache is invalidated by owner name (`forget()`), with the names
`RecordTable.update()` reports plus their ancestors (empty non-terminals may
appear or vanish) and, for a changed wildcard, every cached name below it.
Answers that read other names (CNAME targets, SRV/NS glue) are also
registered under those names.

Memory: what a client can make us keep is bounded in bytes. The answer cache
holds at most `_CACHE_BYTES` of responses (the oldest names go first); the
exact-bytes map only admits queries whose question is in lower case (whose
responses are the cached ones, shared, not copies) and restarts empty past
`_EXACT_BYTES` of keys. Queries that differ only in bytes that do not change
the answer (an unknown EDNS option, the name's case) share one cached answer.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from discoveryd.dns.message import (
    AAAA,
    ANY,
    CNAME,
    MAX_UDP,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    RR,
    SERVFAIL,
    SOA,
    SRV,
    TXT,
    A,
    Named,
    header_flags,
    labels,
    opt_record,
    pack,
)
from discoveryd.dns.metrics import DnsMetrics, Tally
from discoveryd.dns.records import EMPTY, Node, RecordTable
from discoveryd.dns.wire import cache_limit, scan, subkey
from discoveryd.model import Hostname, Service

_MAX_CHAIN = 8
"""CNAME hops followed inside our own data."""
_ROTATIONS = 8
"""Pre-built orders of a multi-address answer; answers cycle through them."""
_CACHE_LIMIT = 100_000
"""Cached answers kept; the oldest names are evicted first."""
_CACHE_BYTES = 16 << 20
"""Bytes of cached responses (with their overhead) kept; the oldest names are evicted first."""
_EXACT_BYTES = 4 << 20
"""Bytes of query keys remembered per transport by the exact-bytes map; it restarts empty past this."""
_BYTES_OVERHEAD = 64
"""What a bytes object and its references cost besides its length (CPython: 33 + pointers)."""
_ENTRY_OVERHEAD = 160
"""What one cached entry or exact-map entry costs besides its bytes (objects, dict slots, tuples)."""
_ANY_ORDER = (CNAME, A, AAAA, SRV, PTR, TXT, SOA, NS)
"""RFC 8482: ANY gets one RRset, the first of these that exists."""


class Resolved(NamedTuple):
    """The content of an authoritative response, before encoding (a tuple: built on every cache miss)."""

    rcode: int
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    rotate: tuple[int, int] = (0, 0)
    """answer[start:end] is one address RRset whose order rotates between responses."""
    reads: frozenset[str] = frozenset()
    """Owner names read besides the question's (cache dependencies)."""
    dangling: str | None = None
    """The CNAME target the chain ends at when that name is not ours (a recursive server chases it)."""


def _find(table: RecordTable, name: str, in_zone: bool) -> Node | None:
    """The records answering for `name` (exact, empty non-terminal `EMPTY`, or a wildcard's), or None."""
    node = table.node(name)
    if node is not None:
        return node
    if in_zone and table.has_descendants(name):
        return EMPTY
    rest = name
    while rest:
        _, _, rest = rest.partition(".")
        if table.node(rest) is not None or table.has_descendants(rest):
            return table.node(f"*.{rest}" if rest else "*")
    return None


def resolve(table: RecordTable, qname: str, qtype: int, qlabels: Sequence[bytes] | None = None) -> Resolved | None:
    """Our answer for (qname, qtype), or None when the name is not ours (forward it).

    A name is ours when it is at or under a zone, or is (or matches a wildcard
    of) a host or reverse name we hold records for. Names outside every zone
    never get an empty non-terminal NODATA or an NXDOMAIN from us. `qlabels`,
    the question's own labels, name the records owned by the question.
    """
    ttl = table.ttl
    zone = table.zone_of(qname)
    name = qname
    answer: list[RR] = []
    reads: set[str] = set()
    rotate = (0, 0)
    rcode = NOERROR
    negative = False
    dangling = None
    for hop in range(_MAX_CHAIN):
        node = _find(table, name, zone is not None)
        if node is None and name in table.forwarded:
            if hop == 0:
                return None  # a DNS-resolution service without addresses: its name resolves upstream
            dangling = name
            break
        if node is None:
            if hop == 0 and zone is None:
                return None
            if zone is not None:
                rcode, negative = NXDOMAIN, True
            break
        owner = tuple(qlabels) if hop == 0 and qlabels is not None else labels(name)
        if qtype == ANY:
            types = node.types()
            rtype = next((t for t in _ANY_ORDER if t in types), None)
            if rtype is None:
                negative = True
            else:
                answer.extend(RR(owner, rtype, ttl, rd) for rd in node.get(rtype) or ())
            break
        rdatas = node.get(qtype)
        if rdatas is not None:
            answer.extend(RR(owner, qtype, ttl, rd) for rd in rdatas)
            if qtype in (A, AAAA) and len(rdatas) > 1:
                rotate = (len(answer) - len(rdatas), len(answer))
            break
        cnames = node.get(CNAME)
        if cnames is None or not isinstance(cnames[0], Named):
            negative = True
            break
        cname = cnames[0]
        answer.append(RR(owner, CNAME, ttl, cname))
        name = cname.target
        reads.add(name)
        zone = table.zone_of(name)
        if zone is None and table.node(name) is None:
            if _find(table, name, False) is None:
                dangling = name
            break
        if name in table.forwarded and table.node(name) is None:
            dangling = name
            break
    authority: list[RR] = []
    if negative and zone is None:
        zone = table.reverse_zone(name)
    if negative and zone is not None and zone.name in table.unready:
        # "No such name" under a zone whose registry has not synced yet is a guess clients would cache.
        return Resolved(SERVFAIL)
    if negative and zone is not None:
        # RFC 2308: the SOA of the zone that holds the last name, for min(SOA TTL, MINIMUM).
        soa = table.soa(zone)
        authority.append(RR(labels(zone.name), SOA, min(ttl, soa.minimum), soa))
    additional = _glue(table, answer, reads)
    return Resolved(rcode, tuple(answer), tuple(authority), tuple(additional), rotate, frozenset(reads), dangling)


def _glue(table: RecordTable, answer: Sequence[RR], reads: set[str]) -> list[RR]:
    """A/AAAA of SRV and NS targets we hold, for the additional section."""
    out: list[RR] = []
    seen: set[str] = set()
    for rr in answer:
        if rr.rtype not in (SRV, NS) or not isinstance(rr.rdata, Named):
            continue
        target = rr.rdata.target
        if target in seen:
            continue
        seen.add(target)
        reads.add(target)
        node = table.node(target)
        if node is None:
            continue
        owner = labels(target)
        for rtype in (A, AAAA):
            out.extend(RR(owner, rtype, table.ttl, rd) for rd in node.get(rtype) or ())
    return out


@dataclass(frozen=True, slots=True)
class Edns:
    """The client's OPT record, as far as it shapes our response."""

    udp_size: int
    do: bool
    version: int = 0


def response_limit(edns: Edns | None, tcp: bool) -> int:
    """Largest response we send: 64 KiB over TCP; over UDP the client's size capped at our 1232, 512 without EDNS."""
    if tcp:
        return 0xFFFF
    if edns is None:
        return 512
    return max(512, min(edns.udp_size, MAX_UDP))


def encode(
    qname: Sequence[bytes],
    qtype: int,
    qclass: int,
    rcode: int,
    *,
    aa: bool,
    ra: bool = False,
    rd: bool = False,
    qid: int = 0,
    answer: Sequence[RR] = (),
    authority: Sequence[RR] = (),
    additional: Sequence[RR] = (),
    edns: Edns | None = None,
    limit: int = 512,
) -> bytes:
    """A response to the question that fits `limit` (`message.pack`), with our OPT record when the query had one."""
    return pack(
        qid,
        header_flags(rcode, aa=aa, rd=rd, ra=ra),
        (qname, qtype, qclass),
        answer,
        authority,
        additional,
        opt_record(edns.do, rcode) if edns is not None else None,
        limit,
    )


def error_response(
    data: bytes, rcode: int, question: tuple[Sequence[bytes], int, int] | None = None, opt: bytes | None = None
) -> bytes | None:
    """A response carrying only `rcode` (the question, when given; our OPT record `opt`, which a
    query with an OPT record must get back, RFC 6891 7) for a query we will not answer."""
    if len(data) < 12:
        return None
    # QR, the query's opcode and RD, the rcode; no other flag.
    flags = 0x8000 | (data[2] & 0x79) << 8 | (rcode & 0xF)
    return pack(int.from_bytes(data[:2], "big"), flags, question, opt=opt)


class _Cached:
    """One cached response in up to `_ROTATIONS` orders, each kept as packed with RD and CD clear.

    `live` turns False when the cache forgets the entry, so that references held
    by the exact-query map die with it. `size` is what the entry costs in bytes,
    counted against `_CACHE_BYTES` by the owning `Authority`.
    """

    __slots__ = ("counter", "flagged", "live", "metrics", "qname_end", "size", "tails", "truncated", "turn", "variants")

    def __init__(self, packed: Sequence[bytes], qname_len: int, counter: Tally, metrics: DnsMetrics) -> None:
        self.metrics = metrics
        self.variants = tuple(packed)
        self.qname_end = 12 + qname_len
        self.turn = 0
        self.counter = counter
        self.tails = len(self.variants)
        self.truncated = bool(packed[0][2] & 0x02)
        self.live = True
        self.flagged: dict[int, tuple[bytes, ...]] = {}
        """RD/CD bits of a lower-case query → every variant after the ID with those bits: shared by
        all such queries (at most four flag combinations)."""
        self.size = _ENTRY_OVERHEAD + sum(len(v) + _BYTES_OVERHEAD for v in self.variants)

    def _after_id(self, packed: bytes, data: bytes, qend: int) -> bytes:
        """`packed` for the query `data`: its RD and CD bits, its question (name case)."""
        flags = bytes((packed[2] | (data[2] & 0x01), packed[3] | (data[3] & 0x10)))
        return flags + packed[4:12] + data[12:qend] + packed[self.qname_end :]

    def reply(self, data: bytes, qend: int) -> bytes:
        """The response to `data`, whose question name ends at `qend`."""
        packed = self.variants[self.turn % self.tails] if self.tails > 1 else self.variants[0]
        self._count()
        return data[:2] + self._after_id(packed, data, qend)

    def shared(self, data: bytes) -> tuple[tuple[bytes, ...], int]:
        """Every variant's response without the ID to the lower-case query `data` (one tuple per
        RD/CD combination, kept here and shared), and how many bytes this call added to `size`."""
        bits = (data[2] & 0x01) << 8 | (data[3] & 0x10)
        found = self.flagged.get(bits)
        if found is not None:
            return found, 0
        rd, cd = data[2] & 0x01, data[3] & 0x10
        found = self.flagged[bits] = tuple(bytes((p[2] | rd, p[3] | cd)) + p[4:] for p in self.variants)
        added = sum(len(v) + _BYTES_OVERHEAD for v in found) + _BYTES_OVERHEAD
        self.size += added
        return found, added

    def pick(self, after_id: tuple[bytes, ...]) -> bytes:
        """This turn's variant out of `shared()`, counted as a cache hit (the hottest call)."""
        self.metrics.cache_hit.n += 1
        self.counter.n += 1
        if self.tails == 1 and not self.truncated:
            return after_id[0]
        turn = self.turn
        self.turn = turn + 1
        if self.truncated:
            self.metrics.truncated.n += 1
        return after_id[turn % self.tails]

    def _count(self) -> None:
        self.turn += 1
        self.counter.n += 1
        if self.truncated:
            self.metrics.truncated.n += 1


_ExactMap = dict[bytes, tuple[_Cached, tuple[bytes, ...]]]


@dataclass(slots=True)
class _Slot:
    """The cached answers for one question name (lower-cased wire form `key`)."""

    key: bytes
    subs: tuple[int, ...] = ()
    """The `subkey`s answered, in parallel with `answers`: most names are asked one way."""
    answers: tuple[_Cached, ...] = ()
    reads: frozenset[str] = frozenset()
    """Other owner names these answers were built from (registered in `Authority._deps`)."""

    def get(self, sub: int) -> _Cached | None:
        subs = self.subs
        if sub in subs:
            return self.answers[subs.index(sub)]
        return None

    def put(self, sub: int, cached: _Cached) -> _Cached | None:
        """Store `cached` under `sub`; return the entry it replaces."""
        if sub in self.subs:
            at = self.subs.index(sub)
            previous = self.answers[at]
            self.answers = (*self.answers[:at], cached, *self.answers[at + 1 :])
            return previous
        self.subs += (sub,)
        self.answers += (cached,)
        return None


def _dotted(key: bytes) -> str:
    """The owner name of a lower-cased wire name, as the record table spells it."""
    parts, i = [], 0
    while key[i]:
        parts.append(key[i + 1 : i + 1 + key[i]].decode("latin-1").replace(".", "\\."))
        i += 1 + key[i]
    return ".".join(parts)


def _wire_name(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p for p in labels(name)) + b"\x00"


class Authority:
    """The record table plus the answer cache in front of it. Owned by one server, used on its loop."""

    def __init__(self, table: RecordTable, metrics: DnsMetrics | None = None) -> None:
        """`metrics`: the owning server's (a private set when None)."""
        self.table = table
        self.metrics = metrics if metrics is not None else DnsMetrics()
        self._cache: OrderedDict[bytes, _Slot] = OrderedDict()
        self._size = 0
        self._bytes = 0
        """Bytes of every cached entry (`_Cached.size`) and slot key."""
        self._deps: dict[str, set[bytes]] = {}
        # Query bytes after the ID → (entry, its shared responses after the ID), per transport: a
        # repeated lower-case query (same flags and EDNS bytes) skips even `scan`.
        self._exact: tuple[_ExactMap, _ExactMap] = ({}, {})
        self._exact_bytes = [0, 0]

    # -- hot path ---------------------------------------------------------------------

    def repeated(self, after_id: bytes, tcp: bool) -> bytes | None:
        """The cached response to a query seen before, without its ID, by the query's bytes after
        its ID; None when not seen (then `fast()`)."""
        known = self._exact[tcp].get(after_id)
        if known is None or not known[0].live:
            return None
        return known[0].pick(known[1])

    def fast(self, data: bytes, tcp: bool) -> bytes | None:
        """The cached response to a plain query, or None (parse and `answer()` it)."""
        exact = self._exact[tcp]
        known = exact.get(data[2:])
        if known is not None and known[0].live:
            return data[:2] + known[0].pick(known[1])
        found = scan(data, tcp)
        if found is None:
            return None
        qend, sub = found
        question = data[12:qend]
        key = question.lower()
        slot = self._cache.get(key)
        cached = slot.get(sub) if slot is not None else None
        if cached is None:
            self.metrics.cache_miss.n += 1
            return None
        if question != key:  # a mixed-case query gets its own copy, kept nowhere
            self.metrics.cache_hit.n += 1
            return cached.reply(data, qend)
        responses, added = cached.shared(data)
        if added:
            self._account(added)
        cost = len(data) + _ENTRY_OVERHEAD
        if self._exact_bytes[tcp] + cost > _EXACT_BYTES:
            exact.clear()
            self._exact_bytes[tcp] = 0
        exact[data[2:]] = (cached, responses)
        self._exact_bytes[tcp] += cost
        self._account(0)
        return data[:2] + cached.pick(responses)

    # -- miss path --------------------------------------------------------------------

    def resolve(self, qname: Sequence[bytes], qtype: int) -> Resolved | None:
        """`resolve()` for the question name as sent (no cache), or None when the name is not ours."""
        lowered = tuple(map(bytes.lower, qname))
        joined = b".".join(lowered)
        if joined.count(b".") == len(lowered) - 1 or not lowered:
            name = joined.decode("latin-1")
        else:  # a label holding a dot: escaped, so that it matches no owner name
            name = ".".join(p.decode("latin-1").replace(".", "\\.") for p in lowered)
        return resolve(self.table, name, qtype, lowered)

    def answer(
        self,
        qname: Sequence[bytes],
        qtype: int,
        qclass: int,
        edns: Edns | None,
        tcp: bool,
        qid: int,
        flags: int,
        resolved: Resolved | None = None,
    ) -> bytes | None:
        """Our response to the query (cached for the next time), or None when the name is not ours.

        `qname` is as sent; `flags` are bytes 2..3 of the query (RD and CD are copied); `resolved`,
        when the caller already has it, is `self.resolve(qname, qtype)`. A chain ending outside our
        data (`Resolved.dangling`) is not cached: recursive clients get it chased instead.
        """
        if resolved is None:
            resolved = self.resolve(qname, qtype)
        if resolved is None:
            return None
        lowered = tuple(map(bytes.lower, qname))
        limit = 0xFFFF if tcp else cache_limit(response_limit(edns, False))
        question = (lowered, qtype, qclass)
        header = header_flags(resolved.rcode, aa=resolved.rcode != SERVFAIL)
        opt = opt_record(edns.do, resolved.rcode) if edns is not None else None
        answer, authority, additional = resolved.answer, resolved.authority, resolved.additional
        packed = [pack(0, header, question, answer, authority, additional, opt, limit)]
        start, end = resolved.rotate
        for turn in range(1, min(end - start, _ROTATIONS)):
            rrset = answer[start:end]
            rotated = (*answer[:start], *rrset[turn:], *rrset[:turn], *answer[end:])
            packed.append(pack(0, header, question, rotated, authority, additional, opt, limit))
        wire = b"".join(bytes((len(p),)) + p for p in qname) + b"\x00"
        key = wire.lower()  # length bytes are below 64: lower() changes only the labels' letters
        cached = _Cached(packed, len(key), self.metrics.query_counter(qtype, resolved.rcode), self.metrics)
        if resolved.dangling is None and resolved.rcode != SERVFAIL:
            sub = subkey(qtype, qclass, limit, edns is not None and edns.do, edns is not None)
            self._store(key, sub, cached, resolved.reads)
        return cached.reply(struct.pack("!HH8x", qid, flags) + wire, 12 + len(wire))

    def _store(self, key: bytes, sub: int, cached: _Cached, reads: frozenset[str]) -> None:
        slot = self._cache.get(key)
        if slot is None:
            slot = self._cache[key] = _Slot(key)
            self._bytes += len(key) + _BYTES_OVERHEAD + _ENTRY_OVERHEAD
        previous = slot.put(sub, cached)
        if previous is None:
            self._size += 1
        else:
            previous.live = False
            self._bytes -= previous.size
        for read in reads:
            self._deps.setdefault(read, set()).add(key)
        if not reads <= slot.reads:
            slot.reads |= reads
        self._account(cached.size)

    def _account(self, added: int) -> None:
        """Count `added` bytes of cached answers, then evict the oldest names while over the bounds."""
        self._bytes += added
        cache = self._cache
        while (self._bytes > _CACHE_BYTES or self._size > _CACHE_LIMIT) and len(cache) > 1:
            self._drop(cache.popitem(last=False)[1])
        self.metrics.cache_bytes.n = self._bytes + self._exact_bytes[0] + self._exact_bytes[1]

    def cache_bytes(self) -> int:
        """Bytes the answer cache and the exact-bytes maps hold, as accounted (shown as a gauge)."""
        return self._bytes + self._exact_bytes[0] + self._exact_bytes[1]

    # -- invalidation -----------------------------------------------------------------

    def load(self, services: Mapping[Hostname, Service]) -> None:
        """Rebuild every record from `services` and empty the cache."""
        self.table.load(services)
        self.clear()

    def update(self, services: Mapping[Hostname, Service], changed: Iterable[Hostname]) -> None:
        """Rebuild the records of the `changed` hostnames and forget the answers that depended on them."""
        self.forget(self.table.update(services, changed))

    def clear(self) -> None:
        for slot in self._cache.values():
            self._drop(slot)
        self._cache.clear()
        self._deps.clear()
        for exact in self._exact:
            exact.clear()
        self._exact_bytes = [0, 0]
        self._bytes = 0
        self.metrics.cache_bytes.n = 0
        self.metrics.record_names.set(self.table.names())

    def forget(self, names: Iterable[str]) -> None:
        """Drop cached answers that may depend on these owner names."""
        dotted: set[str] = set()
        wildcards: list[str] = []
        for name in names:
            if name == "*" or name.startswith("*."):
                wildcards.append(name[1:])
            if name in dotted:
                continue
            dotted.add(name)
            for n in _ancestors(name):
                if n in dotted:
                    break  # added before, with all its ancestors
                dotted.add(n)
        self.metrics.record_names.set(self.table.names())
        if not self._cache:
            return
        keys: set[bytes] = set()
        deps = self._deps
        for n in dotted:
            keys.add(_wire_name(n))
            if n in deps:
                keys |= deps.pop(n)
        if wildcards:
            keys.update(k for k in self._cache if any(_dotted(k).endswith(w) for w in wildcards))
        for key in keys:
            slot = self._cache.pop(key, None)
            if slot is not None:
                self._drop(slot)
        self.metrics.cache_bytes.n = self.cache_bytes()

    def _drop(self, slot: _Slot) -> None:
        """Account for a slot leaving the cache: its entries die, its dependencies go."""
        self._size -= len(slot.answers)
        self._bytes -= len(slot.key) + _BYTES_OVERHEAD + _ENTRY_OVERHEAD + sum(c.size for c in slot.answers)
        for read in slot.reads:
            keys = self._deps.get(read)
            if keys is not None:
                keys.discard(slot.key)
                if not keys:
                    del self._deps[read]
        for cached in slot.answers:
            cached.live = False

    def cached(self) -> int:
        return self._size


def _ancestors(name: str) -> Iterable[str]:
    while name:
        _, _, name = name.partition(".")
        yield name
