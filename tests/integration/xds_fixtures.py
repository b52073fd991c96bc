"""Shared pieces of the xDS tests: a running `XdsServer` on a loopback port, hand-driven streams, services.

Import the fixtures into a test module with `from tests.integration.xds_fixtures import xds, index_writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from discoveryd.config import XdsConfig
from discoveryd.index import Index, Shard
from discoveryd.model import Endpoint, Hostname, Port, Protocol, Resolution, Service, SourceId
from discoveryd.xds import XdsServer
from discoveryd.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
TYPE_URLS = {"CDS": CLUSTER, "EDS": ENDPOINT, "LDS": LISTENER, "RDS": ROUTE}


def service(
    host: str,
    *addresses: str,
    port: int = 8080,
    protocol: Protocol = Protocol.HTTP,
    resolution: Resolution = Resolution.STATIC,
    target_port: int | None = None,
) -> Service:
    return Service(
        hostname=Hostname(host),
        ports=(Port(port, protocol.value.lower(), protocol, target_port),),
        resolution=resolution,
        endpoints=tuple(Endpoint(a) for a in addresses),
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

    def connection_states(self) -> list[dict[str, Any]]:
        return list(self.server.syncz()["connections"])


async def start_xds(index: Index, **config: Any) -> tuple[XdsServer, asyncio.Task[None]]:
    settings: dict[str, Any] = {"listen": "127.0.0.1:0", "debounce_after": 0.0, "debounce_max": 0.0}
    settings.update(config)
    server = XdsServer(XdsConfig(**settings), index)
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
        self.node = {"id": "test-node", "cluster": "test-cluster"}

    async def send(self, type_url: str, **fields: Any) -> None:
        if self.delta:
            msg: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)
        else:
            msg = discovery_pb2.DiscoveryRequest(type_url=type_url, **fields)
        msg.node.id, msg.node.cluster = self.node["id"], self.node["cluster"]
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
