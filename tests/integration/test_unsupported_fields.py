"""Fields proxyless gRPC does not honour are reported when a gRPC client is sent them, not for Envoy.

A real Envoy fetches the cluster and the route configuration of a host whose DestinationRule and
VirtualService carry fields gRPC ignores (connectionPool.tcp.maxConnections, header operations,
an HTTP retryOn condition): nothing is reported. Then grpcio's xDS client (a subprocess) dials the host:
the report appears in /debug/syncz, `discoveryd status`, the log and the gauge, once per
(client type, host, field); fields gRPC honours are not reported. When the VirtualService loses its
retryOn condition, that report goes away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.policy import HostPolicy
from discoveryd.xds import status
from discoveryd.xds.metrics import XdsMetrics
from tests.fakes.grpc_backend import METHOD, bootstrap, grpc_backend, run_grpc_client
from tests.fakes.policy import DR_HEAD, VS_HEAD, read_policies
from tests.fakes.xds import RunningXds, run_envoy, start_xds, stop
from tests.helpers import eventually

pytestmark = pytest.mark.integration

HOST, PORT = Hostname("cart.shop.internal"), 8080
ROUTES = f"{HOST}:{PORT}"

POLICY = (
    "\n"
    + DR_HEAD
    + """\
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 100}, http: {http2MaxRequests: 1000}}
---
"""
    + VS_HEAD
    + """\
  http:
  - headers: {request: {set: {x-env: staging}}}
    retries: {attempts: 2, retryOn: "5xx,unavailable"}
    route: [{destination: {host: cart.shop.internal}}]
"""
)

CLIENT = """
import sys
import grpc

with grpc.insecure_channel(f"xds:///{sys.argv[1]}") as channel:
    print(channel.unary_unary(sys.argv[2])(b"", timeout=20, wait_for_ready=True).decode(), flush=True)
"""


def policy(text: str) -> HostPolicy:
    return read_policies(text, "shop", "policy.yaml").policies[HOST]


@pytest.fixture
async def xds(index: Index) -> AsyncIterator[tuple[RunningXds, XdsMetrics]]:
    """An xDS server with metrics of its own (the gauge starts at zero)."""
    shard = index.writer(SourceId("files/test"))
    shard.mark_synced()
    metrics = XdsMetrics(CollectorRegistry())
    server, task = await start_xds(index, metrics=metrics)
    try:
        yield RunningXds(server, index, shard, server.ports[0], task), metrics
    finally:
        await stop(task)


def gauge(metrics: XdsMetrics, client_type: str, field: str) -> float:
    value = metrics.registry.get_sample_value(
        "discoveryd_xds_unsupported_fields", {"client_type": client_type, "field": field}
    )
    return value or 0.0


async def call_once(port: int) -> str:
    out = await run_grpc_client(bootstrap(port, "shop"), CLIENT, ROUTES, METHOD, timeout=60)
    return out.decode().strip()


async def test_a_grpc_client_gets_the_unsupported_field_report_and_envoy_does_not(
    xds: tuple[RunningXds, XdsMetrics], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running, metrics = xds
    caplog.set_level(logging.WARNING, logger="discoveryd.xds.unsupported")
    async with grpc_backend("cart") as backend:
        running.put_with_policy(
            policy(POLICY),
            Service(
                hostname=HOST,
                namespace="shop",
                ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
                endpoints=(Endpoint("127.0.0.1", ports={"grpc": backend}),),
            ),
        )

        async with run_envoy(tmp_path, running.port, "GRPC", route_to="unused", rds=ROUTES):

            def envoy_synced() -> bool:
                for conn in running.server.syncz()["connections"]:
                    types = conn["types"]
                    if conn["client_type"] == "envoy" and all(
                        types.get(t, {}).get("state") == "SYNCED" for t in ("CDS", "RDS")
                    ):
                        return True
                return False

            await eventually(envoy_synced, timeout=20, what="envoy synced with the cluster and the route")
            assert running.server.syncz()["unsupported"] == []
            assert gauge(metrics, "envoy", "connectionPool.tcp.maxConnections") == 0
            assert gauge(metrics, "grpc", "connectionPool.tcp.maxConnections") == 0

        assert await call_once(running.port) == "cart"
        assert await call_once(running.port) == "cart"  # a second client: no second report

    reports = running.server.syncz()["unsupported"]
    fields = {(r["client_type"], r["host"], r["field"]) for r in reports}
    assert fields == {
        ("grpc", HOST, "connectionPool.tcp.maxConnections"),
        ("grpc", HOST, "http.headers"),
        ("grpc", HOST, "http.retries.retryOn"),
    }, reports
    (retry,) = [r for r in reports if r["field"] == "http.retries.retryOn"]
    assert "5xx" in retry["detail"] and "unavailable" not in retry["detail"].partition("ignored:")[2]
    assert retry["node"] == "grpc-client" and retry["resources"] == [ROUTES]
    for field in ("connectionPool.tcp.maxConnections", "http.headers", "http.retries.retryOn"):
        assert gauge(metrics, "grpc", field) == 1, field
    assert gauge(metrics, "grpc", "connectionPool.http.http2MaxRequests") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "discoveryd.xds.unsupported"]
    assert len(lines) == 1, lines  # rate-limited: one line, the others in /debug/syncz
    assert "grpc clients are sent" in lines[0] and HOST in lines[0]
    table = status.render(json.loads(json.dumps(running.server.syncz())))
    assert f"grpc  {HOST}  http.retries.retryOn" in table

    # The VirtualService no longer names an HTTP condition: that report goes, the others stay.
    running.shard.set_policy(HOST, policy(POLICY.replace('retryOn: "5xx,unavailable"', "retryOn: unavailable")))
    await eventually(
        lambda: gauge(metrics, "grpc", "http.retries.retryOn") == 0, timeout=10, what="the retryOn report dropped"
    )
    assert {r["field"] for r in running.server.syncz()["unsupported"]} == {
        "connectionPool.tcp.maxConnections",
        "http.headers",
    }
