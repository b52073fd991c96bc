"""Watch one etcd key prefix and keep the registry's shard equal to it.

Data flow, in the registry's own task (`run`):

1. connect to one of the configured endpoints (the next one after a failure),
   authenticate when a username is set;
2. list the prefix in pages, all pages read at the revision of the first one,
   parse every key with the configured format (`formats.py`) and
   `shard.replace` the result, then `shard.mark_synced`;
3. watch the prefix from that revision + 1 and apply each watch response's
   events as one `shard.batch()`: only the hostnames whose members changed
   are rebuilt (`formats.assemble`) and upserted or deleted. A lease that
   expires arrives as a DELETE like any other;
4. when the connection breaks, `shard.mark_failing` (the content stays,
   marked stale), reconnect with exponential backoff and jitter (the shared
   session loop, `discoveryd.session`: reset after a watch that lasted), and resume
   the watch from the last revision seen + 1; when etcd has compacted that
   revision away, list again and replace (step 2). On every reconnect the
   cluster ID and current revision are compared with the last seen: another
   cluster at the same address (etcd restored, or started on a new data
   dir) or a revision below the last applied one also means listing again.
5. the resume point (`<cluster ID>:<revision>`) is saved with the content
   in the same batch; after a warm restart from the state directory, if
   etcd is still the same cluster at that very revision the restored content
   is exact and marked synced at once. The prefix is listed all the same:
   the per-key state that applying watch events needs is not in the
   snapshot (which holds services, not keys).

A key whose value does not parse is skipped and reported with
`shard.set_problems(<key>, ...)`; the report is cleared when the key is fixed
or deleted. Nothing a value contains stops the watch.

The adapter speaks etcd's v3 gRPC API through aetcd's generated stubs
(`aetcd.rpc`) on its own channel: aetcd's `Client` has no TLS, no paged
range and hands out watch events one at a time, all of which this needs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aetcd import rpc

from adapters.etcd.config import EtcdConfig, split_endpoint
from adapters.etcd.formats import FORMATS, Format, FormatError, Member, assemble
from adapters.toolkit.sync import replace_all
from discoveryd.model import Hostname, Problem, SourceId, Zone, ZoneFlavor, hostname
from discoveryd.registry import RegistryConfig, ShardWriter
from discoveryd.session import Backoff, SessionState, run_sessions

log = logging.getLogger("discoveryd.adapters.etcd")

_STABLE_AFTER = 1.0
"""A watch that stayed up this long (seconds) was healthy: its loss resets the backoff."""


class EtcdError(Exception):
    """etcd could not be used: no endpoint reachable, a watch canceled or closed by the server."""


class _Compacted(Exception):
    """The watch's start revision was compacted away: only a new list can catch up."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


_TRANSIENT = (grpc.RpcError, OSError, TimeoutError, EtcdError)


