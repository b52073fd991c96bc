"""exportTo: which clients see a service, by the namespace their node names (Istio's rules)."""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2

from discoveryd.model import Service
from discoveryd.xds.connection import node_namespace
from discoveryd.xds.resources import CLUSTER, ENDPOINT, LISTENER
from tests.fakes.xds import (  # noqa: F401 - fixtures
    RunningXds,
    Stream,
    channel,
    cluster,
    names,
    service,
    xds,
)
from tests.helpers import eventually

PUB, STAR, SHOP, NAMED, HIDDEN = "pub.test", "star.test", "shop-only.test", "to-web.test", "hidden.test"


def world(shop_export: tuple[str, ...] = (".",)) -> list[Service]:
    return [
        service(PUB, "10.0.0.1"),
        service(STAR, "10.0.0.2", namespace="x", export_to=("*",)),
        service(SHOP, "10.0.0.3", namespace="shop", export_to=shop_export),
        service(NAMED, "10.0.0.4", namespace="x", export_to=("web",)),
        service(HIDDEN, "10.0.0.5", namespace="x", export_to=("~",)),
    ]


NODES: dict[str, dict[str, Any]] = {
    "shop": {"id": "client-a", "cluster": "t", "metadata": {"NAMESPACE": "shop"}},
    "web": {"id": "sidecar~10.0.0.9~pod-b.web~web.svc.cluster.local", "cluster": "t"},
    "none": {"id": "plain-client", "cluster": "t"},
}
SEES = {
    "shop": [PUB, STAR, SHOP],
    "web": [PUB, STAR, NAMED],
    "none": [PUB, STAR],
}


def clusters(*hosts: str) -> list[str]:
    return sorted(cluster(h) for h in hosts)


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (base_pb2.Node(id="x"), None),
        (base_pb2.Node(id="sidecar~10.1.2.3~reviews-v1-abc.bookinfo~bookinfo.svc.cluster.local"), "bookinfo"),
        (base_pb2.Node(id="router~10.1.2.3~gw.istio-system~istio-system.svc.cluster.local"), "istio-system"),
        (base_pb2.Node(id="sidecar~10.1.2.3~~"), None),
        (base_pb2.Node(id="sidecar~1~pod.BAD_NS~BAD.svc.cluster.local"), None),
    ],
)
def test_namespace_from_the_node_id(node: base_pb2.Node, expected: str | None) -> None:
    assert node_namespace(node) == expected


