"""What one stream's subscriptions cost the server: no work proportional to the whole view per request,
and a bound on the names a client may make the server remember."""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import grpc
import immutables
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from discoveryd.xds.connection import SUBSCRIPTION_FACTOR, SUBSCRIPTION_FLOOR, Connection
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.resources import CLUSTER, ENDPOINT, ROUTE, TYPES, Resource, View
from tests.fakes.xds import RunningXds, Stream, channel, cluster, names, service, xds  # noqa: F401 - fixtures
from tests.helpers import eventually

A = "a.test"


def view_of(count: int) -> View:
    clusters = {f"outbound|80||s{i}.test": Resource(f"outbound|80||s{i}.test", "v1", b"") for i in range(count)}
    tables = {t: immutables.Map(clusters if t in (CLUSTER, ENDPOINT) else {}) for t in TYPES}
    return View(1, MappingProxyType(tables), immutables.Map())


def delta(type_url: str, **fields: Any) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)
    req.node.id = "n"
    return req


def test_delta_acks_do_not_walk_every_resource_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing the names of a type is O(resources): done when a wildcard starts, never for an ACK or a
    named subscription (1000 clients ACKing a push would each walk the whole view)."""
    calls: list[str] = []
    names = View.names

    def counted(self: View, type_url: str, namespace: str | None) -> set[str]:
        calls.append(type_url)
        return names(self, type_url, namespace)

    monkeypatch.setattr(View, "names", counted)
    conn = Connection(1, "ADS", True, "peer", view_of(100), XdsMetrics(CollectorRegistry()))
    conn.on_delta_request(delta(CLUSTER))  # implicit wildcard: every cluster, listed once
    assert calls == [CLUSTER]
    out = conn.next_response()
    assert out is not None
    for n in range(1, 6):
        conn.on_delta_request(delta(CLUSTER, response_nonce=str(n)))
    conn.on_delta_request(delta(ENDPOINT, resource_names_subscribe=["outbound|80||s1.test"]))
    conn.on_delta_request(delta(ENDPOINT, response_nonce="7"))
    assert calls == [CLUSTER]


# -- the subscription bound ------------------------------------------------------------------


def limited(xds: RunningXds, short: str) -> float:
    return float(xds.server.metrics.subscription_limit.labels(short)._value.get())


async def ended_exhausted(s: Stream) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await s.recv()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
    return str(raised.value.details())


async def test_delta_subscriptions_past_the_bound_end_the_stream(
    xds: RunningXds, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """A delta client adding names that do not exist, request after request, made the server remember
    every one for the life of the stream; past the bound the stream ends (Envoy reconnects)."""
    xds.put(service(A, "10.0.0.1"))
    before = limited(xds, "EDS")
    s = Stream(channel, delta=True)
    batch = SUBSCRIPTION_FLOOR // 2
    await s.send(ENDPOINT, resource_names_subscribe=[cluster(A)])
    first = await s.recv()
    assert names(first) == [cluster(A)]
    await s.send(ENDPOINT, resource_names_subscribe=[f"missing-{i}" for i in range(batch)])
    await s.recv()  # their removal, once
    # Unsubscribing makes room: still within the bound.
    await s.send(
        ENDPOINT,
        resource_names_unsubscribe=[f"missing-{i}" for i in range(batch)],
        resource_names_subscribe=[f"other-{i}" for i in range(batch - 1)],
    )
    await s.recv()
    await s.send(ENDPOINT, resource_names_subscribe=[f"more-{i}" for i in range(batch)])  # exactly the bound
    await s.recv()
    assert limited(xds, "EDS") == before
    await s.send(ENDPOINT, resource_names_subscribe=["one-more"])
    details = await ended_exhausted(s)
    assert f"more than the {SUBSCRIPTION_FLOOR}" in details
    assert limited(xds, "EDS") == before + 1
    assert "named too many resources" in caplog.text
    assert "bad request" not in caplog.text
    await eventually(lambda: not xds.server.connections, what="stream closed")


async def test_delta_initial_versions_past_the_bound_end_the_stream(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    before = limited(xds, "CDS")
    s = Stream(channel, delta=True)
    versions = {f"outbound|80||s{i}.test": "v" for i in range(SUBSCRIPTION_FLOOR + 1)}
    await s.send(CLUSTER, initial_resource_versions=versions)
    assert "initial_resource_versions" in await ended_exhausted(s)
    assert limited(xds, "CDS") == before + 1


async def test_sotw_resource_names_past_the_bound_end_the_stream(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"))
    before = limited(xds, "EDS")
    s = Stream(channel)
    await s.send(ENDPOINT, resource_names=[f"missing-{i}" for i in range(SUBSCRIPTION_FLOOR)] + [cluster(A)])
    assert await ended_exhausted(s)
    assert limited(xds, "EDS") == before + 1
    ok = Stream(channel)  # the same number less one is served
    await ok.send(ENDPOINT, resource_names=[f"missing-{i}" for i in range(SUBSCRIPTION_FLOOR - 1)] + [cluster(A)])
    assert names(await ok.recv()) == [cluster(A)]
    await ok.close()


def test_the_bound_grows_with_the_resources_of_the_type() -> None:
    conn = Connection(1, "ADS", True, "peer", view_of(SUBSCRIPTION_FLOOR), XdsMetrics(CollectorRegistry()))
    assert conn.subscription_limit(CLUSTER) == SUBSCRIPTION_FACTOR * SUBSCRIPTION_FLOOR
    assert conn.subscription_limit(ROUTE) == SUBSCRIPTION_FLOOR
