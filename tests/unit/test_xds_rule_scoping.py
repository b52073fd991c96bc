"""exportTo of DestinationRules and VirtualServices: which rule a client sees, by its namespace (Istio's lookup).

A DestinationRule is looked for in the client's namespace, then the service's, then the root namespace;
a VirtualService private to the client's namespace comes first, then one exported to it by name, then a
public one. Clients of one namespace share one build; other namespaces are not pushed for a change that
is not theirs.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2

from discoveryd.model import Hostname
from discoveryd.policy import DestinationRule, HostPolicy, VirtualService
from discoveryd.xds.resources import CLUSTER, ENDPOINT, ROUTE
from tests.fakes.policy import read_policies, rule_text
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

HOST = "cart.shop.internal"
LISTENER_NAME = f"{HOST}:8080"


def rule(name: str, namespace: str, lb: str, subset: str, export_to: str = "") -> str:
    return rule_text(name, namespace, lb, export_to, subset)


def route(name: str, namespace: str, timeout: str, export_to: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{HOST}]
  {f"exportTo: {export_to}" if export_to else ""}
  http: [{{timeout: {timeout}, route: [{{destination: {{host: {HOST}}}}}]}}]
"""


def policy(*docs: str) -> HostPolicy:
    policies = read_policies("\n---\n".join(docs))
    assert not policies.problems(), policies.problems()
    return policies.policies[Hostname(HOST)]


def node(namespace: str | None, i: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"client-{namespace}-{i}", "cluster": "t"}
    if namespace is not None:
        out["metadata"] = {"NAMESPACE": namespace}
    return out


def publish(xds: RunningXds, host_policy: HostPolicy | None) -> None:
    with xds.shard.batch():
        xds.shard.set_policy(Hostname(HOST), host_policy)
        xds.put(service(HOST, "10.0.0.1", namespace="shop"))


def clusters_of(response: Any) -> dict[str, cluster_pb2.Cluster]:
    out = {}
    for r in response.resources:
        packed = r if isinstance(r, any_pb2.Any) else r.resource
        c = cluster_pb2.Cluster()
        packed.Unpack(c)
        out[c.name] = c
    return out


