"""Keep the `services` and `istio` parts of a Kubernetes registry's shard equal to the cluster.

Data flow, all in the registry's task (`run`) and the tasks it owns:

1. a session connects (`api.Api`: kubeconfig + context, or in-cluster) and
   runs one `Reflector` per kind and namespace scope: Services (with the
   configured label selector), EndpointSlices, and Nodes when `watch_nodes`,
   into the `services` part; ServiceEntries, WorkloadEntries (and Pods with
   `pods`), DestinationRules and VirtualServices into the `istio` part
   (`crds.py`; the rules as the part's traffic policy), where a CRD that is
   not installed counts as empty and is looked for again every `crd_retry`;
2. each reflector keeps a `Store` of `_ServiceView` current: raw objects are
   mapped at once (`mapping.py`) into compact immutable values, and the
   Services they touch are marked dirty. A relist compares by
   resourceVersion, so it marks dirty only what changed or vanished;
3. the `_Coalescer` task turns the dirty set into one staged
   `shard.batch()` of upserts/deletes: at once while changes are sparse, and
   under a stream of them at most one per `coalesce` interval (20 ms: at most
   50 versions/s per part sustained, after a reserve of 4): a burst of watch
   events becomes few index versions, while a lone event is applied at once. Nothing is
   published before every reflector has listed once; the first publication
   is a `replace` (it also drops what a state snapshot restored but the
   cluster no longer has) with `mark_synced`, made in steps that yield to
   the loop when the writer offers it (`SteppedWriter`): 100k Services in
   one call would hold DNS and xDS for a quarter of a second or more;
4. on an error the session ends, the parts are marked failing (content
   kept, stale) and a new session starts after exponential backoff with
   jitter (the shared session loop, `discoveryd.session`). The reflectors keep their resourceVersion and resume their
   watches; 410 relists. When every reflector watches again the part is
   marked synced.

The registry owns all of this state; nothing else reads or writes it.
Cancelling `run` cancels the session and the coalescer and closes the
client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from adapters.kubernetes.api import Api, ApiError, Kind, Obj, Reflector, Store
from adapters.kubernetes.config import KubernetesConfig
from adapters.kubernetes.crds import ISTIO_PART, POLICY_PLURALS, IstioView
from adapters.kubernetes.mapping import (
    MappingError,
    ServiceInfo,
    ServiceKey,
    SliceInfo,
    build,
    meta_key,
    node_locality,
    parse_service,
    parse_slice,
    service_hostname,
)
from discoveryd.model import Problem, Service, SourceId, Zone, ZoneFlavor, hostname
from discoveryd.registry import RegistryConfig, ShardWriter, SteppedWriter
from discoveryd.session import Backoff, SessionState, run_sessions

log = logging.getLogger("discoveryd.adapters.kubernetes")

SERVICES_PART = "services"
_STABLE_AFTER = 5.0
"""A session whose watches all stayed up this long (seconds) was healthy: its loss resets the backoff."""
_STEP = 0.002
"""Seconds of work between two yields to the loop while a large first publication is built."""
_TRANSIENT = (ApiError, aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError)


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class _Coalescer:
    """Calls `flush` after `poke`: at once while changes are sparse, at most once per `interval` under a
    stream of them (a token bucket: `burst` flushes in reserve, one more every `interval`)."""

    def __init__(self, interval: float, flush: Callable[[], Awaitable[None]], burst: int = 4) -> None:
        self._interval = interval
        self._flush = flush
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._wake = asyncio.Event()
        self.flushes = 0

    def poke(self) -> None:
        self._wake.set()

    def _refill(self) -> None:
        now = time.monotonic()
        if self._interval > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._interval)
        else:
            self._tokens = self._burst
        self._stamp = now

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._refill()
            # Even without a wait, yield once: the reader may hold more of the same burst.
            await asyncio.sleep(max(0.0, (1 - self._tokens) * self._interval))
            self._refill()
            self._tokens -= 1
            self._wake.clear()
            self.flushes += 1
            await self._flush()  # pokes meanwhile wake the next round


class _ServiceView:
    """Services, their EndpointSlices and (optionally) Nodes of one cluster, and the dirty set.

    Owned by the registry's task; every method runs on the event loop, never concurrently.
    """

    def __init__(self, config: KubernetesConfig, shard: ShardWriter) -> None:
        self._cfg = config
        self._shard = shard
        self._source = shard.source
        self.services: dict[ServiceKey, tuple[str, ServiceInfo]] = {}
        """(namespace, name) → (resourceVersion, mapping)."""
        self.slices: dict[tuple[str, str], tuple[str, SliceInfo | None]] = {}
        """(namespace, slice name) → (resourceVersion, mapping; None for a slice of no use: FQDN, unlabelled)."""
        self.by_service: dict[ServiceKey, set[tuple[str, str]]] = {}
        self.nodes: dict[str, tuple[str, str]] | None = {} if config.watch_nodes else None
        self.by_node: dict[str, dict[ServiceKey, int]] = {}
        """Node → how many endpoints of each Service run there (kept only when nodes are watched)."""
        self.dirty: set[ServiceKey] = set()
        self._problems: set[ServiceKey] = set()
        self.skipped_slices = 0
        """Current EndpointSlices that cannot feed the index (FQDN address type, no service-name label)."""
        self.listed: set[str] = set()
        self.watching: set[str] = set()
        self.expected: set[str] = set()
        """Names of the reflectors that feed this view."""
        self.published = False
        self.stale = False
        self.poke: Callable[[], None] = lambda: None

    # -- Services ----------------------------------------------------------------------

    def _put_service(self, obj: Obj) -> None:
        key = meta_key(obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        current = self.services.get(key)
        if current is not None and rv and current[0] == rv:
            return
        try:
            info = parse_service(obj, self._cfg.domain, self._source)
        except MappingError as e:
            log.warning("%s: Service %s/%s skipped: %s", self._source, key[0], key[1], e)
            self._problems.add(key)
            where = f"Service {key[0]}/{key[1]}"
            self._shard.set_problems(where, [Problem(where=where, message=e.message, field=e.field)])
            return  # the last good mapping, if any, keeps being served
        self._clear_problem(key)
        self.services[key] = (rv, info)
        self.dirty.add(key)

    def _drop_service(self, key: ServiceKey) -> None:
        self._clear_problem(key)
        if self.services.pop(key, None) is not None:
            self.dirty.add(key)

    def _clear_problem(self, key: ServiceKey) -> None:
        if key in self._problems:
            self._problems.discard(key)
            self._shard.set_problems(f"Service {key[0]}/{key[1]}", ())

    def services_replace(self, namespace: str | None, items: list[Obj]) -> None:
        seen = set()
        for obj in items:
            seen.add(meta_key(obj))
            self._put_service(obj)
        for key in [k for k in self.services if (namespace is None or k[0] == namespace) and k not in seen]:
            self._drop_service(key)
        for key in [k for k in self._problems if (namespace is None or k[0] == namespace) and k not in seen]:
            self._clear_problem(key)
        self.poke()

    def services_apply(self, events: list[tuple[str, Obj]]) -> None:
        for kind, obj in events:
            if kind == "DELETED":
                self._drop_service(meta_key(obj))
            else:
                self._put_service(obj)
        self.poke()

    # -- EndpointSlices ---------------------------------------------------------------------

    def _count_nodes(self, info: SliceInfo | None, delta: int) -> None:
        if info is None or self.nodes is None:
            return
        for ep in info.endpoints:
            if not ep.node:
                continue
            counts = self.by_node.setdefault(ep.node, {})
            n = counts.get(info.service, 0) + delta
            if n > 0:
                counts[info.service] = n
            else:
                counts.pop(info.service, None)
                if not counts:
                    del self.by_node[ep.node]

    def _unlink(self, key: tuple[str, str], info: SliceInfo | None) -> None:
        if info is None:
            self.skipped_slices -= 1
            return
        members = self.by_service.get(info.service)
        if members is not None:
            members.discard(key)
            if not members:
                del self.by_service[info.service]
        self._count_nodes(info, -1)
        self.dirty.add(info.service)

    def _put_slice(self, obj: Obj) -> None:
        key = meta_key(obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        current = self.slices.get(key)
        if current is not None:
            if rv and current[0] == rv:
                return
            self._unlink(key, current[1])
        info = parse_slice(obj)
        self.slices[key] = (rv, info)
        if info is None:
            self.skipped_slices += 1
            if current is None:
                log.info("%s: EndpointSlice %s/%s skipped (FQDN or no service-name label)", self._source, *key)
            return
        self.by_service.setdefault(info.service, set()).add(key)
        self._count_nodes(info, +1)
        self.dirty.add(info.service)

    def _drop_slice(self, key: tuple[str, str]) -> None:
        current = self.slices.pop(key, None)
        if current is not None:
            self._unlink(key, current[1])

    def slices_replace(self, namespace: str | None, items: list[Obj]) -> None:
        seen = set()
        for obj in items:
            seen.add(meta_key(obj))
            self._put_slice(obj)
        for key in [k for k in self.slices if (namespace is None or k[0] == namespace) and k not in seen]:
            self._drop_slice(key)
        self.poke()

    def slices_apply(self, events: list[tuple[str, Obj]]) -> None:
        for kind, obj in events:
            if kind == "DELETED":
                self._drop_slice(meta_key(obj))
            else:
                self._put_slice(obj)
        self.poke()

    # -- Nodes ----------------------------------------------------------------------------------

    def _put_node(self, obj: Obj) -> None:
        assert self.nodes is not None
        _, name = meta_key(obj)
        locality = node_locality(obj)
        if self.nodes.get(name) != locality:
            self.nodes[name] = locality
            self.dirty.update(self.by_node.get(name, ()))

    def nodes_replace(self, namespace: str | None, items: list[Obj]) -> None:
        assert self.nodes is not None
        seen = set()
        for obj in items:
            seen.add(meta_key(obj)[1])
            self._put_node(obj)
        for name in [n for n in self.nodes if n not in seen]:
            del self.nodes[name]
            self.dirty.update(self.by_node.get(name, ()))
        self.poke()

    def nodes_apply(self, events: list[tuple[str, Obj]]) -> None:
        assert self.nodes is not None
        for kind, obj in events:
            if kind == "DELETED":
                name = meta_key(obj)[1]
                if self.nodes.pop(name, None) is not None:
                    self.dirty.update(self.by_node.get(name, ()))
            else:
                self._put_node(obj)
        self.poke()

    # -- publication ------------------------------------------------------------------------------

    def build(self, key: ServiceKey) -> Service | None:
        entry = self.services.get(key)
        if entry is None:
            return None
        slices = (self.slices[k][1] for k in self.by_service.get(key, ()))
        return build(
            entry[1],
            (s for s in slices if s is not None),
            nodes=self.nodes,
            network=self._cfg.network,
            pod_names=self._cfg.endpoint_pod_names,
        )

    def all_services(self) -> Iterable[Service]:
        for key in self.services:
            svc = self.build(key)
            if svc is not None:
                yield svc

    async def all_services_in_steps(self) -> list[Service]:
        """`all_services`, built in steps of about `_STEP` seconds that yield to the loop between them.

        The keys are taken at once: watch events between two steps change what is built, never the
        iteration, and mark their keys dirty for the next flush. Built here, with the garbage collector
        running, not inside the index's stepwise replace (which pauses it): 100k Services made during the
        pause are one collection of 0.1 s or more when it ends.
        """
        out: list[Service] = []
        since = time.perf_counter()
        for i, key in enumerate(list(self.services)):
            svc = self.build(key)
            if svc is not None:
                out.append(svc)
            if i % 64 == 63 and time.perf_counter() - since >= _STEP:
                await asyncio.sleep(0)
                since = time.perf_counter()
        return out

    async def flush(self) -> None:
        """Publish the dirty services as one index version (the coalescer's task calls this)."""
        if not self.expected or not self.expected <= self.listed:
            return  # not every kind has been listed yet: publishing now would show half a cluster
        shard = self._shard
        back = self.stale and self.expected <= self.watching
        if not self.published:
            self.dirty.clear()  # events from here on are flushed next time
            self.stale = False
            with shard.batch():
                if isinstance(shard, SteppedWriter):
                    await shard.replace_in_steps(await self.all_services_in_steps())
                else:
                    shard.replace(self.all_services())
                if not self.stale:  # a session that failed meanwhile marked the part failing: it stays so
                    shard.mark_synced()
            self.published = True
            return
        if not self.dirty and not back:
            return
        dirty, self.dirty = self.dirty, set()
        with shard.batch():
            for key in dirty:
                svc = self.build(key)
                if svc is None:
                    shard.delete(service_hostname(key[1], key[0], self._cfg.domain))
                else:
                    shard.upsert(svc)
            if back:
                shard.mark_synced()
                self.stale = False


class _ScopedStore:
    """A `Store` for one reflector: one kind, one namespace scope (None: all), of one view."""

    def __init__(
        self,
        namespace: str | None,
        replace: Callable[[str | None, list[Obj]], None],
        apply: Callable[[list[tuple[str, Obj]]], None],
    ) -> None:
        self._namespace = namespace
        self._replace = replace
        self.apply = apply

    def replace(self, items: list[Obj]) -> None:
        self._replace(self._namespace, items)


class _Part(Protocol):
    """What the session needs of a part's view: which reflectors feed it, and their progress."""

    expected: set[str]
    listed: set[str]
    watching: set[str]
    stale: bool

    def poke(self) -> None: ...


class _KindStore:
    """A `Store` for one Istio kind and namespace scope of the `istio` part."""

    def __init__(self, view: IstioView, plural: str, namespace: str | None) -> None:
        self._view, self._plural, self._namespace = view, plural, namespace

    def replace(self, items: list[Obj]) -> None:
        self._view.replace(self._plural, self._namespace, items)

    def apply(self, events: list[tuple[str, Obj]]) -> None:
        self._view.apply(self._plural, events)


class KubernetesRegistry:
    """The `Registry` (and `ZoneProvider`) for one Kubernetes cluster."""

    def __init__(self, config: KubernetesConfig, base_dir: Path) -> None:
        self.config: RegistryConfig = config
        self.source: SourceId = config.source
        self._config = config
        self._base_dir = base_dir
        self.view: _ServiceView | None = None
        self.istio: IstioView | None = None
        self.reflectors: list[Reflector] = []
        self._owners: dict[int, _Part] = {}
        self.sessions = 0

    def zones(self) -> Sequence[Zone]:
        return [Zone(hostname(self._config.domain), ZoneFlavor.KUBERNETES)]

    def _kubeconfig(self) -> Path | None:
        path = self._config.kubeconfig
        return None if path is None else self._base_dir / path.expanduser()

    def _reflectors(self, view: _ServiceView, istio: IstioView | None = None) -> list[Reflector]:
        cfg = self._config
        scopes: list[str | None] = list(cfg.namespaces) or [None]
        out: list[Reflector] = []

        def add(kind: Kind, store: Store, selector: str | None = None, part: _Part | None = None) -> None:
            name = str(kind)
            owner: _Part = part if part is not None else view
            owner.expected.add(name)

            def listed() -> None:
                owner.listed.add(name)

            reflector = Reflector(
                kind,
                store,
                page_size=cfg.page_size,
                watch_timeout=cfg.watch_timeout,
                label_selector=selector,
                on_listed=listed,
            )
            self._owners[id(reflector)] = owner
            out.append(reflector)

        for ns in scopes:
            add(
                Kind("", "v1", "services", ns),
                _ScopedStore(ns, view.services_replace, view.services_apply),
                cfg.label_selector,
            )
            add(
                Kind("discovery.k8s.io", "v1", "endpointslices", ns),
                _ScopedStore(ns, view.slices_replace, view.slices_apply),
            )
        if cfg.watch_nodes:
            add(Kind("", "v1", "nodes"), _ScopedStore(None, view.nodes_replace, view.nodes_apply))
        if istio is not None:
            plurals = ["serviceentries", "workloadentries", *POLICY_PLURALS]
            for ns in scopes:
                for plural in plurals:
                    kind = Kind("networking.istio.io", cfg.istio_version, plural, ns)
                    add(kind, _KindStore(istio, plural, ns), part=istio)
                if cfg.pods:
                    add(Kind("", "v1", "pods", ns), _KindStore(istio, "pods", ns), part=istio)
        return out

    async def run(self, shard: ShardWriter) -> None:
        """Sync the `services` (and `istio`) parts with the cluster until cancelled (see the module docstring)."""
        parts = [shard.part(SERVICES_PART)]
        view = self.view = _ServiceView(self._config, parts[0])
        if self._config.istio:
            parts.append(shard.part(ISTIO_PART))
            self.istio = IstioView(parts[1], f"networking.istio.io/{self._config.istio_version}", self._config.domain)
        istio = self.istio

        async def flush() -> None:
            await view.flush()
            if istio is not None:
                await istio.flush()

        coalescer = _Coalescer(self._config.coalesce, flush)
        view.poke = coalescer.poke
        if istio is not None:
            istio.poke = coalescer.poke
        self.reflectors = self._reflectors(view, istio)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(coalescer.run(), name=f"{self.config.source}:coalesce")
            tasks.create_task(self._sessions(parts), name=f"{self.config.source}:sessions")

    def _views(self) -> list[_Part]:
        out: list[_Part] = [self.view] if self.view is not None else []
        return out + ([self.istio] if self.istio is not None else [])

    async def _sessions(self, parts: list[ShardWriter]) -> None:
        """The shared session loop (`discoveryd.session`): it marks the `services` part failing before each
        backoff; a failed session marks the `istio` part (and both views) itself."""
        cfg = self._config
        backoff = Backoff(initial=cfg.backoff_initial, maximum=cfg.backoff_max, healthy_after=_STABLE_AFTER)

        async def session(state: SessionState) -> None:
            try:
                await self._session(state)
            except _TRANSIENT as e:
                self._failing(parts[1:], describe(e))
                raise

        await run_sessions(
            parts[0], session, backoff=backoff, retry_on=_TRANSIENT, describe=describe, what="kubernetes", logger=log
        )

    def _failing(self, parts: list[ShardWriter], reason: str) -> None:
        for view in self._views():
            view.watching.clear()
            view.stale = True
        for part in parts:
            part.mark_failing(reason)

    async def _session(self, state: SessionState) -> None:
        """Connect and run every reflector until one fails (raises)."""
        api = await Api.connect(self._kubeconfig(), self._config.context, self._config.request_timeout)
        self.sessions += 1
        views = self._views()

        def watching(reflector: Reflector) -> Callable[[], None]:
            name, owner = str(reflector.kind), self._owners[id(reflector)]

            def mark() -> None:
                owner.watching.add(name)
                if all(v.expected <= v.watching for v in views):
                    state.healthy()
                owner.poke()

            return mark

        def follow(reflector: Reflector) -> Coroutine[Any, Any, None]:
            if reflector.kind.group == "networking.istio.io":
                return self._crd(reflector, api, watching(reflector))
            return reflector.run(api, watching(reflector))

        tasks = [asyncio.create_task(follow(r), name=f"{self.config.source}:{r.kind}") for r in self.reflectors]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.close()

    async def _crd(self, reflector: Reflector, api: Api, on_watching: Callable[[], None]) -> None:
        """`reflector.run` for a CRD that may not be installed (404) or not readable (403: an RBAC without
        the Istio rules): that is logged once and looked at again every `crd_retry`; meanwhile the kind
        counts as listed, empty. Other errors end the session as for any kind."""
        absent: int | None = None
        while True:
            try:
                await reflector.run(api, on_watching)
            except ApiError as e:
                if e.status not in (403, 404):
                    raise
                if absent != e.status:
                    log.log(
                        logging.INFO if e.status == 404 else logging.WARNING,
                        "kubernetes %s: %s: %s (%s); looking again every %gs",
                        self.config.source,
                        reflector.kind,
                        "not served: Istio CRDs not installed?" if e.status == 404 else "forbidden",
                        e.message,
                        self._config.crd_retry,
                    )
                absent = e.status
                reflector.resource_version = None
                reflector.store.replace([])
                reflector.mark_listed()
                on_watching()
                await asyncio.sleep(self._config.crd_retry)
