"""Rules of one host from several sources (two registries, or two parts of one) are combined, as Istio combines
the rules of all its config sources: every client namespace picks among all of them; a tie goes to the
higher-ranked source."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.policy import HostPolicy
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, Builder, BuildOptions, View
from tests.fakes.policy import read_policies, rule_text

HOST = Hostname("cart.shop.internal")
NAME = "outbound|8080||cart.shop.internal"
FILES, KUBE = SourceId("files/local"), SourceId("kubernetes/main")
RR, LR, RANDOM = cluster_pb2.Cluster.ROUND_ROBIN, cluster_pb2.Cluster.LEAST_REQUEST, cluster_pb2.Cluster.RANDOM


def rule(name: str, namespace: str, lb: str, export_to: str = "") -> HostPolicy:
    return read_policies(rule_text(name, namespace, lb, export_to), file=f"{name}.yaml").policies[HOST]


def two_sources() -> Index:
    index = Index([FILES, KUBE])
    svc = Service(
        HOST, namespace="shop", ports=(Port(8080, "http", PortProtocol.HTTP),), endpoints=(Endpoint("10.0.0.1"),)
    )
    for source in (FILES, KUBE):
        shard = index.writer(source)
        shard.upsert(svc)
        shard.mark_synced()
    return index


def view_of(index: Index) -> View:
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    return view


def lb(view: View, namespace: str | None) -> int:
    r = view.get(CLUSTER, NAME, namespace)
    assert r is not None
    return cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(r.body).value).lb_policy


def test_the_rules_of_both_sources_are_selected_per_client_namespace() -> None:
    """The higher-ranked source has a rule private to namespace web, the other the service's own rule: web's
    clients get the first, everyone else the second (not nothing, as when the first source's policy hid it)."""
    index = two_sources()
    index.writer(FILES).set_policy(HOST, rule("cart-web", "web", "LEAST_REQUEST", export_to="[.]"))
    index.writer(KUBE).set_policy(HOST, rule("cart", "shop", "RANDOM"))
    policy = index.snapshot.policies[HOST]
    assert [r.name for r in policy.rules] == ["cart-web", "cart"]
    view = view_of(index)
    assert lb(view, "web") == LR
    assert lb(view, "other") == RANDOM and lb(view, None) == RANDOM


def test_between_equal_rules_the_higher_ranked_source_wins() -> None:
    index = two_sources()
    index.writer(KUBE).set_policy(HOST, rule("cart-kube", "shop", "RANDOM"))
    index.writer(FILES).set_policy(HOST, rule("cart-files", "shop", "LEAST_REQUEST"))
    assert [r.name for r in index.snapshot.policies[HOST].rules] == ["cart-files", "cart-kube"]
    assert lb(view_of(index), "other") == LR
    # the higher-ranked source's rule goes: the other's applies
    index.writer(FILES).set_policy(HOST, None)
    assert [r.name for r in index.snapshot.policies[HOST].rules] == ["cart-kube"]
    assert lb(view_of(index), "other") == RANDOM


def test_an_unchanged_combination_keeps_its_object() -> None:
    """Re-ranked (the registry order changed but not for these two), the combination is equal: the very same
    object, so the servers see no change of it."""
    index = two_sources()
    index.writer(FILES).set_policy(HOST, rule("cart-web", "web", "LEAST_REQUEST", export_to="[.]"))
    index.writer(KUBE).set_policy(HOST, rule("cart", "shop", "RANDOM"))
    before = index.snapshot
    index.set_order([FILES, KUBE, SourceId("consul/dc1")])
    assert index.snapshot.policies[HOST] is before.policies[HOST]
