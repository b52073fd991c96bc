"""What one stream's subscriptions cost the server: no work proportional to the whole view per request,
and a bound on the names a client may make the server remember."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import immutables
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from discoveryd.xds.connection import Connection
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.resources import CLUSTER, ENDPOINT, TYPES, Resource, View


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
