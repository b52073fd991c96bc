"""A fake Kubernetes API server (aiohttp), written from the documented API semantics.

What it serves, for the resources in `RESOURCES` (Services, Pods, Nodes,
EndpointSlices, and Istio's ServiceEntry, WorkloadEntry, DestinationRule and
VirtualService as CRDs that can be absent and installed later), at the real paths (`/api/v1/...`,
`/apis/<group>/<version>/...`, cluster-wide and `namespaces/<ns>/...`):

- **Lists** (`GET`): `metadata.resourceVersion` of the store at the list;
  `labelSelector` (=, ==, !=, exists, !exists, in, notin); paging with
  `limit` and `continue`: every page of one list is read from the snapshot
  the first page was read from (as etcd serves pages at one revision), and
  a token whose snapshot is gone (compacted, expired with
  `expire_continue_tokens()`, or the server restarted) answers 410 Gone with
  reason `Expired`.
- **Watches** (`?watch=1`): a chunked HTTP response of JSON lines
  `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`. From
  `resourceVersion=N`, every change after N is replayed, then new ones
  follow; without one (or `0`) the current objects arrive as synthetic ADDED
  events first. When N is older than the watch history (`compact()`, or a
  restart: a new watch cache starts at the current version), the server
  answers 410 Gone: as an ERROR event on a 200 stream (the watch cache's
  way, default) or as the HTTP status (`gone_as="status"`). With
  `allowWatchBookmarks=true` a BOOKMARK carrying only the current
  resourceVersion is sent every `bookmark_interval`. `timeoutSeconds` (and
  `max_watch_seconds`) end the stream cleanly. A label-selected watch turns
  an object that stops matching into DELETED and one that starts matching
  into ADDED, as the watch cache does.
- A watch from a version newer than the store's (a cluster that was reset,
  `reset()`) answers 504 with the cause `ResourceVersionTooLarge`.
- **Errors** are `Status` objects (`{"kind": "Status", "code": 410, ...}`).
  Optional bearer-token authentication (401 without it).

Tests change the cluster through the Python methods (`apply`, `delete`,
`install_crds`, `compact`, `stop`/`start`/`restart`), never over HTTP. The
server listens on loopback only. `requests` records every request
(path and query) so tests can assert what was asked, e.g. that nothing polls.

Everything runs on the test's event loop; `stop()` closes every open watch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    """`""` for the core API group."""
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    crd: bool = False
    """Served only after `install_crds()`."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("", "v1", "services", "Service"),
        Resource("", "v1", "pods", "Pod"),
        Resource("", "v1", "nodes", "Node", namespaced=False),
        Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
        Resource("networking.istio.io", "v1", "serviceentries", "ServiceEntry", crd=True),
        Resource("networking.istio.io", "v1", "workloadentries", "WorkloadEntry", crd=True),
        Resource("networking.istio.io", "v1", "destinationrules", "DestinationRule", crd=True),
        Resource("networking.istio.io", "v1", "virtualservices", "VirtualService", crd=True),
    )
}


