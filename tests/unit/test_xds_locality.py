"""localityLbSetting: validation like Istio's, per-client priorities and weights, the variant cache."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd import state
from discoveryd.index import Index, Snapshot
from discoveryd.model import Endpoint, Hostname, Locality, Port, PortProtocol, Problem, Service, Severity, SourceId
from discoveryd.policy import HostPolicy, LocalityDistribute, LocalityLb
from discoveryd.xds.connection import Connection
from discoveryd.xds.locality import Client, client_of
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, ENDPOINT, VARIANTS_PER_PLAN, Builder, BuildOptions, View
from tests.fakes.policy import DR_HEAD, problems_of, read_policies

HOST = Hostname("cart.shop.internal")
NAME = "outbound|8080||cart.shop.internal"

HEAD = DR_HEAD + "  trafficPolicy:\n"
OD = "    outlierDetection: {consecutive5xxErrors: 1}\n"


def rule(locality: str, od: bool = True) -> str:
    return (
        HEAD + (OD if od else "") + "    loadBalancer:\n      localityLbSetting:\n" + textwrap.indent(locality, " " * 8)
    )


def policy_of(text: str) -> HostPolicy:
    return read_policies(text).policies[HOST]


# -- validation: one test per rule ---------------------------------------------------------------


def test_a_full_setting_is_read() -> None:
    text = rule(
        "enabled: true\n"
        "distribute:\n"
        "- from: us-west/zone1/*\n"
        "  to: {us-west/zone1/*: 80, us-west/zone2/*: 20}\n"
        "failoverPriority: [topology.istio.io/network, topology.kubernetes.io/region]\n"
    )
    assert problems_of(text) == []
    rule_ = policy_of(text).destination_rule
    assert rule_ is not None and rule_.traffic_policy is not None
    lb = rule_.traffic_policy.load_balancer
    assert lb is not None and lb.locality == LocalityLb(
        True,
        (LocalityDistribute("us-west/zone1/*", (("us-west/zone1/*", 80), ("us-west/zone2/*", 20))),),
        (),
        ("topology.istio.io/network", "topology.kubernetes.io/region"),
    )


def only(text: str) -> Problem:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


def test_distribute_and_failover_are_exclusive() -> None:
    p = only(rule("distribute: [{from: us/*, to: {us/*: 100}}]\nfailover: [{from: us, to: eu}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting" and "together" in p.message
    assert p.where == "p.yaml:9"  # the localityLbSetting key


def test_failover_priority_cannot_name_a_locality_label_next_to_failover() -> None:
    p = only(rule("failover: [{from: us, to: eu}]\nfailoverPriority: [topology.kubernetes.io/zone]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[0]"


def test_a_distribute_weight_is_1_to_100() -> None:
    p = only(rule("distribute: [{from: us/*, to: {us/a: 0, us/b: 100}}]\n"))
    assert p.field == 'spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to["us/a"]'
    p = only(rule("distribute: [{from: us/*, to: {us/a: 101}}]\n"))
    assert "between 1 and 100" in p.message


def test_distribute_weights_sum_to_100() -> None:
    p = only(rule("distribute: [{from: us/*, to: {us/a: 50, us/b: 40}}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to"
    assert "sum to 100, not 90" in p.message


def test_a_wildcard_is_single_and_last() -> None:
    p = only(rule("distribute: [{from: '*/zone1', to: {us/a: 100}}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].from"
    assert "wildcard" in p.message


def test_a_locality_has_no_empty_part() -> None:
    p = only(rule("distribute: [{from: us//a, to: {us/a: 100}}]\n"))
    assert "empty" in p.message


def test_localities_do_not_overlap() -> None:
    p = only(rule("distribute: [{from: us/*, to: {us: 50, us/a: 50}}]\n"))
    assert p.field == 'spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to["us/a"]'
    assert "overlaps" in p.message
    p = only(rule("distribute: [{from: us, to: {us/a: 100}}, {from: us/b, to: {us/a: 100}}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[1].from"


def test_failover_regions_differ() -> None:
    p = only(rule("failover: [{from: us, to: us}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]"
    assert "different regions" in p.message


def test_failover_names_regions_only() -> None:
    p = only(rule("failover: [{from: us/a, to: eu}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0].from"


def test_failover_has_no_wildcard() -> None:
    p = only(rule("failover: [{from: us, to: '*'}]\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0].to" and "'*'" in p.message


def test_unknown_fields_and_wrong_types() -> None:
    p = only(rule("enabled: yes please\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.enabled"
    p = only(rule("failovr: []\n"))
    assert p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.failovr"


def test_failover_without_outlier_detection_is_a_warning_and_the_rule_is_kept() -> None:
    text = rule("failover: [{from: us, to: eu}]\n", od=False)
    p = only(text)
    assert p.severity is Severity.WARNING and p.field == "spec.trafficPolicy.loadBalancer.localityLbSetting"
    assert policy_of(text).destination_rule is not None


def test_a_bad_setting_keeps_the_last_good_rule() -> None:
    policies = PolicySet()
    good, _ = read_yaml_all("p.yaml", rule("failover: [{from: us, to: eu}]\n"), "default")
    policies.update("p.yaml", good)
    policies.build()
    objects, problems = read_yaml_all("p.yaml", rule("failover: [{from: us, to: us}]\n"), "default")
    assert problems and not objects  # the files registry then keeps the file's last good objects
    assert policies.policies[HOST].destination_rule is not None


def test_subsets_and_port_levels_take_the_setting_too() -> None:
    text = (
        HEAD
        + OD
        + "    portLevelSettings:\n    - port: {number: 8080}\n"
        + "      loadBalancer: {localityLbSetting: {failover: [{from: us, to: us}]}}\n"
        + "  subsets:\n  - name: v1\n    labels: {v: '1'}\n"
        + "    trafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: eu, to: eu}]}}}\n"
    )
    fields = sorted(p.field for p in problems_of(text))
    assert fields == [
        "spec.subsets[0].trafficPolicy.loadBalancer.localityLbSetting.failover[0]",
        "spec.trafficPolicy.portLevelSettings[0].loadBalancer.localityLbSetting.failover[0]",
    ]


# -- priorities and weights ------------------------------------------------------------------------


def ep(address: str, region: str, zone: str, subzone: str = "", **labels: str) -> Endpoint:
    return Endpoint(address, locality=Locality(region, zone, subzone), labels=labels)


ENDPOINTS = (
    ep("10.0.0.1", "us", "a", "1"),
    ep("10.0.0.2", "us", "a", "2"),
    ep("10.0.0.3", "us", "b"),
    ep("10.0.0.4", "eu", "x"),
    ep("10.0.0.5", "ap", "y"),
)


def service(*endpoints: Endpoint) -> Service:
    return Service(
        HOST, namespace="shop", ports=(Port(8080, "http", PortProtocol.HTTP),), endpoints=endpoints or ENDPOINTS
    )


def view_of(policy: HostPolicy | None, svc: Service | None = None, builder: Builder | None = None) -> View:
    snapshot = Snapshot(
        version=1, services={HOST: svc or service()}, policies={HOST: policy} if policy is not None else {}
    )
    view, _ = (builder or Builder(BuildOptions())).update(EMPTY_VIEW, snapshot, None)
    return view


def cla_for(view: View, client: Client | None) -> endpoint_pb2.ClusterLoadAssignment:
    r = view.localize(view.resources[ENDPOINT][NAME], client)
    packed = any_pb2.Any.FromString(r.body)
    return endpoint_pb2.ClusterLoadAssignment.FromString(packed.value)


def priorities(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, int]:
    return {e.endpoint.address.socket_address.address: g.priority for g in cla.endpoints for e in g.lb_endpoints}


def weights(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in cla.endpoints:
        key = f"{g.locality.region}/{g.locality.zone}"
        out[key] = out.get(key, 0) + g.load_balancing_weight.value
    return out


def test_default_failover_orders_by_the_clients_locality() -> None:
    view = view_of(policy_of(rule("enabled: true\n")))
    got = priorities(cla_for(view, Client("us", "a", "1")))
    assert got == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 3, "10.0.0.5": 3}
    got = priorities(cla_for(view, Client("us", "b")))
    assert got == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 0, "10.0.0.4": 2, "10.0.0.5": 2}


def test_failover_region_comes_before_the_others() -> None:
    view = view_of(policy_of(rule("failover: [{from: us, to: ap}]\n")))
    got = priorities(cla_for(view, Client("us", "a", "1")))
    assert got == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 4, "10.0.0.5": 3}
    # a client in a region no endpoint has, with a failover rule from it: the failover region first
    got = priorities(cla_for(view_of(policy_of(rule("failover: [{from: sa, to: eu}]\n"))), Client("sa", "q")))
    assert got == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1, "10.0.0.4": 0, "10.0.0.5": 1}


def test_failover_priority_orders_by_labels_and_splits_localities() -> None:
    endpoints = (
        ep("10.0.0.1", "us", "a", net="n1", tier="gold"),
        ep("10.0.0.2", "us", "a", net="n1", tier="iron"),
        ep("10.0.0.3", "us", "b", net="n2", tier="gold"),
    )
    view = view_of(policy_of(rule("failoverPriority: [net, tier]\n")), service(*endpoints))
    cla = cla_for(view, Client(labels={"net": "n1", "tier": "gold"}))
    assert priorities(cla) == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2}
    assert len(cla.endpoints) == 3  # us/a split into two priorities
    # the well-known topology labels come from the client's node locality and the endpoints' localities
    view = view_of(policy_of(rule("failoverPriority: [topology.kubernetes.io/zone]\n")), service(*endpoints))
    cla = cla_for(view, Client("us", "b", "", {"topology.kubernetes.io/zone": "b"}))
    assert priorities(cla) == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 0}
    # key=value: the value to match, whatever the client's
    view = view_of(policy_of(rule("failoverPriority: [tier=iron]\n")), service(*endpoints))
    assert priorities(cla_for(view, Client(labels={"tier": "gold"}))) == {"10.0.0.1": 1, "10.0.0.2": 0, "10.0.0.3": 1}


def test_failover_priority_with_failover_applies_both() -> None:
    endpoints = (ep("10.0.0.1", "us", "a", net="n1"), ep("10.0.0.2", "eu", "x", net="n1"), ep("10.0.0.3", "us", "a"))
    view = view_of(policy_of(rule("failover: [{from: us, to: eu}]\nfailoverPriority: [net]\n")), service(*endpoints))
    got = priorities(cla_for(view, Client("us", "a", "", {"net": "n1"})))
    assert got == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2}


def test_distribute_sets_locality_weights_per_client() -> None:
    text = rule("distribute:\n- from: us/a/*\n  to: {us/a: 70, us/b: 20, eu/*: 10}\n- from: eu/*\n  to: {eu/x: 100}\n")
    view = view_of(policy_of(text))
    assert weights(cla_for(view, Client("us", "a", "1"))) == {"us/a": 70, "us/b": 20, "eu/x": 10}  # ap dropped
    # us/a holds two subzone groups of weight 1 each: 70 shared by their weights
    groups = {
        (g.locality.zone, g.locality.sub_zone): g.load_balancing_weight.value
        for g in cla_for(view, Client("us", "a", "1")).endpoints
    }
    assert groups == {("a", "1"): 35, ("a", "2"): 35, ("b", ""): 20, ("x", ""): 10}
    assert weights(cla_for(view, Client("eu", "x"))) == {"eu/x": 100}
    # no `from` matches: the shared assignment
    assert cla_for(view, Client("ap", "y")) == cla_for(view, None)


def test_distribute_makes_the_cluster_honour_locality_weights() -> None:
    view = view_of(policy_of(rule("distribute: [{from: '*', to: {us: 100}}]\n", od=False)))
    c = cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(view.resources[CLUSTER][NAME].body).value)
    assert c.common_lb_config.HasField("locality_weighted_lb_config")


def test_failover_needs_outlier_detection_and_enabled_false_turns_it_off() -> None:
    for text in (
        rule("failover: [{from: us, to: eu}]\n", od=False),
        rule("enabled: false\nfailover: [{from: us, to: eu}]\n"),
    ):
        view = view_of(policy_of(text))
        assert not view.localized
        c = cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(view.resources[CLUSTER][NAME].body).value)
        assert not c.common_lb_config.HasField("locality_weighted_lb_config")
        assert priorities(cla_for(view, Client("us", "a", "1"))) == dict.fromkeys(priorities(cla_for(view, None)), 0)


def test_without_a_locality_setting_the_bytes_are_unchanged() -> None:
    plain = view_of(None)
    with_outlier_only = view_of(policy_of(HEAD + OD))
    for view in (plain, with_outlier_only):
        assert not view.localized
        r = view.resources[ENDPOINT][NAME]
        assert view.localize(r, Client("us", "a", "1")) is r
    assert plain.resources[ENDPOINT][NAME].body == with_outlier_only.resources[ENDPOINT][NAME].body


# -- the variant cache -----------------------------------------------------------------------------


def test_variants_are_built_once_per_key_not_per_client() -> None:
    builder = Builder(BuildOptions())
    view = view_of(policy_of(rule("failover: [{from: us, to: eu}]\n")), builder=builder)
    base = view.resources[ENDPOINT][NAME]
    seen = set()
    for i in range(1000):
        zone = "abc"[i % 3]
        seen.add(view.localize(base, Client("us", zone, f"pod-{i}")).body)  # subzones no endpoint has
    # zones a and b (endpoints there) and c (none): three keys, three builds
    assert builder.variants.builds == 3 and len(seen) == 3


def test_a_client_cannot_grow_the_cache_with_made_up_localities() -> None:
    builder = Builder(BuildOptions())
    view = view_of(policy_of(rule("enabled: true\n")), builder=builder)
    base = view.resources[ENDPOINT][NAME]
    for i in range(500):
        assert view.localize(base, Client(f"nowhere-{i}", f"z{i}", f"s{i}")) is base  # changes nothing: no build
        view.localize(base, Client("us", f"z{i}", f"s{i}"))  # all the same as a client in us/<no such zone>
    assert builder.variants.builds == 1 and len(builder.variants) == 1


def test_the_cache_is_bounded_least_recently_used_out() -> None:
    builder = Builder(BuildOptions(locality_variants=2))
    view = view_of(policy_of(rule("enabled: true\n")), builder=builder)
    assert builder.variants.capacity == VARIANTS_PER_PLAN  # room for the variants of its one plan
    builder.variants.resize(2)
    base = view.resources[ENDPOINT][NAME]
    for c in (Client("us", "a", "1"), Client("us", "b"), Client("eu", "x"), Client("us", "a", "1")):
        view.localize(base, c)
    assert len(builder.variants) == 2 and builder.variants.builds == 4


def test_a_changed_setting_with_the_same_endpoints_is_pushed_to_located_clients() -> None:
    builder = Builder(BuildOptions())
    first = policy_of(rule("failover: [{from: us, to: eu}]\n"))
    second = policy_of(rule("failover: [{from: us, to: ap}]\n"))
    one = Snapshot(version=1, services={HOST: service()}, policies={HOST: first})
    two = Snapshot(version=2, services={HOST: service()}, policies={HOST: second})
    v1, _ = builder.update(EMPTY_VIEW, one, None)
    v2, changes = builder.update(v1, two, {HOST})
    assert v1.resources[ENDPOINT][NAME] is v2.resources[ENDPOINT][NAME]  # shared bytes unchanged
    assert NAME in changes[ENDPOINT]
    us = Client("us", "a", "1")
    assert priorities(cla_for(v2, us))["10.0.0.5"] == 3 and priorities(cla_for(v1, us))["10.0.0.5"] == 4


def test_the_connection_serves_the_clients_variant() -> None:
    view = view_of(policy_of(rule("enabled: true\n")))
    conn = Connection(1, "ADS", False, "peer", view, XdsMetrics(CollectorRegistry()))
    req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=[NAME])
    req.node.id = "envoy"
    req.node.locality.CopyFrom(base_pb2.Locality(region="us", zone="b"))
    conn.on_request(req)
    assert conn.client == Client(
        "us", "b", "", {"topology.kubernetes.io/region": "us", "topology.kubernetes.io/zone": "b"}
    )
    assert conn.syncz()["locality"] == "us/b/"
    out = conn.next_response()
    assert out is not None
    resp = discovery_pb2.DiscoveryResponse.FromString(out[1])
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(resp.resources[0].value)
    assert priorities(cla)["10.0.0.3"] == 0 and priorities(cla)["10.0.0.1"] == 1


def test_client_of_reads_locality_labels_and_network() -> None:
    node = discovery_pb2.DiscoveryRequest().node
    assert client_of(node) is None
    node.metadata.update({"LABELS": {"app": "web", "n": 3}, "NETWORK": "net1"})
    got = client_of(node)
    assert got is not None and got.labels == {"app": "web", "topology.istio.io/network": "net1"}


@pytest.mark.parametrize("count", [1, 200])
def test_many_labels_are_cut(count: int) -> None:
    node = discovery_pb2.DiscoveryRequest().node
    node.metadata.update({"LABELS": {f"k{i}": "v" for i in range(count)}})
    got = client_of(node)
    assert got is not None and got.labels is not None and len(got.labels) == min(count, 64)


def test_a_subset_policy_localizes_the_subset_assignment_only() -> None:
    text = (
        HEAD
        + OD
        + "  subsets:\n  - name: v1\n    labels: {v: '1'}\n"
        + "    trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}}\n"
    )
    endpoints = tuple(Endpoint(e.address, locality=e.locality, labels={"v": "1"}) for e in ENDPOINTS)
    view = view_of(policy_of(text), service(*endpoints))
    assert set(view.localized) == {"outbound|8080|v1|cart.shop.internal"}
    r = view.resources[ENDPOINT]["outbound|8080|v1|cart.shop.internal"]
    packed = any_pb2.Any.FromString(view.localize(r, Client("eu", "x")).body)
    got = priorities(endpoint_pb2.ClusterLoadAssignment.FromString(packed.value))
    assert got == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1, "10.0.0.4": 0, "10.0.0.5": 1}


def test_a_locality_setting_survives_a_warm_restart(tmp_path: Path) -> None:
    text = rule(
        "distribute: [{from: us/a/*, to: {us/a: 70, us/b: 30}}]\nfailoverPriority: [topology.istio.io/network, k=v]\n"
    )
    policy = policy_of(text)
    source = SourceId("files/local")
    before = Index([source])
    shard = before.writer(source)
    shard.set_policy(HOST, policy)
    shard.mark_synced()
    state.write_atomically(tmp_path, state.encode(before.capture(), 1.0))
    loaded = state.load(tmp_path, [source])
    assert loaded is not None and dict(loaded.parts[0].policies)[HOST] == policy


# -- a namespace's own rule ------------------------------------------------------------------------

WEB_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart-for-web, namespace: web}
spec:
  host: cart.shop.internal
  exportTo: [.]
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1}
    loadBalancer:
      localityLbSetting: {failover: [{from: us, to: ap}]}
  subsets:
  - name: v1
    labels: {v: '1'}
"""
V1 = "outbound|8080|v1|cart.shop.internal"


