"""Which Istio fields proxyless gRPC does not honour, how a client's type is told, and the report's lifecycle."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.core.v3 import base_pb2
from prometheus_client import CollectorRegistry

from adapters.istio.policy import PolicySet
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.xds import status
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.policy import grpc_ignored_by_cluster, grpc_ignored_by_routes
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, ENDPOINT, ROUTE, Builder, BuildOptions, View
from discoveryd.xds.unsupported import UnsupportedFields, client_type
from tests.fakes.policy import read_policies

HOST = Hostname("cart.shop.internal")
HEAD = "apiVersion: networking.istio.io/v1\nmetadata: {name: cart, namespace: shop}\n"


def policies(text: str) -> PolicySet:
    return read_policies(text, "shop")


def rule_fields(traffic_policy: str) -> set[str]:
    text = HEAD + "kind: DestinationRule\nspec:\n  host: cart.shop.internal\n  trafficPolicy: " + traffic_policy
    rule = policies(text).policies[HOST].destination_rule
    assert rule is not None
    return {f for f, _ in grpc_ignored_by_cluster(rule.effective(8080))}


def route_fields(http: str) -> set[str]:
    text = HEAD + "kind: VirtualService\nspec:\n  hosts: [cart.shop.internal]\n  http:\n  - " + http
    vs = policies(text).policies[HOST].virtual_service
    assert vs is not None
    return {f for f, _ in grpc_ignored_by_routes(vs)}


@pytest.mark.parametrize(
    ("traffic_policy", "fields"),
    [
        ("{connectionPool: {http: {http2MaxRequests: 10}}}", set()),
        ("{connectionPool: {tcp: {maxConnections: 1, connectTimeout: 1s},"
         " http: {http2MaxRequests: 10, maxRetries: 2}}}",
         {"connectionPool.tcp.maxConnections", "connectionPool.tcp.connectTimeout", "connectionPool.http.maxRetries"}),
        ("{outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}}",
         {"outlierDetection.consecutive5xxErrors"}),
        ("{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}", set()),
        ("{loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: 1s}}}}",
         {"loadBalancer.consistentHash.httpCookie"}),
        ("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}}",
         {"loadBalancer.consistentHash.useSourceIp", "loadBalancer.consistentHash.maglev"}),
        ("{loadBalancer: {simple: RANDOM}}", {"loadBalancer.simple"}),
        ("{loadBalancer: {simple: ROUND_ROBIN}}", set()),
        ("{tls: {mode: SIMPLE, caCertificates: /ca.pem}}", {"tls"}),
    ],
)  # fmt: skip
def test_destination_rule_fields_grpc_ignores(traffic_policy: str, fields: set[str]) -> None:
    assert rule_fields(traffic_policy + "\n") == fields


@pytest.mark.parametrize(
    ("http", "fields"),
    [
        ("route: [{destination: {host: cart.shop.internal}}]\n", set()),
        ("retries: {attempts: 2, retryOn: 'unavailable,cancelled'}\n"
         "    route: [{destination: {host: cart.shop.internal}}]\n",
         set()),
        ("retries: {attempts: 2, retryOn: 'gateway-error,unavailable', perTryTimeout: 1s}\n"
         "    route: [{destination: {host: cart.shop.internal}}]\n",
         {"http.retries.retryOn", "http.retries.perTryTimeout"}),
        ("rewrite: {uri: /v2/, authority: a.example}\n    route: [{destination: {host: cart.shop.internal}}]\n",
         {"http.rewrite.uri", "http.rewrite.authority"}),
        ("headers: {response: {remove: [x-a]}}\n"
         "    route: [{destination: {host: cart.shop.internal}, headers: {request: {add: {x-b: c}}}}]\n",
         {"http.headers", "http.route.headers"}),
        ("fault: {abort: {httpStatus: 503, percentage: {value: 10}}}\n"
         "    route: [{destination: {host: cart.shop.internal}}]\n", set()),
    ],
)  # fmt: skip
def test_virtual_service_fields_grpc_ignores(http: str, fields: set[str]) -> None:
    assert route_fields(http) == fields


def node(agent: str = "", generator: str = "") -> base_pb2.Node:
    n = base_pb2.Node(id="n", user_agent_name=agent)
    if generator:
        n.metadata.update({"GENERATOR": generator})
    return n


def test_client_type_from_the_node() -> None:
    assert client_type(node("gRPC C-core")) == "grpc"
    assert client_type(node("grpc-go")) == "grpc"
    assert client_type(node(generator="grpc")) == "grpc"
    assert client_type(node("envoy")) == "envoy"
    assert client_type(node()) == "other"


def view_of(text: str) -> View:
    index = Index()
    shard = index.writer(SourceId("files/test"))
    with shard.batch():
        shard.set_policy(HOST, policies(text).policies[HOST])
        shard.upsert(Service(HOST, namespace="shop", ports=(Port(8080, "grpc", PortProtocol.GRPC),),
                             endpoints=(Endpoint("10.0.0.1"),)))  # fmt: skip
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    return view


RULE = (
    HEAD + "kind: DestinationRule\nspec:\n  host: cart.shop.internal\n"
    "  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}\n"
)


def test_reports_are_once_per_client_type_host_and_field_and_go_with_the_field() -> None:
    view = view_of(RULE)
    cluster = f"outbound|8080||{HOST}"
    assert view.grpc_ignored[(CLUSTER, cluster)][0] == HOST
    assert (ROUTE, f"{HOST}:8080") not in view.grpc_ignored  # no VirtualService: the default route
    metrics = XdsMetrics(CollectorRegistry())
    reports = UnsupportedFields(metrics.unsupported_fields)
    labels = {"client_type": "grpc", "field": "connectionPool.tcp.maxConnections"}

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("discoveryd_xds_unsupported_fields", labels)

    reports.sent("envoy", "e", view, CLUSTER, [cluster])
    assert reports.syncz() == [] and gauge() is None
    reports.sent("grpc", "g1", view, CLUSTER, [cluster])
    reports.sent("grpc", "g2", view, CLUSTER, [cluster])
    (report,) = reports.syncz()
    assert report["node"] == "g1" and report["resources"] == [cluster] and gauge() == 1
    assert "connectionPool.tcp.maxConnections" in status.render({"connections": [], "unsupported": reports.syncz()})
    reports.refresh(view_of(RULE), {CLUSTER: frozenset({cluster})})  # same fields: kept
    assert len(reports.syncz()) == 1 and gauge() == 1
    reports.refresh(view_of(RULE.replace("tcp: {maxConnections: 1}", "http: {http2MaxRequests: 1}")), {})
    assert len(reports.syncz()) == 1  # the resource did not change: nothing to look at
    reports.refresh(
        view_of(RULE.replace("tcp: {maxConnections: 1}", "http: {http2MaxRequests: 1}")),
        {CLUSTER: frozenset({cluster})},
    )
    assert reports.syncz() == [] and gauge() == 0
    reports.sent("grpc", "g1", view, CLUSTER, [cluster])
    reports.clear()
    assert reports.syncz() == [] and gauge() == 0


class _Counted(dict[tuple[str, str], tuple[Hostname, tuple[tuple[str, str], ...]]]):
    lookups = 0

    def get(self, key: object, default: object = None) -> object:  # type: ignore[override]
        _Counted.lookups += 1
        return super().get(key, default)  # type: ignore[call-overload]


def test_refresh_looks_only_at_the_changed_resources() -> None:
    """A `*` rule carrying an unsupported field is reported for every host a gRPC client is sent; each later
    push (one endpoint changing) walked every report to check it still holds."""
    ignored = _Counted({(CLUSTER, f"c{i}"): (Hostname(f"h{i}.test"), (("f", "d"),)) for i in range(500)})
    view = dataclasses.replace(EMPTY_VIEW, grpc_ignored=ignored)  # type: ignore[arg-type]
    reports = UnsupportedFields(XdsMetrics(CollectorRegistry()).unsupported_fields)
    reports.sent("grpc", "g", view, CLUSTER, [f"c{i}" for i in range(500)])
    assert len(reports.syncz()) == 500
    _Counted.lookups = 0
    reports.refresh(view, {ENDPOINT: frozenset({"c1"}), CLUSTER: frozenset({"c2", "unrelated"})})
    assert _Counted.lookups <= 2 and len(reports.syncz()) == 500
    gone = _Counted({k: v for k, v in ignored.items() if k != (CLUSTER, "c2")})
    reports.refresh(dataclasses.replace(EMPTY_VIEW, grpc_ignored=gone), {CLUSTER: frozenset({"c2"})})  # type: ignore[arg-type]
    assert {r["host"] for r in reports.syncz()} == {f"h{i}.test" for i in range(500)} - {"h2.test"}


def test_a_namespace_variant_is_reported_to_the_grpc_clients_of_that_namespace() -> None:
    """A DestinationRule only one namespace's clients see (a rule in their namespace) shapes their own variant of
    the cluster; its fields gRPC does not honour went unreported, since only the shared build was recorded."""
    web_rule = RULE.replace("namespace: shop", "namespace: web")
    index = Index()
    shard = index.writer(SourceId("files/test"))
    with shard.batch():
        shard.set_policy(HOST, policies(web_rule).policies[HOST])
        shard.upsert(Service(HOST, namespace="shop", ports=(Port(8080, "grpc", PortProtocol.GRPC),),
                             endpoints=(Endpoint("10.0.0.1"),)))  # fmt: skip
    builder = Builder(BuildOptions())
    view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
    cluster = f"outbound|8080||{HOST}"
    assert (CLUSTER, cluster) not in view.grpc_ignored  # the shared cluster carries no rule
    reports = UnsupportedFields(XdsMetrics(CollectorRegistry()).unsupported_fields)
    reports.sent("grpc", "plain", view, CLUSTER, [cluster], None)
    reports.sent("grpc", "other", view, CLUSTER, [cluster], "other")
    assert reports.syncz() == []
    reports.sent("grpc", "in-web", view, CLUSTER, [cluster], "web")
    (report,) = reports.syncz()
    assert (report["field"], report["node"], report["resources"]) == (
        "connectionPool.tcp.maxConnections",
        "in-web",
        [cluster],
    )
    reports.sent_all("grpc", "in-web-2", view, CLUSTER, "web")
    assert len(reports.syncz()) == 1
    reports.refresh(view, {CLUSTER: frozenset({cluster})})  # still carried by the web variant
    assert len(reports.syncz()) == 1
    before = index.snapshot.version
    shard.set_policy(HOST, None)
    gone, changes = builder.update(view, index.snapshot, index.changed_between(before, index.snapshot.version))
    assert not gone.grpc_ignored_over
    reports.refresh(gone, changes)
    assert reports.syncz() == []


def test_a_wildcard_response_of_the_same_view_is_looked_at_once() -> None:
    """Every wildcard response to a gRPC client walked every resource carrying an unsupported field; for the
    same view and namespace it can report nothing new. A new view (refresh) or `clear` looks again."""
    ignored = _Counted({(CLUSTER, f"c{i}"): (Hostname(f"h{i}.test"), (("f", "d"),)) for i in range(50)})
    view = dataclasses.replace(EMPTY_VIEW, grpc_ignored=ignored)  # type: ignore[arg-type]
    reports = UnsupportedFields(XdsMetrics(CollectorRegistry()).unsupported_fields)
    reports.sent_all("grpc", "g1", view, CLUSTER, None)
    assert len(reports.syncz()) == 50
    _Counted.lookups = 0
    reports.sent_all("grpc", "g2", view, CLUSTER, None)
    assert _Counted.lookups == 0
    reports.clear()
    reports.sent_all("grpc", "g2", view, CLUSTER, None)
    assert len(reports.syncz()) == 50 and {r["node"] for r in reports.syncz()} == {"g2"}
    reports.refresh(view, {})
    reports.clear()
    reports.sent_all("grpc", "g3", view, CLUSTER, None)
    assert {r["node"] for r in reports.syncz()} == {"g3"}