def status(code: int, reason: str, message: str) -> Obj:
    """A `Status` object, as the API server sends for errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# -- label selectors --------------------------------------------------------------


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur).strip())
    return [p for p in parts if p]


def parse_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A label selector's predicate; ValueError when it does not parse."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for req in _split_selector(text):
        words = req.split()
        if len(words) >= 3 and words[1] in ("in", "notin"):
            key, op = words[0], words[1]
            rest = " ".join(words[2:]).strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise ValueError(f"invalid selector requirement {req!r}")
            values = {v.strip() for v in rest[1:-1].split(",")}
            if op == "in":
                tests.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                tests.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif req.startswith("!"):
            absent = req[1:].strip()
            tests.append(lambda lb, k=absent: k not in lb)
        elif req and " " not in req:
            tests.append(lambda lb, k=req: k in lb)
        else:
            raise ValueError(f"invalid selector requirement {req!r}")
    return lambda labels: all(t(labels) for t in tests)


def _labels(obj: Obj) -> dict[str, str]:
    labels = obj.get("metadata", {}).get("labels") or {}
    return labels if isinstance(labels, dict) else {}


# -- the server -----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Watcher:
    resource: Resource
    namespace: str | None
    selector: Callable[[dict[str, str]], bool]
    queue: asyncio.Queue[tuple[str, Obj] | None] = field(default_factory=asyncio.Queue)


@dataclass(slots=True)
class _Snapshot:
    """The items of one paged list, read at `rv`."""

    rv: int
    items: list[Obj]


class FakeApiServer:
    """See the module docstring. `await start()` before use, `await stop()` after."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        bookmark_interval: float = 1.0,
        gone_as: str = "event",
        max_watch_seconds: float | None = None,
        crds_installed: bool = False,
    ) -> None:
        self.host, self.port = host, port
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.gone_as = gone_as
        self.max_watch_seconds = max_watch_seconds
        self.crds_installed = crds_installed
        self.rv = 1
        self.compacted = 0
        """Watches and continue tokens from versions older than this get 410 Gone."""
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {p: {} for p in RESOURCES}
        self._history: dict[str, list[tuple[int, str, Obj, Obj | None]]] = {p: [] for p in RESOURCES}
        """Per resource: (rv, type, object, previous object) of every change since `compacted`."""
        self._watchers: set[_Watcher] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        """The tasks serving open watches: `stop()` ends any that outlive the runner's shutdown."""
        self._stopping = False
        self._snapshots: dict[str, _Snapshot] = {}
        self._runner: web.AppRunner | None = None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.after_page: Callable[[str], None] | None = None
        """Called with the resource's plural after each list page that has a continue token (to expire it, ...)."""
        self.forbidden: set[str] = set()
        """Resource plurals answered 403 Forbidden (an RBAC that does not grant them)."""
        self.failures: dict[str, int] = {}
        """Resource plural → HTTP status answered to its next request (one-shot fault injection)."""

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def watches(self) -> int:
        """Watch streams open now (a test waits on this instead of sleeping)."""
        return len(self._watchers)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._stopping = False
        app = web.Application()
        app.router.add_get("/api/{version}/{plural}", self._handle)
        app.router.add_get("/api/{version}/namespaces/{namespace}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/namespaces/{namespace}/{plural}", self._handle)
        app.router.add_get("/version", self._version)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop serving: every watch ends (its connection closes), new connections are refused."""
        self._stopping = True
        for w in list(self._watchers):
            w.queue.put_nowait(None)
        self._watchers.clear()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        # A watch that arrived while the runner shut down may still be waiting: end it too.
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def restart(self, *, keep_history: bool = False) -> None:
        """Stop and start on the same port. The data stays (it lives in etcd); the new watch
        cache starts at the current version, so older watches and continue tokens get 410."""
        await self.stop()
        if not keep_history:
            self.compact()
        self._snapshots.clear()
        await self.start()

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the cluster's state, changed by tests ----------------------------------------------

    def reset(self) -> None:
        """Become a new, empty cluster (a new etcd): objects and history gone, versions start over."""
        self.objects = {p: {} for p in RESOURCES}
        self._history = {p: [] for p in RESOURCES}
        self._snapshots.clear()
        self.rv, self.compacted = 1, 0

    def install_crds(self) -> None:
        self.crds_installed = True

    def compact(self) -> None:
        """Forget the history up to now: older watch versions and continue tokens become 410 Gone."""
        self.compacted = self.rv
        for h in self._history.values():
            h.clear()
        self._snapshots.clear()

    def expire_continue_tokens(self) -> None:
        self._snapshots.clear()

    def bookmark(self) -> None:
        """Send a BOOKMARK now on every watch that asked for bookmarks."""
        for w in self._watchers:
            w.queue.put_nowait(("BOOKMARK", {}))

    def apply(self, plural: str, obj: Obj, *, copy_obj: bool = True) -> Obj:
        """Create or replace an object (by namespace/name); returns it as stored, with its new resourceVersion.

        `copy_obj=False` stores `obj` itself (a caller that never touches it again: benchmarks)."""
        res = RESOURCES[plural]
        if copy_obj:
            obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "default") if res.namespaced else ""
        if res.namespaced:
            meta["namespace"] = ns
        key = (ns, meta["name"])
        previous = self.objects[plural].get(key)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", previous["metadata"]["uid"] if previous else str(uuid.uuid4()))
        meta.setdefault(
            "creationTimestamp",
            previous["metadata"]["creationTimestamp"] if previous else time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        self.objects[plural][key] = obj
        self._record(res, "MODIFIED" if previous else "ADDED", obj, previous)
        return obj

    def apply_many(self, plural: str, objs: Iterable[Obj]) -> None:
        for obj in objs:
            self.apply(plural, obj)

    def delete(self, plural: str, namespace: str, name: str) -> bool:
        res = RESOURCES[plural]
        previous = self.objects[plural].pop((namespace if res.namespaced else "", name), None)
        if previous is None:
            return False
        self.rv += 1
        gone = copy.deepcopy(previous)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(res, "DELETED", gone, previous)
        return True

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        return self.objects[plural].get((namespace if RESOURCES[plural].namespaced else "", name))

    def _record(self, res: Resource, kind: str, obj: Obj, previous: Obj | None) -> None:
        self._history[res.plural].append((self.rv, kind, obj, previous))
        for w in self._watchers:
            if w.resource is res:
                event = _filtered(w, kind, obj, previous)
                if event is not None:
                    w.queue.put_nowait(event)

    # -- HTTP --------------------------------------------------------------------------

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"})

    def _error(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status(code, reason, message), status=code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return self._error(503, "ServiceUnavailable", "the API server is shutting down")
        info = request.match_info
        query = dict(request.query)
        self.requests.append((request.path, query))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "Unauthorized", "Unauthorized")
        plural = info["plural"]
        res = RESOURCES.get(plural)
        group = info.get("group", "")
        if res is None or res.group != group or res.version != info["version"] or (res.crd and not self.crds_installed):
            return self._error(404, "NotFound", "the server could not find the requested resource")
        namespace = info.get("namespace")
        if namespace is not None and not res.namespaced:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        if plural in self.forbidden:
            return self._error(403, "Forbidden", f"{plural} is forbidden: cannot list resource {plural!r}")
        fault = self.failures.pop(plural, None)
        if fault is not None:
            return self._error(fault, "InternalError", f"injected failure {fault}")
        try:
            selector = parse_selector(query.get("labelSelector", ""))
        except ValueError as e:
            return self._error(400, "BadRequest", f"unable to parse requirement: {e}")
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, res, namespace, selector, query)
        return self._list(res, namespace, selector, query)

    def _matching(self, res: Resource, namespace: str | None, selector: Callable[[dict[str, str]], bool]) -> list[Obj]:
        items = self.objects[res.plural]
        keys = sorted(k for k in items if namespace is None or k[0] == namespace)
        return [items[k] for k in keys if selector(_labels(items[k]))]

    def _list(
        self,
        res: Resource,
        namespace: str | None,
        selector: Callable[[dict[str, str]], bool],
        query: dict[str, str],
    ) -> web.Response:
        try:
            limit = int(query.get("limit", "0") or 0)
        except ValueError:
            return self._error(400, "BadRequest", "limit: not an integer")
        token = query.get("continue")
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                snap_id, start = str(decoded["id"]), int(decoded["start"])
            except (ValueError, KeyError, TypeError):
                return self._error(400, "BadRequest", "continue key is not valid")
            snap = self._snapshots.get(snap_id)
            if snap is None or snap.rv < self.compacted:
                return self._error(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter.",
                )
        else:
            wanted = query.get("resourceVersion", "")
            if wanted not in ("", "0"):
                try:
                    if int(wanted) > self.rv:
                        return self._error(504, "Timeout", f"Too large resource version: {wanted}, current: {self.rv}")
                except ValueError:
                    return self._error(400, "BadRequest", f"invalid resource version {wanted!r}")
            snap_id, start = uuid.uuid4().hex, 0
            snap = _Snapshot(self.rv, self._matching(res, namespace, selector))
        items = snap.items[start : start + limit] if limit > 0 else snap.items[start:]
        meta: Obj = {"resourceVersion": str(snap.rv)}
        end = start + len(items)
        if end < len(snap.items):
            self._snapshots[snap_id] = snap
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"id": snap_id, "start": end}).encode()).decode()
            meta["remainingItemCount"] = len(snap.items) - end
            if self.after_page is not None:
                self.after_page(res.plural)
        else:
            self._snapshots.pop(snap_id, None)
        body = {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": items}
        return web.json_response(body)

    async def _watch(
        self,
        request: web.Request,
        res: Resource,
        namespace: str | None,
        selector: Callable[[dict[str, str]], bool],
        query: dict[str, str],
    ) -> web.StreamResponse:
        wanted = query.get("resourceVersion", "")
        try:
            start_rv = int(wanted) if wanted not in ("", "0") else None
        except ValueError:
            return self._error(400, "BadRequest", f"invalid resource version {wanted!r}")
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        if self.max_watch_seconds is not None:
            timeout = min(timeout or self.max_watch_seconds, self.max_watch_seconds)
        if start_rv is not None and start_rv > self.rv:
            # The watch cache waits a moment for the version to arrive, then gives up (504, as the API server does).
            too_large = status(504, "Timeout", f"Too large resource version: {start_rv}, current: {self.rv}")
            too_large["details"] = {
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]
            }
            return web.json_response(too_large, status=504)
        too_old = start_rv is not None and start_rv < self.compacted
        gone = status(410, "Expired", f"too old resource version: {start_rv} ({self.compacted})")
        if too_old and self.gone_as == "status":
            return web.json_response(gone, status=410)

        watcher = _Watcher(res, namespace, selector)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        backlog: list[tuple[str, Obj]] = []
        if too_old:
            backlog.append(("ERROR", gone))
        elif start_rv is None:
            backlog.extend(("ADDED", o) for o in self._matching(res, namespace, selector))
        else:
            for rv, kind, obj, previous in self._history[res.plural]:
                if rv > start_rv:
                    event = _filtered(watcher, kind, obj, previous)
                    if event is not None:
                        backlog.append(event)
        if not too_old:
            self._watchers.add(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            deadline = time.monotonic() + timeout if timeout is not None else None
            for kind, obj in backlog:
                await response.write(_line(kind, obj))
            if too_old:
                return response
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                waits = [next_bookmark - now] if bookmarks else []
                if deadline is not None:
                    waits.append(deadline - now)
                item: tuple[str, Obj] | None
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), max(min(waits), 0) if waits else None)
                except TimeoutError:
                    item = ("TICK", {})
                # Events already waiting go out in one chunk, as a busy server's buffered writes do.
                items, closing = [item], item is None
                while not closing and not watcher.queue.empty():
                    more = watcher.queue.get_nowait()
                    closing = more is None
                    items.append(more)
                chunks = []
                now = time.monotonic()
                for entry in items:
                    if entry is None or entry[0] == "TICK":
                        continue
                    if entry[0] == "BOOKMARK":
                        if bookmarks:
                            chunks.append(_line("BOOKMARK", _bookmark(res, self.rv)))
                            next_bookmark = now + self.bookmark_interval
                        continue
                    chunks.append(_line(*entry))
                if bookmarks and now >= next_bookmark:
                    chunks.append(_line("BOOKMARK", _bookmark(res, self.rv)))
                    next_bookmark = now + self.bookmark_interval
                if chunks:
                    await response.write(b"".join(chunks))
                if closing or (deadline is not None and now >= deadline):
                    break
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
            self._handlers.discard(task)
        return response


def _filtered(w: _Watcher, kind: str, obj: Obj, previous: Obj | None) -> tuple[str, Obj] | None:
    """The event a watcher with a namespace and label selector sees for one change, if any."""
    ns = obj.get("metadata", {}).get("namespace", "")
    if w.namespace is not None and ns != w.namespace:
        return None
    now = w.selector(_labels(obj))
    before = previous is not None and w.selector(_labels(previous))
    if kind == "DELETED":
        return (kind, obj) if before else None
    if kind == "ADDED":
        return (kind, obj) if now else None
    if now and before:
        return ("MODIFIED", obj)
    if now:
        return ("ADDED", obj)
    if before:
        return ("DELETED", obj)
    return None


def _bookmark(res: Resource, rv: int) -> Obj:
    """A BOOKMARK's object: only the kind and the resourceVersion every change up to which was sent."""
    return {"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": str(rv)}}