SHARED = rule("cart", "shop", "LEAST_REQUEST", "v1")
WEB_ONLY = rule("cart-for-web", "web", "RANDOM", "v2", export_to="[.]")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_clients_in_different_namespaces_get_different_cluster_settings(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    """A rule of namespace `web` exported to `.` shapes the clusters of web clients only; the service's own
    rule (namespace shop, exported everywhere) those of everyone else, clients without a namespace too."""
    publish(xds, policy(SHARED, WEB_ONLY))
    streams: dict[str | None, Stream] = {}
    seen: dict[str | None, dict[str, cluster_pb2.Cluster]] = {}
    for ns in ("web", "shop", "elsewhere", None):
        s = Stream(channel, delta)
        s.node = node(ns)
        await s.send(CLUSTER)
        r = await s.recv()
        seen[ns] = clusters_of(r)
        await s.ack(r)
        if delta:
            await s.send(ENDPOINT, resource_names_subscribe=sorted(seen[ns]))
        else:
            await s.send(ENDPOINT, resource_names=sorted(seen[ns]))
        r = await s.recv()
        assert set(names(r)) == set(seen[ns]), "each client's subset assignment exists for it"
        await s.ack(r, sorted(seen[ns]))
        streams[ns] = s
    main, v1, v2 = cluster(HOST), f"outbound|8080|v1|{HOST}", f"outbound|8080|v2|{HOST}"
    assert set(seen["web"]) == {main, v2}
    assert seen["web"][main].lb_policy == cluster_pb2.Cluster.RANDOM
    for ns in ("shop", "elsewhere", None):
        assert set(seen[ns]) == {main, v1}, ns
        assert seen[ns][main].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST, ns
    # Only web clients see web's rule change; the others are not pushed for it.
    conns = {c.namespace: c for c in xds.server.connections}
    before = {ns: (conns[ns].types[CLUSTER].responses, conns[ns].types[ENDPOINT].responses) for ns in ("shop", None)}
    publish(xds, policy(SHARED, WEB_ONLY.replace("RANDOM", "ROUND_ROBIN")))
    r = await streams["web"].recv()
    assert clusters_of(r)[main].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    await streams["web"].ack(r)
    r = await streams["web"].recv()  # the changed EDS cluster's assignment follows, for warming
    assert r.type_url == ENDPOINT and main in names(r)
    await streams["web"].ack(r, [main, v2])
    # web's rule gone: web clients fall back to the service's rule (its subset cluster replaces theirs).
    publish(xds, policy(SHARED))
    r = await streams["web"].recv()
    if delta:
        assert set(names(r)) == {main, v1} and list(r.removed_resources) == [v2]
    else:
        assert set(names(r)) == {main, v1}
    assert clusters_of(r)[main].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    await streams["web"].ack(r)
    version = xds.index.snapshot.version
    await eventually(lambda: xds.server.view.version == version, what="built")
    await eventually(lambda: not any(c.types[CLUSTER].has_work() for c in conns.values()), what="all written")
    after = {ns: (conns[ns].types[CLUSTER].responses, conns[ns].types[ENDPOINT].responses) for ns in ("shop", None)}
    assert after == before, "web's changes cost the other clients no CDS or EDS push"
    for s in streams.values():
        await s.close()


async def test_clients_in_different_namespaces_get_different_routes(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    """VirtualServices: one private to `web` wins there over one exported to `web` by name, which wins
    over the public one; everyone else gets the public one."""
    publish(
        xds,
        policy(
            route("public", "shop", "7s"),
            route("for-web", "other", "5s", export_to="[web, mobile]"),
            route("web-own", "web", "3s", export_to="[.]"),
        ),
    )
    timeouts: dict[str | None, float] = {}
    for ns in ("web", "mobile", "shop", None):
        s = Stream(channel)
        s.node = node(ns)
        await s.send(ROUTE, resource_names=[LISTENER_NAME])
        r = await s.recv()
        rc = route_pb2.RouteConfiguration()
        r.resources[0].Unpack(rc)
        timeouts[ns] = rc.virtual_hosts[0].routes[0].route.timeout.ToTimedelta().total_seconds()
        await s.close()
    assert timeouts == {"web": 3.0, "mobile": 5.0, "shop": 7.0, None: 7.0}


async def test_rule_scopes_are_built_once_per_namespace(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    publish(xds, policy(SHARED, WEB_ONLY))
    streams = []
    for i in range(12):
        s = Stream(channel)
        s.node = node(("web", "shop", "x")[i % 3], i)
        await s.send(CLUSTER)
        await s.recv()
        streams.append(s)
    view = xds.server.view
    # web has its own variant; shop and x see what a client without a namespace sees: one shared body.
    await eventually(lambda: sorted(map(str, view.cached_scopes(CLUSTER))) == ["None", "web"], what="two bodies")
    for s in streams:
        await s.close()


def _dr(namespace: str, name: str, export_to: tuple[str, ...] = ()) -> DestinationRule:
    return DestinationRule(Hostname(HOST), namespace, name, export_to=export_to)


def _vs(namespace: str, name: str, export_to: tuple[str, ...] = ()) -> VirtualService:
    return VirtualService((Hostname(HOST),), namespace, name, export_to=export_to)


@pytest.mark.parametrize(
    ("rules", "client", "expected"),
    [
        # the client's namespace first (exported there: '.', '*', its name, or nothing)
        ([_dr("shop", "svc"), _dr("web", "own", (".",))], "web", "own"),
        ([_dr("shop", "svc"), _dr("web", "own", ("other",))], "web", "svc"),
        # then the service's namespace, if exported to the client
        ([_dr("shop", "svc", (".",))], "web", None),
        ([_dr("shop", "svc", (".",))], "shop", "svc"),
        ([_dr("shop", "svc", ("web",))], "web", "svc"),
        ([_dr("shop", "svc", ("web",))], None, None),
        # then the root namespace
        ([_dr("istio-system", "mesh")], "web", "mesh"),
        ([_dr("istio-system", "mesh"), _dr("shop", "svc")], "web", "svc"),
        ([_dr("istio-system", "mesh", (".",))], "web", None),
        ([_dr("istio-system", "mesh", (".",))], "istio-system", "mesh"),
        # a rule of an unrelated namespace applies to that namespace only
        ([_dr("x", "unrelated")], "x", "unrelated"),
        ([_dr("x", "unrelated")], "web", None),
        ([_dr("x", "unrelated")], None, None),
    ],
)
def test_destination_rule_lookup(rules: list[DestinationRule], client: str | None, expected: str | None) -> None:
    p = HostPolicy(rules[0], None, tuple(rules[1:]))
    got = p.select(client, "shop", "istio-system").destination_rule
    assert (got.name if got else None) == expected


@pytest.mark.parametrize(
    ("routes", "client", "expected"),
    [
        ([_vs("shop", "public"), _vs("web", "own", (".",))], "web", "own"),
        ([_vs("shop", "public"), _vs("x", "named", ("web",))], "web", "named"),
        ([_vs("shop", "public"), _vs("x", "named", ("web",))], "shop", "public"),
        ([_vs("x", "named", ("web",))], None, None),
        ([_vs("shop", "first"), _vs("web", "second")], "web", "first"),  # both public: the first wins
        ([_vs("web", "own", (".",))], "shop", None),
    ],
)
def test_virtual_service_lookup(routes: list[VirtualService], client: str | None, expected: str | None) -> None:
    p = HostPolicy(None, routes[0], (), tuple(routes[1:]))
    got = p.select(client, "shop", "istio-system").virtual_service
    assert (got.name if got else None) == expected
