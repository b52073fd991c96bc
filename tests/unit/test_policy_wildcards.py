"""Wildcard hosts of DestinationRules and VirtualServices (`*.example.com`, `*`) apply to the service hostnames
they match, the most specific first, as Istio applies them; a change of a wildcard rule rebuilds only the hosts it
matches, and a service finds its rules by its name's parent domains."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.index import Snapshot
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Problem, Service
from discoveryd.policy import HostPolicy, HostTree, wildcard_keys
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, ROUTE, Builder, BuildOptions, View


def rule(host: str, lb: str, namespace: str = "shop", name: str = "", export_to: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name or "r-" + lb.lower().replace("_", "-")}, namespace: {namespace}}}
spec:
  host: "{host}"
  {f"exportTo: {export_to}" if export_to else ""}
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
"""


def route(hosts: str, timeout: str, name: str = "", namespace: str = "shop") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name or "vs-" + timeout}, namespace: {namespace}}}
spec:
  hosts: {hosts}
  http: [{{timeout: {timeout}, route: [{{destination: {{host: backend.shop.internal}}}}]}}]
"""


def read(*docs: str) -> tuple[dict[Hostname, HostPolicy], list[Problem]]:
    objects, problems = read_yaml_all("p.yaml", "\n---\n".join(docs), "default")
    if problems:
        return {}, problems
    policies = PolicySet()
    policies.update("p.yaml", objects)
    policies.build()
    return dict(policies.policies), [p for ps in policies.problems().values() for p in ps]


def policies_of(*docs: str) -> dict[Hostname, HostPolicy]:
    out, problems = read(*docs)
    assert not problems, problems
    return out


def service(host: str, namespace: str = "shop") -> Service:
    return Service(
        Hostname(host),
        namespace=namespace,
        ports=(Port(8080, "grpc", PortProtocol.GRPC),),
        endpoints=(Endpoint("10.0.0.1"),),
    )


HOSTS = ("a.example.com", "b.c.example.com", "example.com", "a.other.org")


def snapshot(version: int, policies: dict[Hostname, HostPolicy], hosts: tuple[str, ...] = HOSTS) -> Snapshot:
    return Snapshot(version=version, services={Hostname(h): service(h) for h in hosts}, policies=policies)


def lb(view: View, host: str, namespace: str | None = None) -> int:
    r = view.get(CLUSTER, f"outbound|8080||{host}", namespace)
    assert r is not None
    c = cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(r.body).value)
    return c.lb_policy


def timeout(view: View, host: str) -> float | None:
    r = view.resources[ROUTE][f"{host}:8080"]
    rc = route_pb2.RouteConfiguration.FromString(any_pb2.Any.FromString(r.body).value)
    action = rc.virtual_hosts[0].routes[0].route
    return action.timeout.seconds if action.HasField("timeout") else None


RR, LR, RANDOM = cluster_pb2.Cluster.ROUND_ROBIN, cluster_pb2.Cluster.LEAST_REQUEST, cluster_pb2.Cluster.RANDOM


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["foo.*.example.com", "*foo.example.com", "example.*", "*.", "**.example.com"])
def test_a_wildcard_is_only_the_whole_first_label(host: str) -> None:
    _, problems = read(rule(host, "RANDOM"))
    assert len(problems) == 1 and problems[0].field == "spec.host", problems
    assert "wildcard must be the whole first label" in problems[0].message
    _, problems = read(route(f'["{host}"]', "5s"))
    assert len(problems) == 1 and problems[0].field == "spec.hosts[0]", problems


@pytest.mark.parametrize("host", ["*.example.com", "*", "*.com"])
def test_wildcard_hosts_istio_accepts(host: str) -> None:
    assert Hostname(host) in policies_of(rule(host, "RANDOM"), route(f'["{host}"]', "5s"))


def test_a_route_to_a_subset_of_a_wildcard_rule_is_not_warned_about() -> None:
    wild = rule("*.shop.internal", "RANDOM") + "  subsets: [{name: v1, labels: {v: '1'}}]\n"
    vs = route("[cart.shop.internal]", "5s").replace(
        "host: backend.shop.internal", "host: backend.shop.internal, subset: v1"
    )
    policies_of(wild, vs)


# -- lookup ----------------------------------------------------------------------------------------


def test_wildcard_keys_are_the_parent_domains_most_specific_first() -> None:
    assert wildcard_keys(Hostname("a.b.example.com")) == ["*.b.example.com", "*.example.com", "*.com", "*"]
    assert wildcard_keys(Hostname("*.example.com")) == ["*.com", "*"]
    assert wildcard_keys(Hostname("localhost")) == ["*"]
    assert wildcard_keys(Hostname("*")) == []


def test_the_host_tree_finds_the_names_under_a_domain_and_forgets_empty_domains() -> None:
    tree = HostTree(Hostname(h) for h in (*HOSTS, "x.y.c.example.com", "localhost"))
    assert sorted(tree.matching(Hostname("*.example.com"))) == ["a.example.com", "b.c.example.com", "x.y.c.example.com"]
    assert sorted(tree.matching(Hostname("*.c.example.com"))) == ["b.c.example.com", "x.y.c.example.com"]
    assert len(tree.matching(Hostname("*"))) == 6 and tree.matching(Hostname("*.net")) == []
    for h in (*HOSTS, "x.y.c.example.com", "localhost"):
        tree.discard(Hostname(h))
    assert len(tree) == 0 and not tree._subdomains and not tree._hosts


def test_a_wildcard_rule_applies_to_the_names_it_matches() -> None:
    view, _ = Builder(BuildOptions()).update(
        EMPTY_VIEW, snapshot(1, policies_of(rule("*.example.com", "RANDOM"))), None
    )
    assert lb(view, "a.example.com") == RANDOM and lb(view, "b.c.example.com") == RANDOM
    assert lb(view, "example.com") == RR and lb(view, "a.other.org") == RR


def test_the_most_specific_rule_wins() -> None:
    policies = policies_of(
        rule("*", "LEAST_REQUEST"),
        rule("*.example.com", "RANDOM"),
        rule("*.c.example.com", "ROUND_ROBIN", name="c"),
        rule("a.example.com", "ROUND_ROBIN", name="a"),
    )
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, snapshot(1, policies), None)
    assert lb(view, "a.example.com") == RR  # exact over every wildcard
    assert lb(view, "b.c.example.com") == RR  # *.c.example.com over *.example.com and *
    assert lb(view, "example.com") == LR and lb(view, "a.other.org") == LR  # only * matches them


def test_a_wildcard_rule_of_the_client_s_namespace_comes_before_the_service_s_exact_rule() -> None:
    """Istio looks in the client's namespace first, then the service's, the most specific host within each."""
    policies = policies_of(
        rule("a.example.com", "LEAST_REQUEST", namespace="shop"),
        rule("*.example.com", "RANDOM", namespace="web", export_to="[.]"),
    )
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, snapshot(1, policies), None)
    assert lb(view, "a.example.com", "web") == RANDOM and lb(view, "a.example.com", "other") == LR
    assert lb(view, "b.c.example.com", "web") == RANDOM and lb(view, "b.c.example.com", "other") == RR


def test_a_wildcard_virtual_service_routes_the_names_it_matches_the_exact_one_first() -> None:
    policies = policies_of(route('["*.example.com"]', "5s"), route("[a.example.com]", "7s"), route('["*"]', "9s"))
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, snapshot(1, policies), None)
    assert timeout(view, "a.example.com") == 7
    assert timeout(view, "b.c.example.com") == 5
    assert timeout(view, "a.other.org") == 9


# -- O(changed) ------------------------------------------------------------------------------------


class Counting(Builder):
    def __init__(self) -> None:
        super().__init__(BuildOptions())
        self.built: list[str] = []

    def build(self, service: Service, policy: HostPolicy | None = None) -> list:  # type: ignore[type-arg]
        self.built.append(service.hostname)
        return super().build(service, policy)


def test_a_wildcard_rule_change_rebuilds_the_hosts_it_matches_only() -> None:
    builder = Counting()
    hosts = (*HOSTS, *(f"s{i}.other.org" for i in range(50)))
    v1, _ = builder.update(EMPTY_VIEW, snapshot(1, {}, hosts), None)
    wild = policies_of(rule("*.example.com", "RANDOM"))
    builder.built.clear()
    v2, changes = builder.update(v1, snapshot(2, wild, hosts), {Hostname("*.example.com")})
    assert sorted(builder.built) == ["a.example.com", "b.c.example.com"]
    assert changes[CLUSTER] == {"outbound|8080||a.example.com", "outbound|8080||b.c.example.com"}
    assert lb(v2, "a.example.com") == RANDOM
    # a new service under the domain finds the rule by its parent domains
    builder.built.clear()
    v3, _ = builder.update(v2, snapshot(3, wild, (*hosts, "new.example.com")), {Hostname("new.example.com")})
    assert builder.built == ["new.example.com"] and lb(v3, "new.example.com") == RANDOM
    # another wildcard rule's change: only its own hosts again
    builder.built.clear()
    both = {**wild, **policies_of(rule("*.c.example.com", "LEAST_REQUEST"))}
    v4, _ = builder.update(v3, snapshot(4, both, (*hosts, "new.example.com")), {Hostname("*.c.example.com")})
    assert builder.built == ["b.c.example.com"] and lb(v4, "b.c.example.com") == LR
    # removed: the hosts it matched go back to what is left
    builder.built.clear()
    v5, _ = builder.update(
        v4, snapshot(5, {}, (*hosts, "new.example.com")), {Hostname("*.example.com"), Hostname("*.c.example.com")}
    )
    assert sorted(builder.built) == ["a.example.com", "b.c.example.com", "new.example.com"]
    assert lb(v5, "a.example.com") == RR and lb(v5, "b.c.example.com") == RR
    assert builder._tree is None  # no wildcard rule left: no tree kept
