"""Resources built from services: what each resolution, protocol and endpoint becomes; incremental views."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2

from discoveryd.config import LbPolicy
from discoveryd.index import Index
from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, PortProtocol, Resolution, Service, SourceId
from discoveryd.xds.resources import (
    CLUSTER,
    EMPTY_VIEW,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Builder,
    BuildOptions,
    View,
)

SRC = SourceId("files/t")


def svc(host: str = "a.test", *endpoints: Endpoint, **kw: Any) -> Service:
    kw.setdefault("ports", (Port(80, "http", PortProtocol.HTTP),))
    return Service(hostname=Hostname(host), endpoints=endpoints, source=SRC, **kw)


def unpack(view: View, type_url: str, name: str) -> Any:
    cls = {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }[type_url]
    packed = any_pb2.Any.FromString(view.resources[type_url][name].body)
    assert packed.type_url == type_url
    msg = cls()
    packed.Unpack(msg)
    return msg


def build(*services: Service, options: BuildOptions | None = None) -> View:
    index = Index()
    index.writer(SRC).replace(services)
    view, _ = Builder(options or BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    return view


def test_static_service_is_an_eds_cluster_over_ads() -> None:
    view = build(svc("a.test", Endpoint("10.0.0.1")), options=BuildOptions(2.5, LbPolicy.LEAST_REQUEST))
    c = unpack(view, CLUSTER, "outbound|80||a.test")
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.service_name == "outbound|80||a.test"
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert c.connect_timeout.ToMilliseconds() == 2500
    assert c.metadata.filter_metadata["discoveryd"]["source"] == "files/t"
    assert not c.typed_extension_protocol_options, "plain HTTP gets no HTTP/2 options"


@pytest.mark.parametrize("protocol", [PortProtocol.GRPC, PortProtocol.HTTP2, PortProtocol.GRPC_WEB])
def test_http2_protocols_get_http2_upstream_options(protocol: PortProtocol) -> None:
    view = build(svc("a.test", Endpoint("10.0.0.1"), ports=(Port(90, "p", protocol),)))
    c = unpack(view, CLUSTER, "outbound|90||a.test")
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")


def test_assignment_localities_weights_health_metadata() -> None:
    east, west = Locality("us", "east-1", "a"), Locality("us", "west-1")
    view = build(
        svc(
            "a.test",
            Endpoint("10.0.0.1", locality=east, weight=3),
            Endpoint("10.0.0.2", locality=east, weight=2, health=Health.DRAINING),
            Endpoint("10.0.0.3", locality=west, health=Health.UNHEALTHY, ports={"http": 8081}),
            Endpoint("not-an-ip.example", locality=west),
            Endpoint("unix:///run/a.sock", locality=west, weight=0),
        )
    )
    cla = unpack(view, ENDPOINT, "outbound|80||a.test")
    assert cla.cluster_name == "outbound|80||a.test"
    groups = {(g.locality.region, g.locality.zone, g.locality.sub_zone): g for g in cla.endpoints}
    assert set(groups) == {("us", "east-1", "a"), ("us", "west-1", "")}
    e, w = groups[("us", "east-1", "a")], groups[("us", "west-1", "")]
    assert e.load_balancing_weight.value == 5 and w.load_balancing_weight.value == 2
    assert [lb.load_balancing_weight.value for lb in e.lb_endpoints] == [3, 2]
    assert [lb.health_status for lb in e.lb_endpoints] == [health_check_pb2.HEALTHY, health_check_pb2.DRAINING]
    addresses = [lb.endpoint.address for lb in w.lb_endpoints]
    assert [(a.socket_address.address, a.socket_address.port_value) for a in addresses[:1]] == [("10.0.0.3", 8081)]
    assert addresses[1].pipe.path == "/run/a.sock", "unix endpoints are pipes"
    assert len(addresses) == 2, "a hostname endpoint cannot be sent over EDS"
    assert w.lb_endpoints[0].health_status == health_check_pb2.UNHEALTHY
    assert e.lb_endpoints[0].metadata.filter_metadata["discoveryd"]["source"] == "files/t"


def test_target_port_is_used_when_the_endpoint_names_none() -> None:
    view = build(svc("a.test", Endpoint("10.0.0.1"), ports=(Port(80, "http", PortProtocol.HTTP, target_port=8080),)))
    sa = unpack(view, ENDPOINT, "outbound|80||a.test").endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert sa.port_value == 8080


def test_dns_resolutions() -> None:
    view = build(
        svc("dns.test", Endpoint("a.example"), Endpoint("b.example"), resolution=Resolution.DNS),
        svc("rr.test", Endpoint("c.example"), resolution=Resolution.DNS_ROUND_ROBIN),
        svc("rr2.test", Endpoint("c.example"), Endpoint("d.example"), resolution=Resolution.DNS_ROUND_ROBIN),
        svc("self.test", resolution=Resolution.DNS),
    )
    strict = unpack(view, CLUSTER, "outbound|80||dns.test")
    assert strict.type == cluster_pb2.Cluster.STRICT_DNS
    hosts = [lb.endpoint.address.socket_address.address for lb in strict.load_assignment.endpoints[0].lb_endpoints]
    assert hosts == ["a.example", "b.example"]
    assert unpack(view, CLUSTER, "outbound|80||rr.test").type == cluster_pb2.Cluster.LOGICAL_DNS
    assert unpack(view, CLUSTER, "outbound|80||rr2.test").type == cluster_pb2.Cluster.STRICT_DNS
    own = unpack(view, CLUSTER, "outbound|80||self.test").load_assignment.endpoints[0].lb_endpoints[0]
    assert own.endpoint.address.socket_address.address == "self.test"
    assert not any(n.endswith("dns.test") for n in view.resources[ENDPOINT]), "DNS clusters carry endpoints inline"


def test_resolution_none_is_a_passthrough_cluster_without_listener() -> None:
    view = build(svc("ext.test", resolution=Resolution.NONE))
    c = unpack(view, CLUSTER, "outbound|80||ext.test")
    assert c.type == cluster_pb2.Cluster.ORIGINAL_DST and c.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert not view.resources[ENDPOINT] and not view.resources[LISTENER]


def test_udp_ports_and_wildcard_hosts() -> None:
    view = build(
        svc("u.test", Endpoint("10.0.0.1"), ports=(Port(53, "udp-dns", PortProtocol.UDP), Port(80, "http"))),
        svc("*.wild.test", Endpoint("10.0.0.2")),
    )
    assert sorted(view.resources[CLUSTER]) == ["outbound|80||*.wild.test", "outbound|80||u.test"]
    assert sorted(view.resources[LISTENER]) == ["u.test:80"]


def test_listener_and_route_for_proxyless_grpc() -> None:
    view = build(svc("g.test", Endpoint("10.0.0.1"), ports=(Port(50051, "grpc", PortProtocol.GRPC),)))
    listener = unpack(view, LISTENER, "g.test:50051")
    manager = http_connection_manager_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "g.test:50051"
    assert manager.rds.config_source.HasField("ads")
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    route = unpack(view, ROUTE, "g.test:50051")
    (vhost,) = route.virtual_hosts
    assert "g.test:50051" in vhost.domains
    assert vhost.routes[0].route.cluster == "outbound|50051||g.test"


def test_update_rebuilds_only_what_changed_and_keeps_unchanged_versions() -> None:
    index = Index()
    shard = index.writer(SRC)
    a, b = svc("a.test", Endpoint("10.0.0.1")), svc("b.test", Endpoint("10.0.0.2"))
    shard.replace([a, b])
    builder = Builder(BuildOptions())
    v1, changes = builder.update(EMPTY_VIEW, index.snapshot, None)
    assert changes[CLUSTER] == {"outbound|80||a.test", "outbound|80||b.test"}

    # Only a's endpoints change: its EDS resource is new, its cluster and everything of b are the same objects.
    shard.replace([svc("a.test", Endpoint("10.0.0.9")), b])
    v2, changes = builder.update(v1, index.snapshot, index.snapshot.changed)
    assert dict(changes) == {ENDPOINT: {"outbound|80||a.test"}}
    assert v2.resources[CLUSTER]["outbound|80||a.test"] is v1.resources[CLUSTER]["outbound|80||a.test"]
    assert v2.resources[ENDPOINT]["outbound|80||b.test"] is v1.resources[ENDPOINT]["outbound|80||b.test"]
    old, new = v1.resources[ENDPOINT]["outbound|80||a.test"], v2.resources[ENDPOINT]["outbound|80||a.test"]
    assert new.version != old.version and len(new.version) == 16, "versions are hashes of the bytes"
    # Another builder (another replica, a restart) gives the same content the same version.
    again, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    assert again.resources[ENDPOINT]["outbound|80||a.test"].version == new.version

    # A change that alters no resource is no change at all.
    shard.replace([svc("a.test", Endpoint("10.0.0.9"), labels={"team": "x"}), b])
    _, changes = builder.update(v2, index.snapshot, index.snapshot.changed)
    assert not changes

    # Deletion removes every resource of the host and reports their names.
    shard.replace([b])
    v4, changes = builder.update(v2, index.snapshot, index.snapshot.changed)
    assert changes[CLUSTER] == {"outbound|80||a.test"} and changes[LISTENER] == {"a.test:80"}
    assert "outbound|80||a.test" not in v4.resources[ENDPOINT]
    assert Hostname("a.test") not in v4.by_host


def test_values_no_resource_can_carry_are_left_out_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    view = build(
        svc("ports.test", Endpoint("10.0.0.1", ports={"http": 70000}), Endpoint("10.0.0.2")),
        svc("badport.test", Endpoint("10.0.0.3"), ports=(Port(0, "http"), Port(70000, "http2"), Port(81, "ok"))),
        svc("weight.test", Endpoint("10.0.0.4", weight=2**40)),
        svc("fine.test", Endpoint("10.0.0.5")),
    )
    cla = unpack(view, ENDPOINT, "outbound|80||ports.test")
    assert [lb.endpoint.address.socket_address.address for lb in cla.endpoints[0].lb_endpoints] == ["10.0.0.2"]
    assert [n for n in view.resources[CLUSTER] if "badport" in n] == ["outbound|81||badport.test"]
    assert not [n for n in view.resources[CLUSTER] if "weight.test" in n]
    assert "outbound|80||fine.test" in view.resources[CLUSTER]
    assert "weight.test (from files/t) cannot be served" in caplog.text