def test_namespace_metadata_wins_over_the_node_id() -> None:
    node = base_pb2.Node(id="sidecar~10.1.2.3~pod.a~a.svc.cluster.local")
    node.metadata.update({"NAMESPACE": "b"})
    assert node_namespace(node) == "b"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_clients_in_different_namespaces_see_different_clusters(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    xds.put(*world())
    streams = {}
    for scope, node in NODES.items():
        s = Stream(channel, delta)
        s.node = node
        await s.send(CLUSTER)
        r = await s.recv()
        assert sorted(names(r)) == clusters(*SEES[scope]), scope
        await s.ack(r)
        streams[scope] = s
    # shop-only.test is exported to everyone: the others get it now.
    xds.put(*world(("*",)))
    for scope in ("web", "none"):
        r = await streams[scope].recv()
        if delta:
            assert names(r) == [cluster(SHOP)], scope
        else:
            assert sorted(names(r)) == clusters(*SEES[scope], SHOP), scope
        await streams[scope].ack(r)
    # ... and withdrawn again: removed for them; the shop client sees it throughout.
    xds.put(*world((".",)))
    for scope in ("web", "none"):
        r = await streams[scope].recv()
        if delta:
            assert list(r.removed_resources) == [cluster(SHOP)], scope
        else:
            assert sorted(names(r)) == clusters(*SEES[scope]), scope
    xds.put(*world((".",)), service("new.test", "10.0.0.6"))
    while True:
        r = await streams["shop"].recv()
        if delta:  # versions unchanged for it: the export changes were never news to this client
            assert names(r) == [cluster("new.test")] and not r.removed_resources
            break
        assert cluster(SHOP) in names(r), "every full state the shop client gets has its own service"
        if cluster("new.test") in names(r):
            assert sorted(names(r)) == clusters(*SEES["shop"], "new.test")
            break
        await streams["shop"].ack(r)
    for s in streams.values():
        await s.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_named_resource_outside_the_clients_scope_does_not_exist_for_it(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    xds.put(*world())
    s = Stream(channel, delta)
    s.node = NODES["web"]
    wanted = [cluster(SHOP), cluster(NAMED)]
    if delta:
        await s.send(ENDPOINT, resource_names_subscribe=wanted)
    else:
        await s.send(ENDPOINT, resource_names=wanted)
    r = await s.recv()
    assert names(r) == [cluster(NAMED)]
    if delta:
        assert list(r.removed_resources) == [cluster(SHOP)]
    s2 = Stream(channel, delta)
    s2.node = NODES["none"]
    listener = f"{SHOP}:8080"
    if delta:
        await s2.send(LISTENER, resource_names_subscribe=[listener, f"{PUB}:8080"])
    else:
        await s2.send(LISTENER, resource_names=[listener, f"{PUB}:8080"])
    r = await s2.recv()
    assert names(r) == [f"{PUB}:8080"], "listeners (proxyless gRPC) are scoped the same way"
    await s.close()
    await s2.close()


async def test_wildcard_responses_are_built_once_per_scope(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(*world())
    streams = []
    for i in range(12):
        s = Stream(channel)
        scope = ("shop", "web", "none")[i % 3]
        s.node = dict(NODES[scope], id=NODES[scope]["id"] + ("" if scope == "web" else str(i)))
        await s.send(CLUSTER)
        r = await s.recv()
        assert sorted(names(r)) == clusters(*SEES[scope])
        streams.append(s)
    view = xds.server.view
    await eventually(lambda: len(view.cached_scopes(CLUSTER)) == 3, what="one cached body per scope")
    counts = {c["node"]: c["types"]["CDS"]["resources"] for c in xds.server.syncz()["connections"]}
    assert counts[NODES["web"]["id"]] == len(SEES["web"]) and counts["plain-client2"] == len(SEES["none"])
    for s in streams:
        await s.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_change_the_client_cannot_see_is_not_pushed_to_it(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    from discoveryd.model import PortProtocol

    xds.put(*world())
    s = Stream(channel, delta)
    s.node = NODES["web"]
    await s.send(CLUSTER)
    await s.ack(await s.recv())
    conn = xds.server.connections[0]
    before = conn.types[CLUSTER].responses
    hidden_change = [w if w.hostname != SHOP else service(SHOP, "10.0.0.3", protocol=PortProtocol.GRPC,
                     namespace="shop", export_to=(".",)) for w in world()]  # fmt: skip
    xds.put(*hidden_change)
    version = xds.index.snapshot.version
    await eventually(lambda: xds.server.view.version == version, what="the hidden change built")
    await eventually(lambda: not conn.types[CLUSTER].has_work(), what="anything it queued written")
    seen = [w if w.hostname != PUB else service(PUB, "10.0.0.1", protocol=PortProtocol.GRPC) for w in hidden_change]
    xds.put(*seen)
    r = await s.recv()
    assert cluster(PUB) in names(r)
    assert conn.types[CLUSTER].responses == before + 1, "the shop-only change cost the web client no push"
    await s.close()


async def test_the_scope_is_fixed_by_the_first_node_of_the_stream(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(*world())
    s = Stream(channel)
    s.node = {"id": "", "cluster": "", "metadata": {"NAMESPACE": "shop"}}  # metadata alone names the namespace
    await s.send(CLUSTER)
    r = await s.recv()
    assert sorted(names(r)) == clusters(*SEES["shop"])
    s.node = NODES["web"]  # a later node (the protocol sends it once) changes nothing
    await s.ack(r)
    await s.send(ENDPOINT, resource_names=[cluster(NAMED), cluster(SHOP)])
    r = await s.recv()
    assert names(r) == [cluster(SHOP)]
    await s.close()


async def test_what_is_news_to_a_namespace_is_worked_out_once_per_push(
    xds: RunningXds, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With exportTo in use, each client's push was filtered name by name against both views: a change of
    every service cost clients x names lookups. Clients of one namespace share the result."""
    from discoveryd.model import PortProtocol
    from discoveryd.xds import connection

    xds.put(*world())
    streams = []
    for _ in range(12):
        s = Stream(channel)
        s.node = NODES["web"]
        await s.send(CLUSTER)
        await s.ack(await s.recv())
        streams.append(s)
    calls = 0
    news = connection._news

    def counted(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        return news(*args)

    monkeypatch.setattr(connection, "_news", counted)
    xds.put(*[service(w.hostname, "10.0.0.9", protocol=PortProtocol.GRPC, namespace=w.namespace,
                      export_to=w.export_to) for w in world()])  # fmt: skip
    for s in streams:
        assert cluster(PUB) in names(await s.recv())
    changed = len(world()) * 2  # each cluster and its assignment
    assert calls <= changed, f"{calls} lookups for {changed} changed names and 12 clients of one namespace"
    for s in streams:
        await s.close()