def _line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


_names = itertools.count()


def kubeconfig(server: FakeApiServer, *, context: str = "fake", token: str | None = None) -> str:
    """A kubeconfig document (YAML is a superset of JSON) pointing at the fake."""
    user: Obj = {"token": token or server.token} if (token or server.token) else {}
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server.url}}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "current-context": context,
    }
    return json.dumps(doc, indent=1)


# -- object builders ---------------------------------------------------------------------


def service(
    name: str,
    namespace: str = "default",
    *,
    ports: list[Obj] | None = None,
    cluster_ips: list[str] | None = None,
    type_: str = "ClusterIP",
    external_name: str | None = None,
    labels: dict[str, str] | None = None,
    publish_not_ready: bool = False,
) -> Obj:
    """A Service object; `cluster_ips=["None"]` makes it headless."""
    default_ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    spec: Obj = {"type": type_, "ports": ports if ports is not None else default_ports}
    if cluster_ips is not None:
        spec["clusterIP"] = cluster_ips[0]
        spec["clusterIPs"] = cluster_ips
    if external_name is not None:
        spec["type"] = "ExternalName"
        spec["externalName"] = external_name
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"metadata": meta, "spec": spec}


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    hostname: str | None = None,
    zone: str | None = None,
    node: str | None = None,
    pod: str | None = None,
    namespace: str = "default",
) -> Obj:
    conditions: Obj = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None:
        conditions["serving"] = serving
    if terminating is not None:
        conditions["terminating"] = terminating
    ep: Obj = {"addresses": [address], "conditions": conditions}
    if hostname:
        ep["hostname"] = hostname
    if zone:
        ep["zone"] = zone
    if node:
        ep["nodeName"] = node
    if pod:
        ep["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod}
    return ep


def endpoint_slice(
    service_name: str,
    endpoints: list[Obj],
    *,
    namespace: str = "default",
    name: str | None = None,
    address_type: str = "IPv4",
    ports: list[Obj] | None = None,
) -> Obj:
    return {
        "metadata": {
            "name": name or f"{service_name}-{next(_names):05d}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name, "endpointslice.kubernetes.io/managed-by": "fake"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