def located(view: View, name: str, namespace: str | None, client: Client) -> dict[str, int]:
    r = view.get(ENDPOINT, name, namespace)
    assert r is not None
    packed = any_pb2.Any.FromString(view.localize(r, client, namespace).body)
    return priorities(endpoint_pb2.ClusterLoadAssignment.FromString(packed.value))


def test_a_namespace_s_own_rule_localizes_its_assignments() -> None:
    """A rule private to namespace web with a locality setting: web's located clients get priorities for the
    cluster's assignment and the rule's subset assignment; clients elsewhere get the shared assignment."""
    endpoints = tuple(Endpoint(e.address, locality=e.locality, labels={"v": "1"}) for e in ENDPOINTS)
    builder = Builder(BuildOptions())
    view = view_of(policy_of(WEB_RULE), service(*endpoints), builder)
    us = Client("us", "a", "1")
    want = {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 4, "10.0.0.5": 3}
    assert located(view, NAME, "web", us) == want
    assert located(view, V1, "web", us) == want
    assert set(located(view, NAME, "other", us).values()) == {0}  # the shared assignment, as built
    assert view.localize(view.resources[ENDPOINT][NAME], us, "other") is view.resources[ENDPOINT][NAME]
    assert view.get(ENDPOINT, V1, "other") is None  # the subset is web's only
    # web's clients share the variants: one build per key, not per client
    for i in range(100):
        located(view, NAME, "web", Client("us", "a", f"pod-{i}"))
    assert builder.variants.builds == 3  # NAME for us/a/1 and us/a/<other>, V1 for us/a/1


