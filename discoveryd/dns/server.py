"""The DNS server: UDP and TCP listeners in front of the authority and the forwarder.

Data flow of index changes, off the packet path: one task (`_follow`, owned
by `serve()`) waits on `index.wait()` and applies each new snapshot to the
record table: only the hostnames the index reports changed (`changed_between`,
or `index.diff`-style comparison by identity when that history is gone),
a few at a time, yielding to the loop every `_STEP` seconds so that no packet
waits behind a build; the answer cache forgets what each chunk touched. The
first build and a zone change build a new table aside, in the same steps, and
swap it in whole. `serve()` listens only once the first build is done.

Data flow per packet: try the answer cache on the raw bytes
(`Authority.fast`), else read the query (`wire.parse`) and apply the protocol
rules here (FORMERR, NOTIMP, BADVERS, REFUSED), then ask the authority; a name that is not ours goes to the
forwarder in a task of its own, for clients in `dns.allow_forward_from` only.
For such a client with RD set, an answer of ours whose CNAME chain leaves our
data (`Resolved.dangling`) is completed the same way (`_chase`): the target
asked upstream, a chain that comes back into our zones resolved here, bounded
and loop-safe, the whole chain returned with RA set. Other clients get the
bare CNAME.

TCP follows RFC 7766: any number of queries per connection, each answered as
soon as it is ready (forwarded ones may overtake). `tcp.Slots` decides which
connections may stay: at most `tcp_max_connections_per_source` per client,
`tcp_idle_timeout` without a complete query (shorter while over half of
`tcp_max_connections` are open), and a full table closes its longest idle
connection to admit a new one. A message shorter than a DNS header closes the
connection. The listen backlog is `tcp_max_connections`.

With `dns.rrl` or `dns.query_log` on, every UDP reply passes `_gate` (RRL
for our own answers, then the query log); TCP replies are logged, never rate
limited (TCP cannot be spoofed). Counters go to the server's `DnsMetrics`.

Ownership: `serve()` owns every socket, the index-sync task, connection tasks
and forwarding tasks; cancelling it closes them all before it returns. A build
in progress is abandoned between two steps.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from discoveryd import gcpause
from discoveryd.config import DnsConfig, split_hostport
from discoveryd.dns import tcp, udp, wire
from discoveryd.dns.answer import Authority, Edns, Resolved, encode, error_response, response_limit
from discoveryd.dns.cookies import Cookies
from discoveryd.dns.forward import Forwarder, Upstream, for_client
from discoveryd.dns.message import (
    AXFR,
    BADVERS,
    CLASS_IN,
    CNAME,
    FORMERR,
    IXFR,
    MAX_UDP,
    NOERROR,
    NOTIMP,
    OPT,
    REFUSED,
    RR,
    SERVFAIL,
    labels,
    opt_record,
)
from discoveryd.dns.metrics import DnsMetrics, daemon_metrics
from discoveryd.dns.querylog import QueryLog
from discoveryd.dns.records import RecordTable
from discoveryd.dns.rrl import RateLimiter, RrlSettings
from discoveryd.index import Snapshot, SnapshotSource
from discoveryd.model import Hostname, Service, Zone

log = logging.getLogger(__name__)

_MAX_FORWARDS = 1024
"""Forwarded queries in flight; beyond this, new ones get SERVFAIL at once."""
_BIND_ATTEMPTS = 20
"""Tries to find a port free for both TCP and UDP when listening on port 0."""
_UDP_BUFFER = 1 << 20
"""Requested socket buffer size (the kernel caps it at net.core.[rw]mem_max)."""
_ZONE_TRANSFERS = (AXFR, IXFR)
_MAX_CHASE = 8
"""Upstream lookups, and CNAME links read per upstream reply, when completing a chain for a recursive client."""
_HEADER = 12
"""Bytes in a DNS header: no message is shorter."""
_STEP = 0.001
"""Seconds of record building between two yields to the event loop."""
_CHUNK = 8
"""Hostnames applied between two looks at the clock."""


class SyncSteps:
    """How long the sync task held the event loop at most in one step (CPU seconds of this thread).

    Owned by one `DnsServer`; written by its sync task. A query waits at most one step.
    """

    __slots__ = ("longest", "steps")

    def __init__(self) -> None:
        self.longest = 0.0
        self.steps = 0

    def pacer(self) -> _Pacer:
        return _Pacer(self)


class _Pacer:
    """Yields to the loop once `_STEP` seconds of work have passed since the last yield."""

    __slots__ = ("_cpu", "_started", "_stats")

    def __init__(self, stats: SyncSteps) -> None:
        self._stats = stats
        self._started = time.perf_counter()
        self._cpu = time.thread_time()

    async def pause(self) -> None:
        if time.perf_counter() - self._started >= _STEP:
            self.done()
            await asyncio.sleep(0)
            self._started = time.perf_counter()
            self._cpu = time.thread_time()

    def done(self) -> None:
        stats = self._stats
        stats.steps += 1
        stats.longest = max(stats.longest, time.thread_time() - self._cpu)


async def _diff(old: Mapping[Hostname, Service], new: Mapping[Hostname, Service], pacer: _Pacer) -> list[Hostname]:
    """Hostnames whose service differs by identity between two snapshots (`index.diff`), in steps."""
    changed: list[Hostname] = []
    items = iter(new.items())
    while chunk := list(islice(items, 1024)):
        changed.extend(h for h, svc in chunk if old.get(h) is not svc)
        await pacer.pause()
    gone = iter(old)
    while keys := list(islice(gone, 1024)):
        changed.extend(h for h in keys if h not in new)
        await pacer.pause()
    return changed


@dataclass(frozen=True, slots=True)
class _Forward:
    """A query for a name that is not ours, from a client allowed to forward."""

    qname: tuple[bytes, ...]
    qtype: int
    qclass: int
    edns: Edns | None
    qid: int
    rd: bool
    chase: Resolved | None = None
    """Our answer whose CNAME chain leaves our data: resolve `chase.dangling` upstream and append."""


class DnsServer:
    """Authoritative for the given zones (and the hosts in the index), forwarding the rest."""

    def __init__(
        self, config: DnsConfig, index: SnapshotSource, zones: Sequence[Zone], metrics: DnsMetrics | None = None
    ) -> None:
        """`metrics`: where this server counts (the daemon's, in the default registry, when None)."""
        self.metrics = metrics if metrics is not None else daemon_metrics()
        self.started = asyncio.Event()
        self._config = config
        self._index = index
        self._ttl = max(0, round(config.ttl))
        self._serial = int(time.time()) & 0xFFFFFFFF
        self._ns_addresses = _ns_addresses(config.listen)
        self._zones = tuple(zones)
        self._zones_changed = False
        self._snapshot = Snapshot(version=-1)
        """The snapshot the record table reflects (version -1: not built yet)."""
        self.serving_ready = asyncio.Event()
        """Set once the record table reflects a ready snapshot (every registry synced, restored or
        timed out): before that a name the index holds may still be missing from the answers, so
        readiness (/readyz, READY=1) waits for it. Never cleared."""
        self._authority = Authority(self._table(), self.metrics)
        self._sync_lock = asyncio.Lock()
        self._nsid = config.nsid.encode("utf-8")[:512] if config.nsid else None
        self._cookies = (
            Cookies(bytes.fromhex(config.cookie_secret) if config.cookie_secret else None) if config.cookies else None
        )
        self.sync_steps = SyncSteps()
        self._forwarder = Forwarder(
            [Upstream(*split_hostport(f, 53)) for f in config.forward],
            config.forward_timeout,
            config.cache_size,
            randomize_case=config.forward_case_randomization,
            metrics=self.metrics,
        )
        self._allowed_nets = tuple(config.allow_forward_from)
        self._allowed: dict[str, bool] = {}
        self._addresses: list[tuple[str, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        rrl = config.rrl
        self._rrl = (
            RateLimiter(
                RrlSettings(rrl.responses_per_second, rrl.slip, rrl.ipv4_prefix, rrl.ipv6_prefix, rrl.table_size),
                dropped=self.metrics.rrl_dropped,
                slipped=self.metrics.rrl_slipped,
            )
            if rrl.responses_per_second > 0
            else None
        )
        self._query_log = QueryLog(config.query_log_rate) if config.query_log else None
        self._slots = tcp.Slots(
            config.tcp_max_connections, config.tcp_max_connections_per_source, config.tcp_idle_timeout
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self._addresses)

    @property
    def tcp_connections(self) -> int:
        return len(self._slots)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """Serve these zones from now on: a sync task owned by `serve()` rebuilds the table aside
        and swaps it in (without `serve()`, the next `sync()` call does)."""
        self._zones = tuple(zones)
        self._zones_changed = True
        if self.started.is_set():
            task = asyncio.get_running_loop().create_task(self._sync_or_log(), name="dns:zones")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def version(self) -> int:
        """The index version the answers reflect (-1 before the first build)."""
        return self._snapshot.version

    def _table(self) -> RecordTable:
        return RecordTable(self._zones, self._ttl, self._ns_addresses, self._serial)

    def _unbuilt_table(self) -> RecordTable:
        """The table served before the first build: empty, every zone not ready."""
        table = self._table()
        table.unready = frozenset(zone.name for zone in self._zones)
        return table

    async def sync(self) -> None:
        """Bring the record table up to the index's current snapshot and zones.

        Called by `_follow` (and by `serve()` once before listening; tests without sockets call it
        directly). Yields to the loop every `_STEP` seconds; cancellation between two steps leaves
        the table consistent at the previous step (a build aside is dropped).
        """
        async with self._sync_lock:
            # The build makes no reference cycles; a collection in the middle of it would rescan the
            # growing table in one step (0.4 s at 100k services). Paused for the whole sync, other
            # tasks' cyclic garbage included, and restored even when cancelled.
            with gcpause.paused():
                await self._catch_up()

    async def _catch_up(self) -> None:
        while True:
            if self._zones_changed or self._snapshot.version < 0:
                self._zones_changed = False
                await self._rebuild()
                continue
            new = self._index.snapshot
            if new.version == self._snapshot.version:
                return
            await self._advance(new)

    async def _rebuild(self) -> None:
        """Build a table for the current zones and snapshot aside, then swap it in with an empty cache."""
        snapshot = self._index.snapshot
        table = self._table()
        services = snapshot.services
        pacer = self.sync_steps.pacer()
        hosts = iter(services)
        while chunk := list(islice(hosts, _CHUNK)):
            table.update(services, chunk)
            await pacer.pause()
        pacer.done()
        table.unready = self._unready(snapshot)
        self._authority = Authority(table, self.metrics)
        self._snapshot = snapshot
        self.metrics.record_names.set(table.names())
        if snapshot.ready:
            self.serving_ready.set()

    async def _advance(self, new: Snapshot) -> None:
        """Apply the hostnames changed between the table's snapshot and `new`, chunk by chunk."""
        old = self._snapshot
        pacer = self.sync_steps.pacer()
        changed: Iterable[Hostname] | None
        if new.version == old.version + 1:
            changed = new.changed  # no union of sets to build in one step
        else:
            changed = self._index.changed_between(old.version, new.version)
        if changed is None:
            changed = await _diff(old.services, new.services, pacer)
        authority = self._authority
        hosts = iter(changed)
        while chunk := list(islice(hosts, _CHUNK)):
            if self._authority is not authority:
                return  # replaced by a rebuild meanwhile (only `sync` swaps; kept for safety)
            authority.update(new.services, chunk)
            await pacer.pause()
        pacer.done()
        authority.forget(authority.table.set_serial(self._next_serial()))
        unready = self._unready(new)
        if unready != authority.table.unready:
            authority.table.unready = unready
            authority.clear()  # negative answers cached for a zone that turned unready (rare: a registry added)
        self._snapshot = new
        if new.ready:
            self.serving_ready.set()

    def _next_serial(self) -> int:
        """The SOA serial for a table that just took new index versions: the current Unix time, or
        one more than the previous serial when that is not older (several syncs in one second).
        It moves with every applied change and, restarted later, does not go back (RFC 1982)."""
        self._serial = max(int(time.time()), self._serial + 1) & 0xFFFFFFFF
        return self._serial

    def _unready(self, snapshot: Snapshot) -> frozenset[str]:
        """The zones with a registry that is neither synced nor restored nor timed out (`ready`)."""
        shards = snapshot.shards
        return frozenset(
            zone.name
            for zone in self._zones
            if any((status := shards.get(source)) is not None and not status.ready for source in zone.sources)
        )

    async def _sync_or_log(self) -> None:
        try:
            await self.sync()
        except Exception:
            log.exception("dns: failed to apply the new zones; the index-sync task retries")
            self._zones_changed = True

    async def _follow(self) -> None:
        """The index-sync task: apply every new snapshot until cancelled.

        It awaits `index.wait()` itself (no helper task in between), so a small change is applied
        on the loop turn right after it is published, before packets that arrive later.
        """
        while True:
            try:
                await self.sync()
            except Exception:
                log.exception("dns: failed to apply index changes; rebuilding the record table")
                self._zones_changed = True
                await asyncio.sleep(1.0)
                continue
            await self._index.wait(self._snapshot.version)

    # -- lifecycle --------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen on every `dns.listen` address (UDP and TCP) until cancelled. `started` is set once the
        first record table is built; until then the listeners answer as `_unbuilt_table` says."""
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        sockets: list[socket.socket] = []
        follow: asyncio.Task[None] | None = None
        try:
            if self._snapshot.version < 0:
                # Listen before the first build (seconds at 100k names, as after a warm restart): meanwhile
                # every name under our zones is SERVFAIL, which a client retries (never NXDOMAIN, which
                # it would cache), and other names are forwarded as usual.
                self._authority = Authority(self._unbuilt_table(), self.metrics)
            for spec in self._config.listen:
                host, port = split_hostport(spec)
                server, sock, bound = await self._bind(host, port)
                servers.append(server)
                sockets.append(sock)
                self._addresses.append((host, bound))
                log.info("dns: listening on %s:%d (udp, tcp)", host, bound)
            await self.sync()
            follow = asyncio.create_task(self._follow(), name="dns:index-sync")
            self.started.set()
            await asyncio.Event().wait()
        finally:
            for server in servers:
                server.close()
            for sock in sockets:
                loop.remove_reader(sock.fileno())
                sock.close()
            pending = [*self._tasks, *self._connections, *([follow] if follow is not None else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for server in servers:
                await server.wait_closed()
            self._addresses.clear()
            self.started.clear()

    async def _bind(self, host: str, port: int) -> tuple[asyncio.Server, socket.socket, int]:
        loop = asyncio.get_running_loop()
        for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
            try:
                server = await asyncio.start_server(
                    self._tcp_client, host, port, reuse_address=True, backlog=self._config.tcp_max_connections
                )
            except OSError as e:
                raise OSError(e.errno, f"dns: cannot listen on {host}:{port}/tcp: {e.strerror or e}") from e
            bound = int(server.sockets[0].getsockname()[1])
            try:
                sock = _udp_socket(host, bound)
            except OSError as e:
                server.close()
                if port == 0 and e.errno == errno.EADDRINUSE:
                    continue
                raise OSError(e.errno, f"dns: cannot listen on {host}:{bound}/udp: {e.strerror or e}") from e
            gate = self._gate if self._query_log is not None else None
            limit = self._rrl.verdict if self._rrl is not None else None
            loop.add_reader(sock.fileno(), udp.reader(sock, self, self.metrics, gate, limit).readable)
            return server, sock, bound
        raise OSError(errno.EADDRINUSE, f"dns: no port free for both udp and tcp on {host}")

    # -- per query --------------------------------------------------------------------

    def handle(self, data: bytes, client: str, tcp: bool, *, cache_tried: bool = False) -> bytes | _Forward | None:
        """The response to one packet, a forwarding job, or None to drop it. Never raises.

        `cache_tried`: the caller already synced and looked `data` up in the answer cache (with
        cookies on, the UDP lookups decline queries that carry one: they are looked up here, where
        the client's address is known).
        """
        try:
            decorate = self._nsid is not None or self._cookies is not None
            if not cache_tried or (self._cookies is not None and self._has_cookie(data)):
                out = self._authority.fast(data, tcp)
                if out is not None:
                    return self._decorate(data, out, tcp, client) if decorate else out
            parsed = self._parse(data, client, tcp)
            if decorate and isinstance(parsed, bytes):
                return self._decorate(data, parsed, tcp, client)
            return parsed
        except Exception:
            log.exception("dns: failed to answer a query from %s", client)
            self.metrics.dropped.labels("error").inc()
            return error_response(data, SERVFAIL)

    def fast_path(self) -> tuple[udp.Lookup, udp.Lookup]:
        """UDP batches (`udp.Answerer`): the answer cache lookups (the sync task keeps them current).

        With `dns.nsid` set, both add the NSID option to answers of queries that ask for it. With
        `dns.cookies` on, both decline queries carrying a cookie (`answer()` has the address).
        """
        authority = self._authority
        if self._nsid is None and self._cookies is None:
            return authority.repeated, authority.fast

        def repeated(after_id: bytes, tcp: bool) -> bytes | None:
            data = b"\0\0" + after_id
            if self._cookies is not None and self._has_cookie(data):
                return None
            out = authority.repeated(after_id, tcp)
            return None if out is None else self._decorate(data, b"\0\0" + out, tcp, "")[2:]

        def fast(data: bytes, tcp: bool) -> bytes | None:
            if self._cookies is not None and self._has_cookie(data):
                return None
            out = authority.fast(data, tcp)
            return None if out is None else self._decorate(data, out, tcp, "")

        return repeated, fast

    @staticmethod
    def _has_cookie(data: bytes) -> bool:
        try:
            return wire.parse(data).cookie is not None
        except wire.FormatError:
            return False

    def _decorate(self, query: bytes, response: bytes, tcp: bool, client: str) -> bytes:
        """`response` with our NSID (RFC 5001) and server cookie (RFC 7873) options, where `query`
        asked for them, the feature is on, and the result still fits the client's UDP size.

        Our OPT record is always the response's last record, with no options: its RDLENGTH is the
        last two bytes, and the options are appended after them.
        """
        if len(response) < 23 or response[-11:-8] != b"\x00\x00\x29" or response[-2:] != b"\0\0":
            return response
        try:
            parsed = wire.parse(query)
        except wire.FormatError:
            return response
        options = b""
        if self._nsid is not None and parsed.nsid:
            options += b"\x00\x03" + len(self._nsid).to_bytes(2, "big") + self._nsid
        cookie = parsed.cookie
        if self._cookies is not None and cookie is not None and parsed.cookie_ok:
            # A valid server cookie or not, the client gets a fresh one: cookies are not required here.
            both = cookie[:8] + self._cookies.server_cookie(cookie[:8], client)
            options += b"\x00\x0a" + len(both).to_bytes(2, "big") + both
        if not options:
            return response
        out = response[:-2] + len(options).to_bytes(2, "big") + options
        limit = 0xFFFF if tcp else max(512, min(parsed.udp_size, MAX_UDP))
        return out if len(out) <= limit else response

    def answer(self, data: bytes, client: Any, send: Callable[[bytes], None]) -> bytes | None:
        """UDP miss path (`udp.Answerer`): the reply, or None when dropped or forwarded (then `send` gets it)."""
        out = self.handle(data, str(client[0]), False, cache_tried=True)
        if isinstance(out, _Forward):
            self.forward(out, False, send)
            return None
        return out

    def _parse(self, data: bytes, client: str, tcp: bool) -> bytes | _Forward | None:
        if len(data) < _HEADER:
            self.metrics.dropped.labels("short").inc()
            self.metrics.malformed.labels("short").inc()
            return None
        if data[2] & 0x80:
            self.metrics.dropped.labels("response").inc()
            return None
        try:
            query = wire.parse(data)
        except wire.FormatError:
            self.metrics.malformed.labels("unreadable").inc()
            self.metrics.query_counter(0, FORMERR).inc()
            return error_response(data, FORMERR)
        qid, rd, question = query.qid, bool(query.flags & 0x0100), query.question
        if not query.read:  # decided from the header: as cheap as garbage
            self.metrics.malformed.labels("qdcount" if data[4] or data[5] > 1 else "records").inc()
            self.metrics.query_counter(0, FORMERR).inc()
            return error_response(data, FORMERR)
        if query.opcode != 0:
            # No question echoed: another opcode's first section is not a question (UPDATE: the zone).
            self.metrics.query_counter(0, NOTIMP).inc()
            return error_response(data, NOTIMP, None, opt_record(query.do, NOTIMP) if query.opts else None)
        if question is None:
            self.metrics.malformed.labels("qdcount").inc()
            self.metrics.query_counter(0, FORMERR).inc()
            return error_response(data, FORMERR, None, opt_record(query.do, FORMERR) if query.opts else None)
        qname, qtype, qclass = question
        if query.opts > 1 or not query.cookie_ok:
            self.metrics.malformed.labels("opt" if query.opts > 1 else "cookie").inc()
            self.metrics.query_counter(qtype, FORMERR).inc()
            return error_response(data, FORMERR, question, opt_record(query.do, FORMERR))
        edns = None
        if query.opts:
            edns = Edns(udp_size=query.udp_size, do=query.do, version=query.edns_version)
            if query.edns_version:
                self.metrics.query_counter(qtype, BADVERS).inc()
                return encode(qname, qtype, qclass, BADVERS, aa=False, rd=rd, qid=qid, edns=edns)
        if qtype == OPT or qclass != CLASS_IN or qtype in _ZONE_TRANSFERS:
            rcode = FORMERR if qtype == OPT else REFUSED
            if rcode == FORMERR:
                self.metrics.malformed.labels("opt").inc()
            self.metrics.query_counter(qtype, rcode).inc()
            return encode(qname, qtype, qclass, rcode, aa=False, rd=rd, qid=qid, edns=edns)
        recursive = rd and bool(self._forwarder.upstreams) and self._may_forward(client)
        resolved = self._authority.resolve(qname, qtype) if recursive else None
        if resolved is not None and resolved.dangling is not None:
            if len(self._tasks) >= _MAX_FORWARDS:
                self.metrics.forwarded.labels("failed").inc()
                self.metrics.query_counter(qtype, SERVFAIL).inc()
                return encode(qname, qtype, qclass, SERVFAIL, aa=False, ra=True, rd=rd, qid=qid, edns=edns)
            return _Forward(qname, qtype, qclass, edns, qid, rd, resolved)
        answer = self._authority.answer(qname, qtype, qclass, edns, tcp, qid, query.flags, resolved)
        if answer is not None:
            return answer
        if self._snapshot.version < 0 and self._maybe_ours(qname):
            # Before the first build (`_unbuilt_table`) a mesh host outside every zone, or a reverse
            # name, is not in the table yet: upstream would answer "no such name" for it.
            self.metrics.query_counter(qtype, SERVFAIL).inc()
            return encode(qname, qtype, qclass, SERVFAIL, aa=False, rd=rd, qid=qid, edns=edns)
        if not self._forwarder.upstreams or not self._may_forward(client):
            self.metrics.forwarded.labels("refused").inc()
            self.metrics.query_counter(qtype, REFUSED).inc()
            return encode(qname, qtype, qclass, REFUSED, aa=False, rd=rd, qid=qid, edns=edns)
        if len(self._tasks) >= _MAX_FORWARDS:
            self.metrics.forwarded.labels("failed").inc()
            self.metrics.query_counter(qtype, SERVFAIL).inc()
            return encode(qname, qtype, qclass, SERVFAIL, aa=False, ra=True, rd=rd, qid=qid, edns=edns)
        return _Forward(qname, qtype, qclass, edns, qid, rd)

    def _maybe_ours(self, qname: Sequence[bytes]) -> bool:
        """Before the first build: could the table hold `qname` once built? A reverse name, a host of
        the index or a name under one (its SRV names `_port._proto.<host>`, its per-endpoint names
        `<endpoint>.<host>`), or a name under a wildcard host. O(labels)."""
        name = b".".join(qname).decode("ascii", "replace").lower().rstrip(".")
        if name.endswith((".in-addr.arpa", ".ip6.arpa")):
            return True
        services = self._index.snapshot.services
        if name in services:
            return True
        rest = name
        while rest:
            _, _, rest = rest.partition(".")
            if rest in services or f"*.{rest}" in services:
                return True
        return False

    def _may_forward(self, client: str) -> bool:
        allowed = self._allowed.get(client)
        if allowed is None:
            try:
                ip = ipaddress.ip_address(client.partition("%")[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            allowed = any(ip in net for net in self._allowed_nets)
            if len(self._allowed) > 4096:
                self._allowed.clear()
            self._allowed[client] = allowed
        return allowed

    def forward(self, job: _Forward, tcp: bool, send: Callable[[bytes], None]) -> None:
        """Resolve `job` upstream in a task owned by `serve()`, then `send(response)`."""
        task = asyncio.get_running_loop().create_task(self._forward(job, tcp, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, job: _Forward, tcp: bool, send: Callable[[bytes], None]) -> None:
        try:
            if job.chase is not None:
                out = await self._chase(job, job.chase, tcp)
            else:
                out = await self._forwarder.resolve(job.qname, job.qtype, job.qclass, job.edns, tcp, job.qid, job.rd)
        except Exception:
            log.exception("dns: forwarding %s failed", b".".join(job.qname))
            out = encode(
                job.qname, job.qtype, job.qclass, SERVFAIL, aa=False, ra=True, rd=job.rd, qid=job.qid, edns=job.edns
            )
        send(out)

    async def _chase(self, job: _Forward, ours: Resolved, tcp: bool) -> bytes:
        """Our chain `ours` completed as a recursive resolver would: its out-of-zone target asked
        upstream (through the forward cache), a chain coming back into our data resolved here, at most
        `_MAX_CHASE` upstream lookups and no name visited twice (a loop is SERVFAIL)."""
        qname, qtype, qclass = job.qname, job.qtype, job.qclass
        do = job.edns is not None and job.edns.do
        lowered = tuple(p.lower() for p in qname)
        answer = [rr._replace(owner=tuple(qname)) if rr.owner == lowered else rr for rr in ours.answer]
        authority: list[RR] = []
        additional = list(ours.additional)
        seen = {b".".join(lowered).decode("latin-1")}
        rcode, target = NOERROR, ours.dangling
        for _ in range(_MAX_CHASE):
            if target is None:
                break
            if target in seen:
                return self._servfail(job)
            seen.add(target)
            name = labels(target)
            found = await self._forwarder.lookup(name, qtype, qclass, do)
            if found is None:
                return self._servfail(job)
            reply, age = found
            rcode = reply.header.rcode
            answer += [for_client(rr, age, name) for rr in reply.rr]
            authority = [for_client(rr, age, name, negative=not reply.rr) for rr in reply.auth]
            additional += [for_client(rr, age, name) for rr in reply.ar if rr.rtype != OPT]
            target = None
            end = _chain_end(reply, name) if rcode == NOERROR else None
            if end is None:
                break
            if end in seen:
                return self._servfail(job)
            local = self._authority.resolve(labels(end), qtype)
            if local is not None:  # the chain came back into our data
                seen.add(end)
                answer += local.answer
                authority, additional = list(local.authority), additional + list(local.additional)
                rcode, target = local.rcode, local.dangling
        if target is not None:
            return self._servfail(job)
        self.metrics.query_counter(qtype, rcode).inc()
        limit = response_limit(job.edns, tcp)
        out = encode(
            qname,
            qtype,
            qclass,
            rcode,
            aa=True,
            ra=True,
            rd=job.rd,
            qid=job.qid,
            answer=answer,
            authority=authority,
            additional=additional,
            edns=job.edns,
            limit=limit,
        )
        if out[2] & 0x02:
            self.metrics.truncated.inc()
        return out

    # -- rate limiting and the query log ----------------------------------------------

    def _gate(self, response: bytes, ip: bytes, port: int, started: float, local: bool) -> bytes | None:
        """`udp.Gate`: the query log."""
        if self._query_log is not None:
            self._log(ip, port, "udp", response, started)
        return response

    def _log(self, ip: bytes, port: int, proto: str, response: bytes, started: float) -> None:
        assert self._query_log is not None
        written = self._query_log.written
        try:
            self._query_log.record(ip, port, proto, response, started)
        except Exception:
            log.exception("dns: query log failed")
            return
        if self._query_log.written != written:
            self.metrics.query_log_written.n += 1
        else:
            self.metrics.query_log_suppressed.n += 1

    def _servfail(self, job: _Forward) -> bytes:
        self.metrics.query_counter(job.qtype, SERVFAIL).inc()
        return encode(
            job.qname, job.qtype, job.qclass, SERVFAIL, aa=False, ra=True, rd=job.rd, qid=job.qid, edns=job.edns
        )

    # -- TCP --------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        conn = tcp.Conn(tcp.source_key(client), asyncio.get_running_loop().time(), writer.transport.abort)
        shed = self._slots.shed
        refused = self._slots.admit(conn)
        if self._slots.shed != shed:
            self.metrics.tcp_shed.inc(self._slots.shed - shed)
        if refused is not None:
            self.metrics.dropped.labels(refused).inc()
            writer.transport.abort()
            return
        self._connections.add(task)
        self.metrics.tcp_connections.inc()
        try:
            await self._tcp_queries(reader, writer, client, peer[1] if peer else 0, conn)
        except asyncio.CancelledError:
            # Only serve() cancels connections, on shutdown. Ending normally keeps asyncio's
            # stream callback, which reads the task's exception, from raising in the loop.
            return
        finally:
            self._slots.release(conn)
            self.metrics.tcp_connections.dec()
            self._connections.discard(task)
            writer.close()

    async def _tcp_queries(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str, port: int, conn: tcp.Conn
    ) -> None:
        """Answer queries on one connection until it is idle too long (only complete queries count),
        sends something that is not a DNS message, is closed, or the slot table closes it."""
        loop = asyncio.get_running_loop()
        query_log = self._query_log
        ip = _packed(client) if query_log is not None else b""

        def send(out: bytes) -> None:
            if not writer.is_closing():
                writer.write(len(out).to_bytes(2, "big") + out)

        def logged(started: float) -> Callable[[bytes], None]:
            def send_logged(out: bytes) -> None:
                self._log(ip, port, "tcp", out, started)
                send(out)

            return send_logged

        pending = 0
        """Forwarded queries of this connection not answered yet: while any, it is not idle."""

        def answered(reply: Callable[[bytes], None]) -> Callable[[bytes], None]:
            def send_forwarded(out: bytes) -> None:
                nonlocal pending
                pending -= 1
                self._slots.touch(conn, loop.time())
                reply(out)

            return send_forwarded

        while True:
            size = None
            idle = self._slots.idle_timeout()
            try:
                async with asyncio.timeout_at(max(conn.last, loop.time() if pending else 0.0) + idle):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    if size < _HEADER:
                        self.metrics.dropped.labels("tcp_short").inc()
                        self.metrics.malformed.labels("tcp_short").inc()
                        return
                    data = await reader.readexactly(size)
            except TimeoutError:
                # Waiting on our upstream is not the client's idleness; a message cut off midway is.
                if pending and size is None:
                    continue
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            started = time.perf_counter()
            out = self.handle(data, client, True)
            if out is None:
                continue
            self._slots.touch(conn, loop.time())
            reply = send if query_log is None or not ip else logged(started)
            if isinstance(out, _Forward):
                pending += 1
                self.forward(out, True, answered(reply))
            else:
                reply(out)
            try:
                async with asyncio.timeout(self._slots.idle_timeout()):
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                return


def _packed(client: str) -> bytes:
    """A client address as packed bytes (4 or 16), v4-mapped IPv6 as IPv4; empty when unreadable."""
    try:
        ip = ipaddress.ip_address(client.partition("%")[0])
    except ValueError:
        return b""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed


def _chain_end(reply: Any, name: Sequence[bytes]) -> str | None:
    """Where the CNAME chain from `name` in an upstream reply ends, when it ends at a name the reply
    holds no records for (a recursive upstream stops at names in our zones); else None."""
    start = current = b".".join(name).lower()
    owners: dict[bytes, Any] = {}
    for rr in reply.rr:
        owners.setdefault(b".".join(rr.rname.label).lower(), rr)
    for _ in range(_MAX_CHASE):
        rr = owners.get(current)
        if rr is None or rr.rtype != CNAME:
            break
        current = b".".join(rr.rdata.label).lower()
    if current == start or current in owners:
        return None
    return current.decode("latin-1")


def _udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UDP_BUFFER)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _ns_addresses(listen: Sequence[str]) -> list[str]:
    """The listen addresses a client could reach us at (for the apex NS target's A/AAAA)."""
    out = []
    for spec in listen:
        host, _ = split_hostport(spec)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_unspecified:
            out.append(str(ip))
    return out
