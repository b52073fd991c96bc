"""The admin HTTP server: health, readiness, metrics and /debug pages.

Reads only the current `Snapshot` (through `SnapshotSource`) and the callables
the supervisor hands it for pages owned by other servers (`/debug/syncz` comes
from the xDS server). It never writes anything.

- `/healthz`: 200 while the process serves.
- `/readyz`: 200 once every registry has completed its first sync or been
  restored from the state directory, or has not managed either within
  `ready_timeout` (named in the body: served without them); 503 with the
  registries still waiting before that.
- `/metrics`: Prometheus text; index figures are collected at scrape time from
  the snapshot, so they cannot drift from what is served.
- `/debug/registryz`, `/debug/endpointz[?host=]`, `/debug/configz`,
  `/debug/indexz` (the whole index, what `discoveryd dump` prints), and any
  extra page the supervisor registers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from discoveryd.config import AdminConfig, split_hostport
from discoveryd.index import ShardStatus, Snapshot, SnapshotSource
from discoveryd.model import Endpoint, Service

log = logging.getLogger("discoveryd.admin")

DebugPage = Callable[[], Any]


def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    return {
        "address": ep.address,
        "ports": dict(ep.ports),
        "health": ep.health.value,
        "locality": {"region": ep.locality.region, "zone": ep.locality.zone, "subzone": ep.locality.subzone},
        "weight": ep.weight,
        "labels": dict(ep.labels),
        "network": ep.network,
        "service_account": ep.service_account,
        "hostname": ep.hostname,
        "priority": ep.priority,
        "source": ep.source,
    }


def service_json(svc: Service) -> dict[str, Any]:
    return {
        "hostname": svc.hostname,
        "name": svc.name,
        "namespace": svc.namespace,
        "source": svc.source,
        "resolution": svc.resolution.value,
        "location": svc.location.value,
        "addresses": list(svc.addresses),
        "ports": [
            {"number": p.number, "name": p.name, "protocol": p.protocol.value, "target_port": p.target_port}
            for p in svc.ports
        ],
        "labels": dict(svc.labels),
        "export_to": list(svc.export_to),
        "subject_alt_names": list(svc.subject_alt_names),
        "endpoints": [endpoint_json(ep) for ep in svc.endpoints],
    }


def _status_json(st: ShardStatus) -> dict[str, Any]:
    return {
        "ready": st.ready,
        "synced": st.synced,
        "stale": st.stale,
        "services": st.services,
        "endpoints": st.endpoints,
        "last_sync": st.last_sync,
        "last_error": st.last_error,
        "last_error_time": st.last_error_time,
        "errors_total": st.errors_total,
        "problems": [
            {"where": p.where, "field": p.field, "message": p.message, "severity": p.severity.value}
            for p in st.problems
        ],
    }


def registryz(snap: Snapshot) -> dict[str, Any]:
    """Each registry's status, with each of its parts' (`""` is the root part)."""
    out: dict[str, Any] = {"version": snap.version, "ready": snap.ready, "registries": {}}
    for source, st in snap.shards.items():
        entry = _status_json(st)
        entry["parts"] = {name: _status_json(part) for name, part in (st.parts or {st.part: st}).items()}
        entry["restored"] = st.restored
        entry["timed_out"] = st.timed_out
        out["registries"][source] = entry
    out["conflicts"] = {
        h: {
            "winner": c.winner,
            "sources": list(c.sources),
            "shards": [{"registry": k.source, "part": k.part} for k in c.shards],
        }
        for h, c in sorted(snap.conflicts.items())
    }
    return out


def endpointz(snap: Snapshot, host: str | None) -> dict[str, Any]:
    """Each service's merged VIPs and endpoints, and every reporting shard's own VIPs (see the index's merge rule)."""
    hosts = [host] if host else sorted(snap.services)
    out: dict[str, Any] = {}
    for h in hosts:
        svc = snap.services.get(h)  # type: ignore[call-overload]
        if svc is None:
            continue
        conflict = snap.conflicts.get(svc.hostname)
        by_shard: list[dict[str, Any]]
        if conflict is not None:
            by_shard = [{"registry": k.source, "part": k.part, "addresses": list(a)} for k, a in conflict.addresses]
        else:
            by_shard = [{"registry": svc.source, "part": None, "addresses": list(svc.addresses)}]
        out[h] = {
            "source": svc.source,
            "addresses": list(svc.addresses),
            "addresses_by_source": by_shard,
            "endpoints": [endpoint_json(ep) for ep in svc.endpoints],
        }
    return out


def indexz(snap: Snapshot) -> dict[str, Any]:
    return {
        "version": snap.version,
        "services": [service_json(snap.services[h]) for h in sorted(snap.services)],
    }


# Per-registry figures: (metric, help, value from the shard status; None: no sample).
_REGISTRY_GAUGES: tuple[tuple[str, str, Callable[[ShardStatus, float], float | None]], ...] = (
    ("discoveryd_registry_services", "Services in a registry's shard.", lambda st, now: st.services),
    ("discoveryd_registry_endpoints", "Endpoints in a registry's shard.", lambda st, now: st.endpoints),
    (
        "discoveryd_registry_stale",
        "1 while a registry is failing and its last content is served.",
        lambda st, now: float(st.stale),
    ),
    (
        "discoveryd_registry_ready",
        "1 once a registry has synced or was restored from the state directory (or timed out).",
        lambda st, now: float(st.ready),
    ),
    (
        "discoveryd_registry_ready_timed_out",
        "1 while a registry has not synced within ready_timeout and no longer blocks readiness.",
        lambda st, now: float(st.timed_out),
    ),
    (
        "discoveryd_registry_restored",
        "1 while a registry serves content restored from the state directory, not yet resynced.",
        lambda st, now: float(st.restored),
    ),
    (
        "discoveryd_registry_last_sync_age_seconds",
        "Seconds since a registry's last full sync.",
        lambda st, now: None if st.last_sync is None else max(0.0, now - st.last_sync),
    ),
    (
        "discoveryd_registry_input_problems",
        "Input problems currently reported by a registry.",
        lambda st, now: len(st.problems),
    ),
)


class _IndexCollector(Collector):
    """Index figures read from the snapshot at scrape time; one per `AdminServer`, in its own registry.

    Registry gauges come twice: per registry (label `registry`, aggregated over
    its parts) and per part (`discoveryd_registry_part_*`, labels `registry` and
    `part`, `""` being the root part).
    """

    def __init__(self, source: SnapshotSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source.snapshot
        now = time.time()
        version = GaugeMetricFamily("discoveryd_index_version", "Version of the current index snapshot.")
        version.add_metric([], snap.version)
        conflicts = GaugeMetricFamily("discoveryd_index_conflicts", "Hostnames reported by more than one shard.")
        conflicts.add_metric([], len(snap.conflicts))
        yield from (version, conflicts)
        for name, text, value in _REGISTRY_GAUGES:
            family = GaugeMetricFamily(name, text, labels=["registry"])
            per_part = GaugeMetricFamily(
                name.replace("discoveryd_registry_", "discoveryd_registry_part_"),
                text.replace("a registry", "a registry part"),
                labels=["registry", "part"],
            )
            for source, st in snap.shards.items():
                v = value(st, now)
                if v is not None:
                    family.add_metric([source], v)
                for part_name, part in (st.parts or {st.part: st}).items():
                    pv = value(part, now)
                    if pv is not None:
                        per_part.add_metric([source, part_name], pv)
            yield family
            yield per_part
        errors = CounterMetricFamily(
            "discoveryd_registry_sync_errors",
            "Sync errors and input problems reported since start.",
            labels=["registry"],
        )
        for source, st in snap.shards.items():
            errors.add_metric([source], st.errors_total)
        yield errors


class AdminServer:
    """Serves the admin API on `config.listen` until cancelled."""

    def __init__(
        self,
        config: AdminConfig,
        index: SnapshotSource,
        configz: Callable[[], Mapping[str, Any]],
        pages: Mapping[str, DebugPage] | None = None,
        shared_metrics: Sequence[CollectorRegistry] = (REGISTRY,),
        serving: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`shared_metrics`: registries of other components scraped after this server's own.
        `serving`: what a server still has to apply before the daemon is ready (None: nothing);
        called on every /readyz once the index itself is ready."""
        self._config = config
        self._metrics_registry = CollectorRegistry(auto_describe=True)
        self._metrics_registry.register(_IndexCollector(index))
        self._shared_metrics = tuple(shared_metrics)
        self._index = index
        self._configz = configz
        self._pages = dict(pages or {})
        self._serving = serving
        self.started = asyncio.Event()
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/registryz", _json(lambda r: registryz(self._index.snapshot)))
        app.router.add_get("/debug/endpointz", _json(lambda r: endpointz(self._index.snapshot, r.query.get("host"))))
        app.router.add_get("/debug/indexz", _json(lambda r: indexz(self._index.snapshot)))
        app.router.add_get("/debug/configz", _json(lambda r: dict(self._configz())))
        for name, page in self._pages.items():
            app.router.add_get(f"/debug/{name}", _json(_ignore_request(page)))
        app.router.add_get("/debug", self._index_page)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        snap = self._index.snapshot
        waiting = sorted(s for s, st in snap.shards.items() if not st.ready)
        if waiting:
            return web.Response(status=503, text="waiting for first sync: " + ", ".join(waiting) + "\n")
        pending = self._serving()
        if pending:
            return web.Response(status=503, text=f"waiting for {pending}\n")
        late = sorted(s for s, st in snap.shards.items() if st.timed_out)
        if late:
            text = "ready; not synced within ready_timeout, serving without them: " + ", ".join(late) + "\n"
            return web.Response(text=text)
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in (self._metrics_registry, *self._shared_metrics))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _index_page(self, request: web.Request) -> web.Response:
        names = ["registryz", "endpointz", "indexz", "configz", *self._pages]
        return web.Response(text="".join(f"/debug/{n}\n" for n in names))

    async def serve(self) -> None:
        """Bind and serve until cancelled; cancellation closes the listener and connections."""
        host, port = split_hostport(self._config.listen)
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                raise OSError(e.errno, f"admin: cannot listen on {self._config.listen}: {e.strerror}") from e
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self._port = sockets[0].getsockname()[1] if sockets else port
            log.info("admin listening on %s:%d", host, self._port)
            self.started.set()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def _json(build: Callable[[web.Request], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(build(request))

    return handler


def _ignore_request(page: DebugPage) -> Callable[[web.Request], Any]:
    return lambda request: page()