def test_a_namespace_s_locality_plan_change_is_news_to_its_located_clients() -> None:
    """The same endpoints under another failover rule of web: same bytes, another plan; web's clients are told."""
    builder = Builder(BuildOptions())
    one = Snapshot(version=1, services={HOST: service()}, policies={HOST: policy_of(WEB_RULE)})
    changed = WEB_RULE.replace("to: ap", "to: eu")
    two = Snapshot(version=2, services={HOST: service()}, policies={HOST: policy_of(changed)})
    v1, _ = builder.update(EMPTY_VIEW, one, None)
    v2, changes = builder.update(v1, two, {HOST})
    assert NAME in changes[ENDPOINT]
    us = Client("us", "a", "1")
    assert located(v1, NAME, "web", us)["10.0.0.5"] == 3 and located(v2, NAME, "web", us)["10.0.0.5"] == 4
    assert v2.has_variants(NAME, "web") and not v2.has_variants(NAME, "other")


def test_the_connection_serves_its_namespace_s_variant() -> None:
    view = view_of(policy_of(WEB_RULE))
    for namespace, want in (("web", 0), ("other", 0)):
        conn = Connection(1, "ADS", False, "peer", view, XdsMetrics(CollectorRegistry()))
        req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=[NAME])
        req.node.id = "envoy"
        req.node.metadata.update({"NAMESPACE": namespace})
        req.node.locality.CopyFrom(base_pb2.Locality(region="eu", zone="x"))
        conn.on_request(req)
        out = conn.next_response()
        assert out is not None
        resp = discovery_pb2.DiscoveryResponse.FromString(out[1])
        got = priorities(endpoint_pb2.ClusterLoadAssignment.FromString(resp.resources[0].value))
        assert got["10.0.0.4"] == want
        if namespace == "web":
            assert got["10.0.0.1"] == 1  # eu first, then the rest
        else:
            assert set(got.values()) == {0}