def describe(error: BaseException) -> str:
    """A one-line reason for logs and `mark_failing`."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def _range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


@dataclass(slots=True)
class _Connection:
    """One gRPC channel to one etcd member, authenticated when configured."""

    endpoint: int
    """Index into `EtcdConfig.endpoints`."""
    channel: grpc.aio.Channel
    kv: Any
    watch: Any
    metadata: tuple[tuple[str, str], ...]


def _key(kv: Any) -> str:
    return str(kv.key.decode("utf-8", "backslashreplace"))


@dataclass(slots=True)
class _Listing:
    """A full list being read page by page; nothing reaches the shard until `_View.commit`."""

    keys: dict[str, tuple[Member, ...]] = field(default_factory=dict)
    problems: dict[str, Problem] = field(default_factory=dict)
    count: int = 0


class _View:
    """The parsed content of the prefix, and the shard writes that keep the index equal to it.

    Owned by the registry's task; every method runs there.
    """

    def __init__(self, fmt: Format, prefix: str, shard: ShardWriter) -> None:
        self._fmt = fmt
        self._prefix_len = len(prefix)
        self._shard = shard
        self._source = shard.source
        self._keys: dict[str, tuple[Member, ...]] = {}
        self._hosts: dict[Hostname, dict[str, Member]] = {}
        self._problems: set[str] = set()
        self.revision = 0
        """Every change up to this revision is applied; 0: a full list is needed."""
        self.cluster_id = 0
        """The cluster the content was read from; 0: none yet."""
        self.restored: tuple[int, int] | None = _parse_resume_point(shard.resume_point)
        """(cluster ID, revision) of content restored from the state directory, until the first list."""

    def save_point(self) -> None:
        """Record (cluster ID, revision) with the content it describes: call inside the same `shard.batch()`."""
        if self.cluster_id and self.revision:
            self._shard.set_resume_point(f"{self.cluster_id:x}:{self.revision}")

    def _parse(self, kv: Any) -> tuple[str, tuple[Member, ...] | Problem]:
        key = _key(kv)
        try:
            members = self._fmt.parse(key[self._prefix_len :], kv.value)
        except FormatError as e:
            log.warning("%s: skipped: %s%s", key, f"{e.field}: " if e.field else "", e.message)
            return key, Problem(where=key, message=e.message, field=e.field)
        return key, members

    def _report(self, key: str, problem: Problem | None) -> None:
        if problem is not None:
            self._problems.add(key)
            self._shard.set_problems(key, [problem])
        elif key in self._problems:
            self._problems.discard(key)
            self._shard.set_problems(key, ())

    def _service(self, host: Hostname) -> None:
        members = self._hosts.get(host)
        service = assemble(host, sorted(members.items()), self._source) if members else None
        if service is None:
            self._hosts.pop(host, None)
            self._shard.delete(host)
        else:
            self._shard.upsert(service)

    def add(self, listing: _Listing, kvs: Sequence[Any]) -> None:
        """Parse one page of a full list into `listing`."""
        listing.count += len(kvs)
        for kv in kvs:
            key, parsed = self._parse(kv)
            if isinstance(parsed, Problem):
                listing.problems[key] = parsed
            elif parsed:
                listing.keys[key] = parsed

    async def commit(self, listing: _Listing, revision: int) -> None:
        """Replace everything with a full list read at `revision`. Call inside `shard.batch()`.

        With the index's writers the services are assembled, compared and merged in steps that yield
        to the loop (`SteppedWriter`); the batch still applies them as one version on its exit.
        """
        for key in self._problems - listing.problems.keys():
            self._shard.set_problems(key, ())
        self._problems = set()
        for key, problem in listing.problems.items():
            self._report(key, problem)
        self._keys, self._hosts = listing.keys, {}
        for key, members in self._keys.items():
            for m in members:
                self._hosts.setdefault(m.service, {})[key] = m
        services = (assemble(h, sorted(ms.items()), self._source) for h, ms in self._hosts.items())
        await replace_all(self._shard, (s for s in services if s is not None))
        self.revision = revision
        self.restored = None
        self.save_point()

    def apply(self, events: Sequence[Any]) -> None:
        """Apply one watch response's events, in order. Call inside `shard.batch()`."""
        dirty: set[Hostname] = set()
        for event in events:
            if event.type == rpc.Event.PUT:
                key, parsed = self._parse(event.kv)
            else:
                key, parsed = _key(event.kv), ()
            for m in self._keys.pop(key, ()):
                self._hosts[m.service].pop(key, None)
                dirty.add(m.service)
            self._report(key, parsed if isinstance(parsed, Problem) else None)
            if isinstance(parsed, tuple) and parsed:
                self._keys[key] = parsed
                for m in parsed:
                    self._hosts.setdefault(m.service, {})[key] = m
                    dirty.add(m.service)
            self.revision = max(self.revision, event.kv.mod_revision)
        for host in dirty:
            self._service(host)
        self.save_point()


def _parse_resume_point(point: str | None) -> tuple[int, int] | None:
    """`<cluster ID hex>:<revision>` as saved by `_View`; None when absent or not ours."""
    if not point:
        return None
    cluster, _, revision = point.partition(":")
    try:
        return int(cluster, 16), int(revision)
    except ValueError:
        return None


