"""Several DestinationRules for one host in one namespace are merged as Istio merges them."""

from __future__ import annotations

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, Severity
from discoveryd.policy import SimpleLb
from discoveryd.xds.resources import CLUSTER, Builder, BuildOptions
from tests.fakes.policy import VS_HEAD

HOST = Hostname("cart.shop.internal")

FIRST = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart-v1, namespace: shop}
spec:
  host: cart.shop.internal
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
"""

SECOND = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart-v2, namespace: shop}
spec:
  host: cart
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v2, labels: {version: v2}}
  - {name: v1, labels: {version: old}}
"""


def merged(files: dict[str, str]) -> PolicySet:
    policies = PolicySet()
    for name, text in files.items():
        objects, problems = read_yaml_all(name, text, "default")
        assert problems == []
        policies.update(name, objects)
    policies.build()
    return policies


def test_rules_of_one_namespace_merge_subsets_and_the_first_traffic_policy_wins() -> None:
    # The short host `cart` of the second rule resolves to another name; the FQDN is what Istio merges on.
    policies = merged({"a.yaml": FIRST, "b.yaml": SECOND.replace("host: cart\n", "host: cart.shop.internal\n")})
    rule = policies.policies[HOST].destination_rule
    assert rule is not None and rule.name == "cart-v1" and rule.where == "a.yaml:3"
    assert [(s.name, dict(s.labels)) for s in rule.subsets] == [("v1", {"version": "v1"}), ("v2", {"version": "v2"})]
    assert rule.traffic_policy is not None and rule.traffic_policy.load_balancer is not None
    assert rule.traffic_policy.load_balancer.simple is SimpleLb.LEAST_REQUEST
    duplicate, policy = policies.problems()["b.yaml"]
    assert duplicate.where == "b.yaml:3" and duplicate.field == "spec.subsets[1].name"
    assert "'v1'" in duplicate.message and "shop/cart-v1 at a.yaml:3" in duplicate.message
    assert duplicate.severity is Severity.WARNING and str(duplicate).count("warning: ") == 1
    assert policy.field == "spec.trafficPolicy" and "shop/cart-v1 at a.yaml:3" in policy.message
    assert "a.yaml" not in policies.problems()

    service = Service(
        hostname=HOST,
        namespace="shop",
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=(Endpoint("10.0.0.1", labels={"version": "v1"}), Endpoint("10.0.0.2", labels={"version": "v2"})),
    )
    clusters = {n for t, n, _ in Builder(BuildOptions()).build(service, policies.policies[HOST]) if t == CLUSTER}
    assert clusters == {f"outbound|8080||{HOST}", f"outbound|8080|v1|{HOST}", f"outbound|8080|v2|{HOST}"}


def test_a_later_rule_s_traffic_policy_applies_when_the_first_has_none() -> None:
    first = FIRST.replace("  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n", "")
    policies = merged({"a.yaml": first, "b.yaml": SECOND.replace("host: cart\n", "host: cart.shop.internal\n")})
    rule = policies.policies[HOST].destination_rule
    assert rule is not None and rule.traffic_policy is not None and rule.traffic_policy.load_balancer is not None
    assert rule.traffic_policy.load_balancer.simple is SimpleLb.RANDOM
    assert [p.field for p in policies.problems()["b.yaml"]] == ["spec.subsets[1].name"]


def test_a_route_may_name_a_subset_of_the_later_rule() -> None:
    vs = VS_HEAD + "  http:\n  - route: [{destination: {host: cart.shop.internal, subset: v2}}]\n"
    second = SECOND.replace("host: cart\n", "host: cart.shop.internal\n")
    policies = merged({"a.yaml": FIRST, "b.yaml": second, "c.yaml": vs})
    assert "c.yaml" not in policies.problems()