def test_a_located_client_of_the_namespace_is_pushed_its_new_variant() -> None:
    """web's plan changes, the assignment's bytes do not: web's located client is sent its new priorities."""
    builder = Builder(BuildOptions())
    one = Snapshot(version=1, services={HOST: service()}, policies={HOST: policy_of(WEB_RULE)})
    changed = WEB_RULE.replace("to: ap", "to: eu")
    two = Snapshot(version=2, services={HOST: service()}, policies={HOST: policy_of(changed)})
    v1, _ = builder.update(EMPTY_VIEW, one, None)
    v2, changes = builder.update(v1, two, {HOST})
    conn = Connection(1, "ADS", False, "peer", v1, XdsMetrics(CollectorRegistry()))
    req = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=[NAME])
    req.node.id = "envoy"
    req.node.metadata.update({"NAMESPACE": "web"})
    req.node.locality.CopyFrom(base_pb2.Locality(region="us", zone="a", sub_zone="1"))
    conn.on_request(req)
    out = conn.next_response()
    assert out is not None
    first = discovery_pb2.DiscoveryResponse.FromString(out[1])
    assert priorities(endpoint_pb2.ClusterLoadAssignment.FromString(first.resources[0].value))["10.0.0.5"] == 3
    ack = discovery_pb2.DiscoveryRequest(
        type_url=ENDPOINT, resource_names=[NAME], version_info=first.version_info, response_nonce=first.nonce
    )
    conn.on_request(ack)
    assert conn.next_response() is None
    conn.notify(v2, changes, 0.0)
    out = conn.next_response()
    assert out is not None
    second = discovery_pb2.DiscoveryResponse.FromString(out[1])
    assert priorities(endpoint_pb2.ClusterLoadAssignment.FromString(second.resources[0].value))["10.0.0.5"] == 4