class EtcdRegistry:
    """The `Registry` (and `ZoneProvider`) for one etcd cluster."""

    def __init__(self, config: EtcdConfig, base_dir: Path) -> None:
        self.config: RegistryConfig = config
        self.source: SourceId = config.source
        self._config = config
        self._base_dir = base_dir
        # Endpoints carry their source from the start, so the shard never copies them to stamp it.
        self._format = FORMATS[config.format].create(hostname(config.domain), config.source)
        self._prefix = config.prefix.encode()
        self._next = 0
        """The endpoint to try first on the next connection."""

    def zones(self) -> Sequence[Zone]:
        return [Zone(hostname(self._config.domain), ZoneFlavor.PLAIN)]

    async def run(self, shard: ShardWriter) -> None:
        """Sync `shard` with the prefix until cancelled (see the module docstring)."""
        view = _View(self._format, self._config.prefix, shard)
        backoff = Backoff(
            initial=self._config.backoff_initial, maximum=self._config.backoff_max, healthy_after=_STABLE_AFTER
        )

        async def session(state: SessionState) -> None:
            await self._session(view, shard, state)

        await run_sessions(
            shard, session, backoff=backoff, retry_on=_TRANSIENT, describe=describe, what="etcd", logger=log
        )

    async def _session(self, view: _View, shard: ShardWriter, state: SessionState) -> None:
        """Connect, list when needed, and watch until the connection fails (raises)."""
        conn = await self._connect()
        try:
            current = await self._check_cluster(conn, view)
            if view.revision == 0 and view.restored == (view.cluster_id, current):
                # Warm restart, and etcd has not changed since the state was saved: the restored content
                # is exact, so it is fresh now. The list below only rebuilds the per-key state.
                log.info("etcd %s: restored content is current (revision %d)", self.config.source, current)
                shard.mark_synced()
            while True:
                if view.revision == 0:
                    listing = _Listing()
                    revision = await self._list(conn, functools.partial(view.add, listing))
                    with shard.batch():
                        await view.commit(listing, revision)
                        shard.mark_synced()
                    log.info("etcd %s: listed %d keys at revision %d", self.config.source, listing.count, revision)
                try:
                    await self._watch(conn, view, shard, state.healthy)
                except _Compacted as e:
                    log.info("etcd %s: %s; listing again", self.config.source, e)
                    view.revision = 0
        except _TRANSIENT:
            self._next = (conn.endpoint + 1) % len(self._config.endpoints)
            raise
        finally:
            await conn.channel.close()

    async def _check_cluster(self, conn: _Connection, view: _View) -> int:
        """A new or restored cluster at the same address (another cluster ID, or a revision below the
        last one applied) would leave the watch waiting for revisions that mean something else: list again."""
        request = rpc.RangeRequest(key=self._prefix, range_end=_range_end(self._prefix), count_only=True)
        reply = await conn.kv.Range(request, timeout=self._config.request_timeout, metadata=conn.metadata)
        cluster, revision = int(reply.header.cluster_id), int(reply.header.revision)
        if view.revision and view.cluster_id and cluster != view.cluster_id:
            source, was = self.config.source, view.cluster_id
            log.warning("etcd %s: the cluster changed (id %x, was %x); listing again", source, cluster, was)
            view.revision = 0
        elif view.revision and revision < view.revision:
            log.warning(
                "etcd %s: the revision went back to %d (was %d): a restored or new cluster; listing again",
                self.config.source,
                revision,
                view.revision,
            )
            view.revision = 0
        elif view.restored is not None and view.restored[0] != cluster:
            log.warning(
                "etcd %s: the restored content was read from another cluster (id %x, now %x); the list replaces it",
                self.config.source,
                view.restored[0],
                cluster,
            )
        view.cluster_id = cluster
        return revision

    async def _connect(self) -> _Connection:
        """A connection to the first endpoint that answers, starting at `_next`."""
        endpoints = self._config.endpoints
        errors = []
        for i in range(len(endpoints)):
            index = (self._next + i) % len(endpoints)
            try:
                return await self._dial(index)
            except _TRANSIENT as e:
                errors.append(f"{endpoints[index]}: {describe(e)}")
        raise EtcdError("no etcd endpoint usable (" + "; ".join(errors) + ")")

    async def _dial(self, index: int) -> _Connection:
        cfg = self._config
        _, host, port = split_endpoint(cfg.endpoints[index])
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", int(cfg.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.dial_timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", int(cfg.keepalive * 1000)),
            ("grpc.max_receive_message_length", -1),
        ]
        if cfg.secure:
            credentials = self._credentials()
            if cfg.tls is not None and cfg.tls.server_name:
                options.append(("grpc.ssl_target_name_override", cfg.tls.server_name))
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        # The first call connects: it fails at once, with the reason (refused, TLS handshake,
        # bad credentials), when the member cannot be used, and within dial_timeout otherwise.
        try:
            metadata: tuple[tuple[str, str], ...] = ()
            if cfg.username is not None:
                request = rpc.AuthenticateRequest(name=cfg.username, password=self._password())
                reply = await rpc.AuthStub(channel).Authenticate(request, timeout=cfg.dial_timeout)
                metadata = (("token", reply.token),)
            else:
                await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=cfg.dial_timeout)
        except BaseException:
            await channel.close()
            raise
        return _Connection(index, channel, rpc.KVStub(channel), rpc.WatchStub(channel), metadata)

    def _path(self, path: Path) -> Path:
        return self._base_dir / path.expanduser()

    def _read(self, path: Path | None) -> bytes | None:
        if path is None:
            return None
        full = self._path(path)
        try:
            return full.read_bytes()
        except OSError as e:
            raise EtcdError(f"{full}: cannot read: {e.strerror or e}") from None

    def _password(self) -> str:
        cfg = self._config
        if cfg.password is not None:
            return cfg.password.get_secret_value()
        data = self._read(cfg.password_file)
        return (data or b"").decode("utf-8", "replace").rstrip("\r\n")

    def _credentials(self) -> grpc.ChannelCredentials:
        tls = self._config.tls
        if tls is None:
            return grpc.ssl_channel_credentials()
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(tls.ca_file),
            private_key=self._read(tls.key_file),
            certificate_chain=self._read(tls.cert_file),
        )

    async def _list(self, conn: _Connection, on_page: Callable[[Sequence[Any]], None]) -> int:
        """Hand every key-value under the prefix to `on_page`, in pages read at one revision; that revision."""
        cfg = self._config
        end = _range_end(self._prefix)
        key, revision = self._prefix, 0
        while True:
            request = rpc.RangeRequest(key=key, range_end=end, limit=cfg.page_size, revision=revision)
            reply = await conn.kv.Range(request, timeout=cfg.request_timeout, metadata=conn.metadata)
            if revision == 0:
                revision = reply.header.revision
            on_page(reply.kvs)
            if not reply.more or not reply.kvs:
                return int(revision)
            key = reply.kvs[-1].key + b"\0"

    async def _watch(
        self,
        conn: _Connection,
        view: _View,
        shard: ShardWriter,
        on_established: Callable[[], None],
    ) -> None:
        """Follow the prefix from `view.revision` + 1 until the stream fails (raises).

        A connection that stalls (a proxy or a partition that stops forwarding
        without closing) is noticed by `_watchdog` within about 2x `keepalive`.
        """
        cfg = self._config
        call = conn.watch.Watch(metadata=conn.metadata)
        heard = [time.monotonic()]
        stalled = asyncio.Event()
        watchdog: asyncio.Task[None] | None = None
        try:
            create = rpc.WatchCreateRequest(
                key=self._prefix,
                range_end=_range_end(self._prefix),
                start_revision=view.revision + 1,
                progress_notify=True,
            )
            await call.write(rpc.WatchRequest(create_request=create))
            watchdog = asyncio.create_task(
                _watchdog(call, heard, cfg.keepalive, stalled), name=f"etcd-watchdog:{self.config.source}"
            )
            created = False
            while True:
                try:
                    if created:
                        reply = await call.read()
                    else:
                        reply = await asyncio.wait_for(call.read(), cfg.request_timeout)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if stalled.is_set() and task is not None and not task.cancelling():
                        raise EtcdError(f"watch stalled: nothing from etcd for {2 * cfg.keepalive:.1f}s") from None
                    raise
                heard[0] = time.monotonic()
                if reply is grpc.aio.EOF:
                    raise EtcdError("watch stream closed by the server")
                if reply.compact_revision:
                    raise _Compacted(reply.compact_revision)
                if reply.canceled:
                    raise EtcdError(f"watch canceled: {reply.cancel_reason or 'no reason given'}")
                if reply.created and not created:
                    created = True
                    on_established()
                    shard.mark_synced()
                if reply.events:
                    with shard.batch():
                        view.apply(reply.events)
                elif created and not reply.created and reply.header.revision > view.revision:
                    # A progress notification: nothing under the prefix changed up to here.
                    with shard.batch():
                        view.revision = reply.header.revision
                        view.save_point()
        finally:
            call.cancel()
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)


async def _watchdog(call: Any, heard: list[float], interval: float, stalled: asyncio.Event) -> None:
    """Ask etcd for a progress notification after `interval` of silence on the watch stream; cancel the
    call (setting `stalled`) when nothing at all came back for 2x `interval`.

    gRPC keepalive pings alone do not close a connection that stopped forwarding (grpcio's
    keepalive_timeout_ms does not apply once a stream is open), so the watch proves its own liveness.
    Runs beside `_watch`'s reader, which owns the call and cancels this task when it ends.
    """
    progress = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
    asked = False
    while True:
        await asyncio.sleep(interval / 4)
        silent = time.monotonic() - heard[0]
        if silent < interval:
            asked = False
            continue
        if silent >= 2 * interval:
            stalled.set()
            call.cancel()
            return
        if not asked:
            asked = True
            try:
                await asyncio.wait_for(call.write(progress), interval)
            except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
                stalled.set()
                call.cancel()
                return
