"""A fake Consul agent over HTTP (aiohttp), written from Consul's documented HTTP API.

What it implements, and where the semantics come from (developer.hashicorp.com,
"Blocking Queries", "Catalog HTTP API", "Health HTTP API", "Agent HTTP API"):

- `GET /v1/agent/self` (the agent's `Config.Datacenter`, `Config.NodeName`),
  `GET /v1/catalog/datacenters`, `GET /v1/catalog/services`,
  `GET /v1/health/service/<name>` (with `tag` filters, all must match, and
  `passing`), `GET /v1/catalog/service/<name>`, `PUT /v1/catalog/register`,
  `PUT /v1/catalog/deregister`, `PUT /v1/agent/service/register`.
- Every read answers `X-Consul-Index`, `X-Consul-KnownLeader` and
  `X-Consul-LastContact`. Each datacenter has one raft-like index, bumped by
  every write there; a resource's index is the index of the last write that
  touched it (`/v1/catalog/services`: any registration in the datacenter;
  `/v1/health/service/<s>`: that service's instances, its checks and its
  nodes' checks; a service that does not exist answers the datacenter's
  index of the last deregistration).
- Blocking: `?index=N&wait=D` holds the request until the resource's index
  is > N or `wait` (default 5m, at most 10m) plus a random jitter of up to
  wait/16 has passed, then answers the current content either way. A
  query asking with an index above the current one (its client missed a
  reset) is held the same way; queries held while the index is reset are
  answered at once (Consul aborts them when it restores a snapshot).
- `?stale` and `?consistent` are accepted (both at once is a 400, as in Consul).
- Tokens: when `acl_token` is set, a request without that token
  (`X-Consul-Token`, `Authorization: Bearer` or `?token=`) gets 403
  "ACL not found"; `denied_services` answer 403 "Permission denied" to the
  right token too (a token without `service:read` on them).
- Faults a test injects: `fail(status, count, path)` answers the next
  `count` matching requests with that status (429 carries `Retry-After`),
  `datacenter_down(dc)` answers 500 "No path to datacenter" for it (what a
  Consul agent answers when the WAN link to a datacenter is down),
  `reset_index(dc, to)` moves a datacenter's index back (a restored
  snapshot, a new cluster), `stop()`/`start()` take the listener away and
  bring it back on the same port with the same data (an agent outage).
- `delay` seconds are added before every answer (a slow agent).
- `requests` counts requests by path (the tests count the load we put on it);
  `GET /v1/fake/requests` (not Consul's) answers the counts over HTTP.

Owned by one test's event loop; `start()` binds on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeConsul", "Instance"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_WAIT = 600.0
_DEFAULT_WAIT = 300.0


def _go_duration(text: str) -> float:
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"Invalid wait time: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(slots=True)
class Check:
    check_id: str
    status: str = "passing"
    service_id: str = ""
    """Empty: a node check (applies to every service on the node)."""
    name: str = ""
    output: str = ""
    modify_index: int = 0


@dataclass(slots=True)
class Instance:
    """One service instance as registered (Consul's `ServiceNode`)."""

    node: str
    service: str
    service_id: str = ""
    address: str = ""
    port: int = 0
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespace: str = ""
    partition: str = ""
    modify_index: int = 0

    def __post_init__(self) -> None:
        if not self.service_id:
            self.service_id = self.service


@dataclass(slots=True)
class Node:
    name: str
    address: str
    node_id: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    modify_index: int = 0


class _Instances(dict[tuple[str, str], Instance]):
    """(node, service_id) → instance, with views by service and by node kept up to date on every write."""

    def __init__(self) -> None:
        super().__init__()
        self.by_service: dict[str, dict[tuple[str, str], Instance]] = {}
        self.by_node: dict[str, dict[tuple[str, str], Instance]] = {}

    def __setitem__(self, key: tuple[str, str], inst: Instance) -> None:
        if key in self:
            self._unindex(key, self[key])
        super().__setitem__(key, inst)
        self.by_service.setdefault(inst.service, {})[key] = inst
        self.by_node.setdefault(key[0], {})[key] = inst

    def __delitem__(self, key: tuple[str, str]) -> None:
        inst = self[key]
        super().__delitem__(key)
        self._unindex(key, inst)

    def _unindex(self, key: tuple[str, str], inst: Instance) -> None:
        for view, name in ((self.by_service, inst.service), (self.by_node, key[0])):
            group = view[name]
            del group[key]
            if not group:
                del view[name]


class _Checks(dict[tuple[str, str], Check]):
    """(node, check_id) → check, with a view by node kept up to date on every write."""

    def __init__(self) -> None:
        super().__init__()
        self.by_node: dict[str, dict[str, Check]] = {}

    def __setitem__(self, key: tuple[str, str], chk: Check) -> None:
        super().__setitem__(key, chk)
        self.by_node.setdefault(key[0], {})[key[1]] = chk

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(key)
        group = self.by_node[key[0]]
        del group[key[1]]
        if not group:
            del self.by_node[key[0]]


@dataclass(slots=True)
class _Datacenter:
    name: str
    index: int = 1
    nodes: dict[str, Node] = field(default_factory=dict)
    instances: _Instances = field(default_factory=_Instances)
    checks: _Checks = field(default_factory=_Checks)
    services_index: int = 1
    """Index of the last write to the services table (what /v1/catalog/services answers)."""
    service_index: dict[str, int] = field(default_factory=dict)
    """Service name → index of the last write that changed what /v1/health/service/<name> answers."""
    down: bool = False
    epoch: int = 0
    """Bumped by a reset: blocked queries return at once (Consul aborts them on a snapshot restore)."""
    wakers: dict[str, asyncio.Event] = field(default_factory=dict)
    """Per resource (`services`, `service:<name>`), the event its held queries wait on; replaced when set."""


@dataclass(slots=True)
class _Fault:
    status: int
    count: int
    path: str
    body: str


class FakeConsul:
    """The fake agent; see the module docstring. Datacenter `datacenter` is the agent's own."""

    def __init__(self, datacenter: str = "dc1", node_name: str = "agent-1") -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self._dcs: dict[str, _Datacenter] = {datacenter: _Datacenter(datacenter)}
        self.acl_token: str | None = None
        self.denied_services: set[str] = set()
        self.delay = 0.0
        self.requests: Counter[str] = Counter()
        self.blocking_requests: Counter[str] = Counter()
        """Requests that carried `?index=` (blocking queries), by path."""
        self.blocked: Counter[str] = Counter()
        """Blocking queries being held right now, by path."""
        self.seen_tokens: list[str | None] = []
        self.last_query: dict[str, dict[str, str]] = {}
        """The query parameters of the last request, by path."""
        self._faults: list[_Fault] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        self._scheme = "http"
        self._active: set[asyncio.Task[Any]] = set()

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 (the port of the previous start, if any, so clients reconnect there).

        With `ssl_context`, HTTPS (`url` then says https).
        """
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=ssl_context)
        self._scheme = "https" if ssl_context is not None else "http"
        await self._site.start()
        server = self._site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop listening and drop every open connection (an agent that went away); data is kept."""
        for task in list(self._active):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._site = None

    async def __aenter__(self) -> FakeConsul:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- state changes (what a test or bench does to the "cluster") ---------------------

    def add_datacenter(self, name: str) -> None:
        self._dcs.setdefault(name, _Datacenter(name))

    def datacenter_down(self, name: str, down: bool = True) -> None:
        self._dcs[name].down = down
        self._notify(self._dcs[name])

    def _dc(self, name: str | None) -> _Datacenter:
        return self._dcs[name or self.datacenter]

    def index(self, dc: str | None = None) -> int:
        return self._dc(dc).index

    def _bump(self, dc: _Datacenter, services: Iterable[str], *, table: bool) -> int:
        # Raft's first entry (index 1) is the cluster's own configuration: a write lands at 2 or later.
        dc.index = max(dc.index + 1, 2)
        keys = []
        for s in services:
            dc.service_index[s] = dc.index
            keys.append(f"service:{s}")
        if table:
            dc.services_index = dc.index
            # A service watch on a name without instances answers with the services index.
            keys += ["services", *(k for k in dc.wakers if k.startswith("service:") and k[8:] not in dc.service_index)]
        self._wake(dc, keys)
        return dc.index

    def _notify(self, dc: _Datacenter) -> None:
        """Wake every query held in `dc` (a reset, a datacenter going down or coming back)."""
        self._wake(dc, list(dc.wakers))

    def _wake(self, dc: _Datacenter, keys: Iterable[str]) -> None:
        """Wake the queries held on these resources only: a write costs what it touches, not every watch."""
        for key in keys:
            event = dc.wakers.pop(key, None)
            if event is not None:
                event.set()

    def register(
        self,
        service: str,
        address: str,
        port: int = 0,
        *,
        node: str | None = None,
        node_address: str | None = None,
        service_id: str | None = None,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        weights: Mapping[str, int] | None = None,
        tagged_addresses: Mapping[str, Mapping[str, Any]] | None = None,
        node_meta: Mapping[str, str] | None = None,
        status: str | None = "passing",
        dc: str | None = None,
    ) -> Instance:
        """Register (or replace) one instance, on its own node by default, with one service check `status`."""
        d = self._dc(dc)
        node_name = node or f"node-{service_id or service}-{address}"
        n = d.nodes.get(node_name)
        if n is None or node_address is not None or node_meta is not None:
            n = Node(
                node_name,
                node_address or (n.address if n else address),
                meta=dict(node_meta or (n.meta if n else {})),
            )
            d.nodes[node_name] = n
        inst = Instance(
            node=node_name,
            service=service,
            service_id=service_id or service,
            address=address,
            port=port,
            tags=list(tags),
            meta=dict(meta or {}),
            weights=dict(weights or {"Passing": 1, "Warning": 1}),
            tagged_addresses={k: dict(v) for k, v in (tagged_addresses or {}).items()},
        )
        affected = {service} | {i.service for i in d.instances.by_node.get(node_name, {}).values()}
        d.instances[(node_name, inst.service_id)] = inst
        if status is not None:
            check_id = f"service:{inst.service_id}"
            d.checks[(node_name, check_id)] = Check(check_id, status, inst.service_id, f"Service '{service}' check")
        idx = self._bump(d, affected, table=True)
        inst.modify_index = n.modify_index = idx
        return inst

    def deregister(self, service_id: str, *, node: str | None = None, dc: str | None = None) -> None:
        """Remove one instance (by service ID, on `node` or on any node) and its checks."""
        d = self._dc(dc)
        keys = d.instances if node is None else d.instances.by_node.get(node, {})
        gone = [k for k in keys if k[1] == service_id]
        names = {d.instances[k].service for k in gone}
        for k in gone:
            del d.instances[k]
            for check_id, chk in list(d.checks.by_node.get(k[0], {}).items()):
                if chk.service_id == service_id:
                    del d.checks[(k[0], check_id)]
        if gone:
            self._bump(d, names, table=True)

    def deregister_service(self, service: str, dc: str | None = None) -> None:
        d = self._dc(dc)
        for k, inst in list(d.instances.by_service.get(service, {}).items()):
            self.deregister(inst.service_id, node=k[0], dc=dc)

    def set_check(self, node: str, check_id: str, status: str, *, service_id: str = "", dc: str | None = None) -> None:
        """Set (or add) a check on `node`: a node check when `service_id` is empty."""
        d = self._dc(dc)
        chk = d.checks.get((node, check_id))
        if chk is None:
            chk = d.checks[(node, check_id)] = Check(check_id, status, service_id, check_id)
        chk.status = status
        if chk.service_id:
            on_node = d.instances.by_node.get(node, {}).values()
            affected = {i.service for i in on_node if i.service_id == chk.service_id}
        else:
            affected = {i.service for i in d.instances.by_node.get(node, {}).values()}
        chk.modify_index = self._bump(d, affected, table=False)

    def set_service_check(self, service_id: str, status: str, dc: str | None = None) -> None:
        """Set the status of the check registered with `register` for every instance with this ID."""
        d = self._dc(dc)
        for node, sid in [k for k in d.instances if k[1] == service_id]:
            self.set_check(node, f"service:{sid}", status, service_id=sid, dc=dc)

    def touch(self, service: str, dc: str | None = None) -> None:
        """An idempotent write: the index moves, the content does not (a check's output updated)."""
        d = self._dc(dc)
        self._bump(d, [service], table=False)

    def reset_index(self, dc: str | None = None, to: int = 1) -> None:
        """Move the datacenter's index back to `to` (0 is allowed: Consul can answer index 0)."""
        d = self._dc(dc)
        d.index = to
        d.epoch += 1
        d.services_index = min(d.services_index, to)
        for s in d.service_index:
            d.service_index[s] = min(d.service_index[s], to)
        self._notify(d)

    def new_cluster(self) -> None:
        """Replace every datacenter by a new, empty one at the same address (indexes start over)."""
        for name, d in list(self._dcs.items()):
            fresh = self._dcs[name] = _Datacenter(name, down=d.down)
            d.epoch += 1
            self._notify(d)
            self._notify(fresh)

    def clear_faults(self) -> None:
        """Forget every fault not yet answered."""
        self._faults.clear()

    def fail(self, status: int, count: int = 1, path: str = "/v1/", body: str | None = None) -> None:
        """Answer the next `count` requests whose path starts with `path` with `status`."""
        default = {403: "Permission denied", 429: "rate limit exceeded", 500: "No cluster leader"}
        self._faults.append(_Fault(status, count, path, body if body is not None else default.get(status, "error")))

    # ---- HTTP ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            return await self._serve(request)
        finally:
            self._active.discard(task)

    def _token(self, request: web.Request) -> str | None:
        token = request.headers.get("X-Consul-Token")
        auth = request.headers.get("Authorization", "")
        if token is None and auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]
        return token or request.query.get("token")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        self.last_query[path] = dict(request.query)
        if "index" in request.query:
            self.blocking_requests[path] += 1
        token = self._token(request)
        self.seen_tokens.append(token)
        if self.delay:
            await asyncio.sleep(self.delay)
        for fault in self._faults:
            if fault.count > 0 and path.startswith(fault.path):
                fault.count -= 1
                headers = {"Retry-After": "1"} if fault.status == 429 else {}
                return web.Response(status=fault.status, text=fault.body, headers=headers)
        if self.acl_token is not None and token != self.acl_token and path != "/v1/catalog/datacenters":
            return web.Response(status=403, text="ACL not found")
        if "stale" in request.query and "consistent" in request.query:
            return web.Response(status=400, text="Cannot specify ?stale with ?consistent, conflicting semantics.")
        dc_name = request.query.get("dc") or self.datacenter
        if dc_name not in self._dcs:
            return web.Response(status=500, text=f"No path to datacenter: {dc_name}")
        dc = self._dcs[dc_name]
        if dc.down:
            return web.Response(status=500, text="rpc error making call: No path to datacenter")
        try:
            if request.method == "GET":
                return await self._get(request, dc)
            if request.method == "PUT":
                return await self._put(request, dc)
        except ValueError as e:
            return web.Response(status=400, text=str(e))
        return web.Response(status=405, text="method not allowed")

    async def _get(self, request: web.Request, dc: _Datacenter) -> web.StreamResponse:
        path = request.path
        if path == "/v1/agent/self":
            return self._json(
                {
                    "Config": {"Datacenter": self.datacenter, "NodeName": self.node_name, "Version": "1.19.0"},
                    "Member": {"Name": self.node_name, "Addr": "127.0.0.1"},
                    "Meta": {},
                }
            )
        if path == "/v1/fake/requests":
            # Not Consul's: the requests counted so far, for a bench driving the fake in another process.
            return self._json({"requests": dict(self.requests), "blocking": dict(self.blocking_requests)})
        if path == "/v1/catalog/datacenters":
            return self._json(sorted(self._dcs))
        if path == "/v1/catalog/services":
            await self._block(request, dc, "services", lambda: dc.services_index)
            if dc.down:
                return web.Response(status=500, text="rpc error making call: No path to datacenter")
            services: dict[str, set[str]] = {}
            for name, group in dc.instances.by_service.items():
                services[name] = {t for inst in group.values() for t in inst.tags}
            return self._json({s: sorted(t) for s, t in sorted(services.items())}, dc.services_index)
        for prefix in ("/v1/health/service/", "/v1/catalog/service/"):
            if path.startswith(prefix):
                name = path[len(prefix) :]
                if name in self.denied_services:
                    return web.Response(status=403, text="Permission denied")

                def index(name: str = name) -> int:
                    return dc.service_index.get(name, dc.services_index)

                await self._block(request, dc, f"service:{name}", index)
                if dc.down:
                    return web.Response(status=500, text="rpc error making call: No path to datacenter")
                rows = self._instances(request, dc, name)
                if prefix == "/v1/health/service/":
                    return self._json([self._health_row(dc, i) for i in rows], index())
                return self._json([self._catalog_row(dc, i) for i in rows], index())
        return web.Response(status=404, text="Not found")

    def _instances(self, request: web.Request, dc: _Datacenter, name: str) -> list[Instance]:
        tags = request.query.getall("tag", [])
        passing = "passing" in request.query
        out = []
        group = dc.instances.by_service.get(name, {})
        for _, inst in sorted(group.items()):
            if not all(t in inst.tags for t in tags):
                continue
            if passing and any(c.status != "passing" for c in self._checks(dc, inst)):
                continue
            out.append(inst)
        return out

    async def _block(self, request: web.Request, dc: _Datacenter, key: str, current: Any) -> None:
        """Hold a blocking query on resource `key` until `current()` > its index, or its wait
        (+ jitter up to wait/16) passed."""
        if "index" not in request.query:
            return
        try:
            index = int(request.query["index"])
        except ValueError:
            raise ValueError("Invalid index") from None
        wait = _go_duration(request.query["wait"]) if "wait" in request.query else _DEFAULT_WAIT
        wait = min(wait, _MAX_WAIT)
        wait += random.uniform(0, wait / 16)
        deadline = time.monotonic() + wait
        epoch = dc.epoch
        self.blocked[request.path] += 1
        try:
            while current() <= index and not dc.down and dc.epoch == epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                event = dc.wakers.get(key)
                if event is None:
                    event = dc.wakers[key] = asyncio.Event()
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    return
        finally:
            self.blocked[request.path] -= 1

    def _checks(self, dc: _Datacenter, inst: Instance) -> list[Check]:
        return [
            c
            for _, c in sorted(dc.checks.by_node.get(inst.node, {}).items())
            if not c.service_id or c.service_id == inst.service_id
        ]

    def _node_doc(self, dc: _Datacenter, node: Node) -> dict[str, Any]:
        return {
            "ID": node.node_id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": dc.name,
            "TaggedAddresses": {"lan": node.address, "lan_ipv4": node.address, **node.tagged_addresses},
            "Meta": dict(node.meta),
            "CreateIndex": node.modify_index,
            "ModifyIndex": node.modify_index,
        }

    def _service_doc(self, inst: Instance) -> dict[str, Any]:
        return {
            "ID": inst.service_id,
            "Service": inst.service,
            "Tags": list(inst.tags),
            "Address": inst.address,
            "TaggedAddresses": {k: dict(v) for k, v in inst.tagged_addresses.items()},
            "Meta": dict(inst.meta),
            "Port": inst.port,
            "Weights": dict(inst.weights),
            "EnableTagOverride": False,
            "Namespace": inst.namespace or None,
            "Partition": inst.partition or None,
            "CreateIndex": inst.modify_index,
            "ModifyIndex": inst.modify_index,
        }

    def _health_row(self, dc: _Datacenter, inst: Instance) -> dict[str, Any]:
        node = dc.nodes[inst.node]
        checks = [
            {
                "Node": inst.node,
                "CheckID": c.check_id,
                "Name": c.name,
                "Status": c.status,
                "Output": c.output,
                "ServiceID": c.service_id,
                "ServiceName": inst.service if c.service_id else "",
                "ModifyIndex": c.modify_index,
            }
            for c in self._checks(dc, inst)
        ]
        return {"Node": self._node_doc(dc, node), "Service": self._service_doc(inst), "Checks": checks}

    def _catalog_row(self, dc: _Datacenter, inst: Instance) -> dict[str, Any]:
        node = dc.nodes[inst.node]
        svc = self._service_doc(inst)
        return {
            "Node": node.name,
            "Address": node.address,
            "Datacenter": dc.name,
            "NodeMeta": dict(node.meta),
            **{f"Service{k}": v for k, v in svc.items() if k not in ("CreateIndex", "ModifyIndex")},
            "ServiceName": inst.service,
        }

    def _json(self, doc: Any, index: int | None = None) -> web.Response:
        headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
        if index is not None:
            headers["X-Consul-Index"] = str(index)
        return web.Response(text=json.dumps(doc), content_type="application/json", headers=headers)

    async def _put(self, request: web.Request, dc: _Datacenter) -> web.StreamResponse:
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"Request decode failed: {e}") from None
        if request.path == "/v1/catalog/register":
            return self._catalog_register(body, dc)
        if request.path == "/v1/catalog/deregister":
            node, sid = _field(body, "Node"), _field(body, "ServiceID")
            if not node:
                raise ValueError("Must provide node")
            if sid:
                self.deregister(sid, node=node, dc=dc.name)
            else:
                for inst in list(dc.instances.by_node.get(node, {}).values()):
                    self.deregister(inst.service_id, node=node, dc=dc.name)
                dc.nodes.pop(node, None)
            return self._json(True)
        if request.path == "/v1/agent/service/register":
            if dc.name != self.datacenter:
                raise ValueError("agent registration is local")
            name = body.get("Name") or ""
            if not name:
                raise ValueError("Missing service name")
            self.register(
                name,
                body.get("Address") or "127.0.0.1",
                int(body.get("Port") or 0),
                node=self.node_name,
                node_address="127.0.0.1",
                service_id=body.get("ID") or name,
                tags=body.get("Tags") or (),
                meta=body.get("Meta") or {},
                weights=body.get("Weights"),
                tagged_addresses=body.get("TaggedAddresses"),
            )
            return web.Response(status=200)
        return web.Response(status=404, text="Not found")

    def _catalog_register(self, body: dict[str, Any], dc: _Datacenter) -> web.Response:
        """Consul's catalog register: a write that changes nothing registered (the same service again, a
        check's new status) leaves the services table, and so /v1/catalog/services, alone."""
        node_name, address = _field(body, "Node"), _field(body, "Address")
        if not node_name or not address:
            raise ValueError("Must provide node and address")
        node = dc.nodes.get(node_name)
        before = (node.address, node.meta, node.tagged_addresses) if node is not None else None
        if node is None:
            node = dc.nodes[node_name] = Node(node_name, address)
        node.address = address
        node.meta = dict(_field(body, "NodeMeta") or node.meta)
        node.tagged_addresses = dict(_field(body, "TaggedAddresses") or node.tagged_addresses)
        table = before != (node.address, node.meta, node.tagged_addresses)
        affected = {i.service for i in dc.instances.by_node.get(node_name, {}).values()} if table else set()
        svc = _field(body, "Service")
        if svc:
            name = _field(svc, "Service")
            if not name:
                raise ValueError("Must provide service name with ID")
            inst = Instance(
                node=node_name,
                service=name,
                service_id=_field(svc, "ID") or name,
                address=_field(svc, "Address") or "",
                port=int(_field(svc, "Port") or 0),
                tags=list(_field(svc, "Tags") or ()),
                meta=dict(_field(svc, "Meta") or {}),
                weights=dict(_field(svc, "Weights") or {"Passing": 1, "Warning": 1}),
                tagged_addresses=dict(_field(svc, "TaggedAddresses") or {}),
            )
            key = (node_name, inst.service_id)
            old = dc.instances.get(key)
            if old is not None:
                inst.modify_index = old.modify_index
            if old != inst:
                dc.instances[key] = inst
                affected.add(inst.service)
                table = True
        checks = list(_field(body, "Checks") or ()) + ([_field(body, "Check")] if _field(body, "Check") else [])
        for c in checks:
            check_id = _field(c, "CheckID") or _field(c, "Name")
            if not check_id:
                raise ValueError("Missing check ID")
            chk = Check(
                check_id, _field(c, "Status") or "critical", _field(c, "ServiceID") or "", _field(c, "Name") or check_id
            )
            old_check = dc.checks.get((node_name, check_id))
            if old_check is not None:
                chk.modify_index = old_check.modify_index
            if old_check != chk:
                dc.checks[(node_name, check_id)] = chk
                on_node = dc.instances.by_node.get(node_name, {}).values()
                affected |= {i.service for i in on_node if not chk.service_id or i.service_id == chk.service_id}
        if table or affected:
            idx = self._bump(dc, affected, table=table)
            node.modify_index = idx
        return self._json(True)


def _field(doc: Any, name: str) -> Any:
    """A struct field of a request body, matched without regard to case (Go's encoding/json, as Consul decodes)."""
    if not isinstance(doc, dict):
        return None
    if name in doc:
        return doc[name]
    lowered = name.lower()
    for key, value in doc.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None
