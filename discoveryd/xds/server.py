"""The xDS gRPC server: streams in, the push loop, TLS, health.

Data flow: `serve()` builds the first `View` from the index, binds the
listeners and then runs the push loop: wait for a newer snapshot, debounce
(`debounce_after` of quiet, at most `debounce_max` after the first change),
diff once against the snapshot of the current view, rebuild only the changed
hostnames (`resources.Builder`, in steps of a few milliseconds so that the
streams, DNS and the admin API sharing the event loop are answered meanwhile,
from the old view) and hand the new view, whole, and its changed names to
every open `Connection`. Each stream runs two tasks: its reader applies
requests to the connection, its writer (the gRPC handler itself) drains the
connection's responses. The push loop only marks state; a stream that cannot
be written to blocks only its own writer.

Until the index is ready (`Snapshot.ready`: every registry synced, restored
from the state snapshot, or past `ready_timeout`), streams are accepted and
their requests applied, but nothing is written: a state of the world without
one registry's services would make every client delete them (istiod waits for
its registries' HasSynced the same way). The first ready snapshot is built
at once, without debounce, and every held stream then gets complete answers.

Services: AggregatedDiscoveryService (SotW and delta), the per-type Cluster,
Endpoint, Listener and Route discovery services (SotW and delta), and
grpc.health.v1.Health. Responses are written as pre-serialized bytes.

TLS (`xds.tls`): a second listener whose certificate and key, and client CA
when mTLS is on, are re-read when the files change (checked on each new
handshake; a change that does not load is logged and the old one kept).

Cancellation of `serve()` ends every stream (its writer returns, the client
sees the stream close and reconnects elsewhere), stops the server with a short
grace, and re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discoveryd.config import TlsConfig, XdsConfig, split_hostport
from discoveryd.index import Snapshot, SnapshotSource, diff
from discoveryd.model import Hostname
from discoveryd.xds.connection import Connection, News
from discoveryd.xds.metrics import XdsMetrics, daemon_metrics
from discoveryd.xds.resources import (
    CLUSTER,
    EMPTY_VIEW,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Builder,
    BuildOptions,
    Prebuilt,
    View,
)
from discoveryd.xds.unsupported import UnsupportedFields

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_SERVICES: tuple[tuple[str, str, str, str, str | None], ...] = (
    # (gRPC service, SotW method, delta method, api name, type or None for all)
    (ADS_SERVICE, "StreamAggregatedResources", "DeltaAggregatedResources", "ADS", None),
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "StreamClusters", "DeltaClusters", "CDS", CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "StreamEndpoints", "DeltaEndpoints", "EDS", ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "StreamListeners", "DeltaListeners", "LDS", LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes", "RDS", ROUTE),
)

_GRACE = 1.0
"""Seconds streams get to finish when the server stops."""

_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail to bind, not share it
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class XdsServer:
    """Serves the index over xDS. Owned by the supervisor; see the module docstring."""

    def __init__(
        self,
        config: XdsConfig,
        index: SnapshotSource,
        metrics: XdsMetrics | None = None,
        prebuilt: Mapping[Hostname, Prebuilt] | None = None,
    ) -> None:
        """`metrics`: where to count; by default the daemon's (the default Prometheus registry).

        `prebuilt`: a warm start's saved resources per hostname, valid for the index's current
        (restored) snapshot and this config: the first build takes them instead of building.
        """
        self._config = config
        self._index = index
        self.metrics = metrics if metrics is not None else daemon_metrics()
        self.unsupported = UnsupportedFields(self.metrics.unsupported_fields)
        """What gRPC clients were sent that they do not honour (/debug/syncz "unsupported", log, metric)."""
        self._ids = itertools.count(1)
        """Connection ids, unique within this server."""
        self._builder = Builder(
            BuildOptions(config.connect_timeout, config.lb_policy, root_namespace=config.root_namespace)
        )
        self._prebuilt = prebuilt
        self._view: View = EMPTY_VIEW
        self._built_from = Snapshot()
        self._connections: dict[int, Connection] = {}
        self._plain_port: int | None = None
        self._tls_port: int | None = None
        self._serving = False
        """False until a ready snapshot has been built: streams are accepted and their requests
        recorded, but nothing is written (a partial state of the world deletes what it lacks)."""
        self._healthz = health.aio.HealthServicer()
        """Replaced by a fresh servicer on each `serve`."""
        self.started = asyncio.Event()
        """Set once every listener is bound and serving."""
        self.answered = asyncio.Event()
        """Set once a response has been written to a client (the supervisor starts the rest after it)."""

    @property
    def ports(self) -> list[int]:
        """Bound ports after start: plaintext first, then TLS, each when configured."""
        return [p for p in (self._plain_port, self._tls_port) if p is not None]

    @property
    def plaintext_port(self) -> int | None:
        """The bound plaintext port; None when `xds.listen` is null (or before start)."""
        return self._plain_port

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port; None without `xds.tls` (or before start)."""
        return self._tls_port

    @property
    def serving(self) -> bool:
        """Whether responses are written (the index was ready), not held."""
        return self._serving

    @property
    def view(self) -> View:
        """The resources currently served."""
        return self._view

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    async def serve(self) -> None:
        await self._rebuild(self._index.snapshot, None, prebuilt=self._prebuilt)
        self._prebuilt = None
        self._serving = self._built_from.ready
        if not self._serving:
            log.info("xds: holding responses until every registry has synced or been restored")
        server = grpc.aio.server(options=_options(self._config))
        server.add_generic_rpc_handlers(self._handlers())
        healthz = self._healthz = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(healthz, server)
        await self._set_health()
        try:
            if self._config.listen is None and self._config.tls is None:
                raise OSError(errno.EINVAL, "xds: no listener: set xds.listen or xds.tls")
            if self._config.listen is not None:
                self._plain_port = _bind(server, self._config.listen, None)
            if self._config.tls is not None:
                self._tls_port = _bind(server, self._config.tls_listen, _tls_credentials(self._config.tls))
        except BaseException:
            await server.stop(None)
            raise
        await server.start()
        log.info("xds listening on %s", ", ".join(self._addresses()))
        self.started.set()
        try:
            await self._push_loop()
        finally:
            self.started.clear()
            self.unsupported.clear()  # the gauge may be shared with the next server (a reload)
            await healthz.enter_graceful_shutdown()
            for conn in self._connections.values():
                conn.close()
            await server.stop(_GRACE)

    def built(self) -> tuple[View, Snapshot] | None:
        """The view served and the snapshot it was built from, once serving (for the state saver)."""
        return (self._view, self._built_from) if self._serving else None

    def syncz(self) -> dict[str, Any]:
        """Per-connection sync state, for /debug/syncz and `discoveryd status`."""
        return {
            "serving": self._serving,
            "version": str(self._view.version),
            "snapshot_version": self._built_from.version,
            "resources": {k.rsplit(".", 1)[-1]: len(v) for k, v in self._view.resources.items()},
            "connections": [c.syncz() for c in self._connections.values()],
            "unsupported": self.unsupported.syncz(),
        }

    # -- push loop --------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        after, most = self._config.debounce_after, self._config.debounce_max
        while True:
            snap = await self._index.wait(self._built_from.version)
            if not self._serving and snap.ready:
                await self._release()
                continue
            changed = self._index.changed_between(self._built_from.version, snap.version)
            if changed is not None and not changed:
                self._built_from = snap
                continue
            origin = snap.created
            first = last = time.monotonic()
            while True:
                timeout = min(last + after, first + most) - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    async with asyncio.timeout(timeout):
                        snap = await self._index.wait(snap.version)
                except TimeoutError:
                    break
                if not self._serving and snap.ready:
                    break
                last = time.monotonic()
            snap = self._index.snapshot
            if not self._serving and snap.ready:  # readiness came during the debounce: no need to wait longer
                await self._release()
                continue
            await self._rebuild(snap, self._index.changed_between(self._built_from.version, snap.version), origin)

    async def _release(self) -> None:
        """The index became ready: build its newest snapshot at once (no debounce) and start writing."""
        snap = self._index.snapshot
        await self._rebuild(snap, self._index.changed_between(self._built_from.version, snap.version))
        self._serving = True
        log.info("xds: index ready at version %d; serving %d streams", snap.version, len(self._connections))
        for conn in self._connections.values():
            conn.held = False
            conn.wake.set()
        await self._set_health()

    async def _set_health(self) -> None:
        """grpc.health.v1: NOT_SERVING while responses are held, so a balancer can send clients elsewhere."""
        status = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *(s[0] for s in _SERVICES)):
            await self._healthz.set(service, status)

    async def _rebuild(
        self,
        snap: Snapshot,
        changed: frozenset[Any] | None,
        origin: float | None = None,
        prebuilt: Mapping[Hostname, Prebuilt] | None = None,
    ) -> None:
        """Build the view of `snap` and hand it to every connection. Push loop task only (and `serve`
        before it): the build yields to the event loop every few milliseconds, and streams, DNS and the
        admin API run meanwhile on the old view; the new one replaces it whole once built."""
        if changed is None:
            changed = diff(self._built_from, snap)
        started = time.monotonic()
        view, changes = await self._builder.update_in_steps(self._view, snap, changed, prebuilt)
        self.metrics.build_seconds.observe(time.monotonic() - started)
        self._built_from = snap
        if not changes:
            return
        self._view = view
        self.unsupported.refresh(view, changes)
        stamp = origin if origin is not None else snap.created
        news = News()
        for conn in self._connections.values():
            conn.notify(view, changes, stamp, news)

    # -- streams ----------------------------------------------------------------------------

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        out = []
        for service, sotw, delta, api, only in _SERVICES:
            methods = {
                sotw: grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(api, False, only),
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_raw,
                ),
                delta: grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(api, True, only),
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_raw,
                ),
            }
            out.append(grpc.method_handlers_generic_handler(service, methods))
        return out

    def _stream_handler(
        self, api: str, delta: bool, only: str | None
    ) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext[Any, bytes]], Coroutine[Any, Any, None]]:
        async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, bytes]) -> None:
            await self._stream(requests, context, api, delta, only)

        return handle

    async def _stream(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, bytes],
        api: str,
        delta: bool,
        only: str | None,
    ) -> None:
        """Runs one stream: this task writes, a child task reads. Returns when either side ends."""
        conn = Connection(next(self._ids), api, delta, context.peer(), self._view, self.metrics, only, self.unsupported)
        conn.held = not self._serving
        self._connections[conn.id] = conn
        self.metrics.connected.inc()
        reader = asyncio.create_task(self._read(conn, requests), name=f"xds-read-{conn.id}")
        try:
            while not conn.closed:
                await conn.wake.wait()
                conn.wake.clear()
                while not conn.closed and not conn.held and (out := conn.next_response()) is not None:
                    type_url, body, queued_at = out
                    del out  # an idle stream must not keep its last response (up to megabytes) alive
                    await context.write(body)
                    conn.written(type_url, len(body), queued_at)
                    del body
                    self.answered.set()
            if conn.exhausted is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, conn.exhausted)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            del self._connections[conn.id]
            self.metrics.connected.dec()
            log.debug("xds %s closed", conn.describe())

    @staticmethod
    async def _read(conn: Connection, requests: AsyncIterator[Any]) -> None:
        """Applies each request to `conn`; closes it when the client half-closes or the stream fails."""
        handle = conn.on_delta_request if conn.delta else conn.on_request
        try:
            async for request in requests:
                handle(request)
        except grpc.aio.AioRpcError as e:
            log.debug("xds %s: read ended: %s", conn.describe(), e.code())
        except Exception:
            if conn.closed:  # ended by the server (RESOURCE_EXHAUSTED): the read fails with it
                log.debug("xds %s: read ended with the stream", conn.describe())
            else:
                log.exception("xds %s: bad request; closing the stream", conn.describe())
        finally:
            conn.close()

    def _addresses(self) -> list[str]:
        out = []
        if self._config.listen is not None and self._plain_port is not None:
            out.append(f"{split_hostport(self._config.listen)[0]}:{self._plain_port} (plaintext)")
        if self._tls_port is not None:
            out.append(f"{split_hostport(self._config.tls_listen)[0]}:{self._tls_port} (TLS)")
        return out