def test_the_variant_cache_holds_every_variant_in_use_when_located_assignments_outnumber_it() -> None:
    """5 located assignments x 3 client zones = 15 variants with room for 10: clients of the zones taking
    turns evicted each other's variants, so every lookup built one again (with 2000 assignments and 3 zones
    past the default 4096, 1000 reconnecting clients cost 2M builds). The cache grows with the plans."""
    from discoveryd.policy import DestinationRule, LoadBalancer, OutlierDetection, TrafficPolicy

    zones = ("a", "b", "c")
    index = Index()
    shard = index.writer(SourceId("files/t"))
    traffic = TrafficPolicy(
        load_balancer=LoadBalancer(locality=LocalityLb(enabled=True)),
        outlier_detection=OutlierDetection(consecutive_5xx=5, interval=10.0),
    )
    with shard.batch():
        hosts = [Hostname(f"s{i}.test") for i in range(5)]
        shard.replace(
            [
                Service(h, ports=(Port(8080, "http", PortProtocol.HTTP),), endpoints=tuple(
                    Endpoint(f"10.0.{i}.{e + 1}", locality=Locality("r1", zones[e])) for e in range(3)))
                for i, h in enumerate(hosts)
            ]
        )  # fmt: skip
        for h in hosts:
            shard.set_policy(h, HostPolicy(DestinationRule(h, "default", "r", traffic)))
    shard.mark_synced()
    builder = Builder(BuildOptions(locality_variants=10))
    view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
    assert len(view.localized) == 5
    for _ in range(3):
        for zone in zones:
            for r in view.resources[ENDPOINT].values():
                view.localize(r, Client("r1", zone))
    assert builder.variants is not None and builder.variants.builds == 15