def _options(config: XdsConfig) -> tuple[tuple[str, int], ...]:
    """gRPC server options: the fixed ones and the connection age of `xds.max_connection_age`.

    gRPC sends GOAWAY at the age (jittered by +-10% per connection by gRPC
    itself, so a fleet connected at once does not reconnect at once) and closes
    the connection after the grace; clients reconnect, to any replica, with the
    versions they hold.
    """
    age = config.max_connection_age
    if age is None or age <= 0:
        return _OPTIONS
    return (
        *_OPTIONS,
        ("grpc.max_connection_age_ms", max(1, int(age * 1000))),
        ("grpc.max_connection_age_grace_ms", max(1, int(config.max_connection_age_grace * 1000))),
    )


def _raw(body: bytes) -> bytes:
    return body


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    host, port = split_hostport(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError as e:
        raise OSError(errno.EADDRNOTAVAIL, f"xds: cannot listen on {address}: {e}") from e
    if not bound:
        raise OSError(errno.EADDRINUSE, f"xds: cannot listen on {address}")
    return int(bound)


class _CertFiles:
    """The TLS files of `xds.tls`, re-read when one of them changes (gRPC calls `fetch` per new handshake)."""

    def __init__(self, tls: TlsConfig) -> None:
        self._tls = tls
        self._paths = [p for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p is not None]
        self._stamp: tuple[tuple[int, int], ...] = ()

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError as e:
                raise OSError(e.errno, f"xds.tls: cannot read {path}: {e.strerror}") from e
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def load(self) -> Any:
        """The certificate configuration from the files now; OSError naming the file that cannot be read."""

        def read(path: Path) -> bytes:
            try:
                return path.read_bytes()
            except OSError as e:
                raise OSError(e.errno, f"xds.tls: cannot read {path}: {e.strerror}") from e

        stamp = self._stat()
        tls = self._tls
        ca = read(tls.client_ca_file) if tls.client_ca_file is not None else None
        config = grpc.ssl_server_certificate_configuration([(read(tls.key_file), read(tls.cert_file))], ca)
        self._stamp = stamp
        return config

    def fetch(self) -> Any:
        """A new configuration when a file changed since the last load, else None (keep the current one)."""
        try:
            if self._stat() == self._stamp:
                return None
            config = self.load()
        except OSError as e:
            log.error("%s; keeping the current certificate", e)
            return None
        log.info("xds.tls: certificate files changed; reloaded")
        return config


def _tls_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    files = _CertFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.load(), files.fetch, require_client_authentication=tls.client_ca_file is not None
    )
