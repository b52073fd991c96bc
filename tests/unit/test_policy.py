"""DestinationRule / VirtualService: validation (located problems), index merge by host, xDS resources."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from adapters.files import FilesConfig, FilesRegistry
from adapters.files.registry import FileSet
from adapters.istio.policy import read_yaml_all, resolve_host
from discoveryd.index import Index, diff
from discoveryd.model import Hostname, Problem, Severity, SourceId
from discoveryd.policy import DestinationRule, HostPolicy, Subset, TrafficPolicy
from discoveryd.registry import AdapterContext
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, ENDPOINT, LISTENER, ROUTE, Builder, BuildOptions
from tests.fakes.policy import DR, HOST, SERVICE, VS, built, policy_of, read_policies
from tests.fakes.policy import problems_of as read_problems
from tests.helpers import eventually


def problems_of(text: str) -> list[Problem]:
    return read_problems(textwrap.dedent(text))


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "where", "field", "message"),
    [
        (
            "  host: a.b\n  subsets: [{name: v1}, {name: v1}]\n",
            "p.yaml:6",
            "spec.subsets[1].name",
            "duplicate subset 'v1'",
        ),
        ("  host: a.b\n  subsets: [{name: V_1}]\n", "p.yaml:6", "spec.subsets[0].name", "invalid subset name"),
        (
            "  host: a.b\n  trafficPolicy: {outlierDetection: {interval: 5}}\n",
            "p.yaml:6",
            "spec.trafficPolicy.outlierDetection.interval",
            "must be a duration",
        ),
        (
            "  host: a.b\n  trafficPolicy:\n    loadBalancer:\n"
            "      consistentHash: {httpHeaderName: x, useSourceIp: true}\n",
            "p.yaml:8",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "exactly one of",
        ),
        (
            "  host: a.b\n  trafficPolicy: {loadBalancr: {simple: RANDOM}}\n",
            "p.yaml:6",
            "spec.trafficPolicy.loadBalancr",
            "did you mean 'loadBalancer'",
        ),
        ("  host: a.b\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n", "p.yaml:6", "", "unknown value"),
        ("  subsets: []\n", "p.yaml:4", "spec.host", "a host is required"),
        (
            "  host: a.b\n  trafficPolicy:\n    loadBalancer:\n"
            "      consistentHash: {httpHeaderName: x, maglev: {tableSize: 65536}}\n",
            "p.yaml:8",
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "must be a prime number",
        ),
    ],
)
def test_destination_rule_problems_are_located(spec: str, where: str, field: str, message: str) -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n" + spec
    found = problems_of(text)
    assert len(found) == 1, found
    assert found[0].where == where
    assert found[0].field.startswith(field)
    assert message in found[0].message


def test_route_weights_must_sum_to_100() -> None:
    found = problems_of(VS.replace("weight: 20", "weight: 30"))
    assert [(p.where, p.field) for p in found] == [("p.yaml:15", "spec.http[1].route")]
    assert "sum to 100, not 110" in found[0].message


def test_unknown_subset_is_warned_at_the_route() -> None:
    found = problems_of(DR + "---\n" + VS.replace("subset: v1}", "subset: v9}"))
    assert len(found) == 1
    assert found[0].where.startswith("p.yaml:")
    assert found[0].field == "spec.http[1].route[0].destination.subset"
    assert "'v9'" in found[0].message and found[0].severity is Severity.WARNING


def test_rules_of_other_namespaces_are_kept_and_selected_per_client_namespace() -> None:
    """A rule of another namespace is no conflict (the same namespace's rules are merged: test_policy_merge):
    Istio looks in the client's namespace first, then the service's, then the root namespace."""
    other = DR.replace("name: cart, namespace: shop", "name: cart2, namespace: other").replace(
        "LEAST_REQUEST", "RANDOM"
    )
    policies = read_policies(DR + "---\n" + other)
    assert policies.problems() == {}
    policy = policies.policies[HOST]
    assert [r.name for r in policy.rules] == ["cart", "cart2"]

    def seen(namespace: str | None) -> str:
        rule = policy.select(namespace, "shop", "istio-system").destination_rule
        assert rule is not None
        return rule.name

    assert (seen(None), seen("shop"), seen("other"), seen("elsewhere")) == ("cart", "cart", "cart2", "cart")


def test_short_hosts_resolve_in_the_object_namespace() -> None:
    assert resolve_host("reviews", "shop") == "reviews.shop.svc.cluster.local"
    assert resolve_host("Reviews.Other.", "shop") == "reviews.other"
    text = DR.replace("host: cart.shop.internal", "host: reviews")
    objects, _ = read_yaml_all("p.yaml", text, "default")
    rule = objects[0]
    assert isinstance(rule, DestinationRule) and rule.host == "reviews.shop.svc.cluster.local"


def test_short_hosts_resolve_under_the_registrys_domain(tmp_path: Path) -> None:
    """A files registry with `domain: corp.example` resolves a rule's and a route destination's short host
    under it, in the object's namespace; a dotted host is taken as written."""
    config = FilesConfig.model_validate({"kind": "files", "name": "t", "paths": ["."], "domain": "Corp.Example."})
    assert config.domain == "corp.example"
    with pytest.raises(ValueError, match="not a DNS name"):
        FilesConfig.model_validate({"kind": "files", "name": "t", "paths": ["."], "domain": "bad_domain!"})
    (tmp_path / "p.yaml").write_text(
        DR.replace("host: cart.shop.internal", "host: reviews")
        + textwrap.dedent(
            """\
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews, namespace: shop}
            spec:
              hosts: [reviews]
              http:
              - route: [{destination: {host: ratings}}]
            """
        )
    )
    files = FileSet([tmp_path], "default", domain=config.domain)
    files.refresh()
    assert files.problems() == {}
    reviews = Hostname("reviews.shop.svc.corp.example")
    policy = files.policies[reviews]
    assert policy.destination_rule is not None and policy.virtual_service is not None
    assert policy.virtual_service.hosts == (reviews,)
    assert policy.virtual_service.http[0].destinations[0].host == "ratings.shop.svc.corp.example"
    assert resolve_host("reviews", "shop", "corp.example") == reviews


def test_a_broken_file_keeps_its_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(DR)
    files = FileSet([tmp_path], "default")
    files.refresh()
    assert files.take_policy_changed() == {HOST}
    good = files.policies[HOST]
    path.write_text(DR.replace("consecutive5xxErrors: 3", "consecutive5xxErrors: -3"))
    files.refresh()
    assert files.policies[HOST] is good
    assert files.take_policy_changed() == set()
    (problem,) = files.problems()[str(path)]
    assert problem.field == "spec.trafficPolicy.outlierDetection.consecutive5xxErrors"
    assert problem.where == f"{path}:9"
    path.write_text(DR.replace("consecutive5xxErrors: 3", "consecutive5xxErrors: 4"))
    files.refresh()
    assert files.take_policy_changed() == {HOST}
    assert files.problems() == {}


# -- index ------------------------------------------------------------------------------------------

A, B = SourceId("kubernetes/c1"), SourceId("files/local")


def test_a_policy_applies_to_the_host_whatever_registry_serves_it_and_the_ranking_picks_one() -> None:
    index = Index([A, B])
    services, policies = index.writer(A), index.writer(B)
    services.upsert(SERVICE)
    version = index.snapshot.version
    rule = DestinationRule(HOST, "shop", "r", subsets=(Subset("v1", {"version": "v1"}),))
    policies.set_policy(HOST, HostPolicy(rule))
    snap = index.snapshot
    assert snap.version == version + 1 and snap.changed == {HOST}
    assert snap.policies[HOST].destination_rule is rule
    assert HOST not in snap.services or snap.services[HOST].source == A

    ranked = DestinationRule(HOST, "shop", "first", traffic_policy=TrafficPolicy())
    services.set_policy(HOST, HostPolicy(ranked))
    assert index.snapshot.policies[HOST].destination_rule is ranked  # A ranks before B
    services.set_policy(HOST, None)
    assert index.snapshot.policies[HOST].destination_rule is rule
    services.set_policy(HOST, HostPolicy(ranked))
    index.set_order([B, A])  # a config reload ranks the files registry first now
    assert index.snapshot.policies[HOST].destination_rule is rule
    assert HOST in index.snapshot.changed
    index.drop(B)
    assert index.snapshot.policies[HOST].destination_rule is ranked
    services.set_policy(HOST, None)
    assert HOST not in index.snapshot.policies
    assert HOST in index.snapshot.changed


def test_policies_written_in_a_batch_publish_once_with_the_services() -> None:
    index = Index([A])
    shard = index.writer(A)
    version = index.snapshot.version
    with shard.batch():
        shard.upsert(SERVICE)
        shard.set_policy(HOST, HostPolicy(DestinationRule(HOST, "shop", "r")))
        assert index.snapshot.version == version
    assert index.snapshot.version == version + 1
    assert HOST in index.snapshot.policies


# -- xDS --------------------------------------------------------------------------------------------


def test_subsets_become_clusters_whose_endpoints_match_the_labels() -> None:
    out = built(policy_of(DR))
    for subset, addresses in (("v1", {"10.0.0.1", "10.0.0.3"}), ("v2", {"10.0.0.2"})):
        name = f"outbound|8080|{subset}|{HOST}"
        cluster = out[(CLUSTER, name)]
        assert isinstance(cluster, cluster_pb2.Cluster)
        assert cluster.eds_cluster_config.service_name == name
        cla = out[(ENDPOINT, name)]
        assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
        got = {e.endpoint.address.socket_address.address for g in cla.endpoints for e in g.lb_endpoints}
        assert got == addresses
    plain = out[(ENDPOINT, f"outbound|8080||{HOST}")]
    assert isinstance(plain, endpoint_pb2.ClusterLoadAssignment)
    assert sum(len(g.lb_endpoints) for g in plain.endpoints) == 3
    assert built(None).keys() < out.keys()


def test_traffic_policy_levels_shape_each_cluster() -> None:
    out = built(policy_of(DR))
    c = out[(CLUSTER, f"outbound|8080|v1|{HOST}")]
    assert isinstance(c, cluster_pb2.Cluster)
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (3, 100)
    assert (od.consecutive_gateway_failure.value, od.enforcing_consecutive_gateway_failure.value) == (2, 100)
    assert (od.interval.seconds, od.base_ejection_time.seconds, od.max_ejection_percent.value) == (2, 30, 50)
    assert c.common_lb_config.healthy_panic_threshold.value == 20
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value) == (
        7, 11, 13, 2,
    )  # fmt: skip
    assert c.connect_timeout.nanos == 250_000_000
    keep = c.upstream_connection_options.tcp_keepalive
    assert (keep.keepalive_probes.value, keep.keepalive_time.value, keep.keepalive_interval.value) == (3, 60, 10)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")  # the gRPC port keeps HTTP/2
    assert options.common_http_protocol_options.max_requests_per_connection.value == 5
    assert options.common_http_protocol_options.idle_timeout.seconds == 90
    assert not c.HasField("transport_socket")

    v2 = out[(CLUSTER, f"outbound|8080|v2|{HOST}")]
    assert isinstance(v2, cluster_pb2.Cluster)
    assert v2.lb_policy == cluster_pb2.Cluster.MAGLEV and v2.maglev_lb_config.table_size.value == 65537
    assert v2.outlier_detection.consecutive_5xx.value == 3  # inherited from the top level

    tls_cluster = out[(CLUSTER, f"outbound|9090|v1|{HOST}")]
    assert isinstance(tls_cluster, cluster_pb2.Cluster)
    ctx = tls_pb2.UpstreamTlsContext()
    assert tls_cluster.transport_socket.name == "envoy.transport_sockets.tls"
    tls_cluster.transport_socket.typed_config.Unpack(ctx)
    assert ctx.sni == "cart.example"
    (cert,) = ctx.common_tls_context.tls_certificates
    assert (cert.certificate_chain.filename, cert.private_key.filename) == ("/certs/c.pem", "/certs/k.pem")
    validation = ctx.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/certs/ca.pem"
    assert [m.matcher.exact for m in validation.match_typed_subject_alt_names] == ["cart.example"]


def test_virtual_service_routes_become_the_route_configuration() -> None:
    out = built(policy_of(DR + "---\n" + VS))
    rc = out[(ROUTE, f"{HOST}:8080")]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    (vhost,) = rc.virtual_hosts
    first, second, split = vhost.routes
    assert first.match.path == "/a"
    assert [(h.name, h.string_match.exact) for h in first.match.headers] == [(":method", "POST")]
    assert second.match.prefix == "" and second.match.headers[0].string_match.safe_regex.regex == "y.*"
    for r in (first, second):
        assert r.route.cluster == f"outbound|8080|v2|{HOST}"
        assert r.route.timeout.seconds == 3 and r.route.max_stream_duration.max_stream_duration.seconds == 3
        assert r.route.retry_policy.num_retries.value == 4 and r.route.retry_policy.retry_on == "unavailable"
        assert r.route.retry_policy.per_try_timeout.seconds == 1
        assert r.route.hash_policy[0].header.header_name == "x-user"  # v2's consistent hash
        assert "envoy.filters.http.fault" in r.typed_per_filter_config
    weighted = [(c.name, c.weight.value) for c in split.route.weighted_clusters.clusters]
    assert weighted == [(f"outbound|8080|v1|{HOST}", 80), (f"outbound|8080|v2|{HOST}", 20)]
    listener = out[(LISTENER, f"{HOST}:8080")]
    assert isinstance(listener, listener_pb2.Listener)
    manager = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]


# -- the files registry end to end -------------------------------------------------------------------


async def test_files_registry_publishes_policies_for_a_host_served_elsewhere(tmp_path: Path) -> None:
    """A DestinationRule file reaches the index and the xDS resources of a host another registry serves."""
    (tmp_path / "rules").mkdir()
    path = tmp_path / "rules" / "cart.yaml"
    path.write_text(DR)
    files = FilesRegistry(FilesConfig(kind="files", name="local", paths=["rules"]), AdapterContext(tmp_path))
    index = Index([A, files.source])
    index.writer(A).upsert(SERVICE)
    task = asyncio.create_task(files.run(index.writer(files.source)))
    try:
        await eventually(lambda: HOST in index.snapshot.policies, timeout=5, what="the policy in the index")
        view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
        assert f"outbound|8080|v2|{HOST}" in view.resources[CLUSTER]
        path.write_text(DR.replace("name: v2", "name: v3"))
        await eventually(
            lambda: (r := index.snapshot.policies[HOST].destination_rule) is not None and r.subset("v3") is not None,
            timeout=5,
            what="the edited rule",
        )
        assert HOST in index.snapshot.changed
        path.unlink()
        await eventually(lambda: HOST not in index.snapshot.policies, timeout=5, what="the rule removed")
        assert index.snapshot.services[HOST].source == A
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_zero_retry_attempts_mean_no_retry_policy() -> None:
    """gRPC rejects a whole RouteConfiguration whose retry_policy has num_retries 0; Istio's 0 means no retries."""
    out = built(policy_of(DR + "---\n" + VS.replace("attempts: 4", "attempts: 0")))
    rc = out[(ROUTE, f"{HOST}:8080")]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    assert not any(r.route.HasField("retry_policy") for r in rc.virtual_hosts[0].routes)


def test_regexes_rejected_by_re2_are_problems() -> None:
    found = problems_of(VS.replace('regex: "y.*"', 'regex: "(?=y)y"'))
    assert [p.field for p in found] == ['spec.http[0].match[1].headers["x-canary"].regex']
    assert "RE2" in found[0].message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("  workloadSelector: {matchLabels: {app: a}}\n", "spec.workloadSelector"),
        ("  trafficPolicy: {outlierDetection: {splitExternalLocalOriginErrors: true}}\n",
         "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors"),
        ("  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 1s}}}\n",
         "spec.trafficPolicy.connectionPool.tcp.idleTimeout"),
    ],
)  # fmt: skip
def test_fields_istio_has_but_not_served_are_reported_not_dropped(extra: str, field: str) -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: a.b\n"
    (found,) = problems_of(text + extra)
    assert found.field == field and found.where == "p.yaml:6"


@pytest.mark.parametrize(
    ("export_to", "field", "message"),
    [
        ("['~']", "spec.exportTo[0]", "ServiceEntries only"),
        ("['*', a]", "spec.exportTo", "cannot be combined"),
        ("[a, a]", "spec.exportTo[1]", "duplicate"),
        ("[., shop]", "spec.exportTo", "own namespace"),
        ("[Not_A_Namespace]", "spec.exportTo[0]", "namespace name"),
    ],
)
def test_rule_export_to_is_validated_as_istio_does(export_to: str, field: str, message: str) -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: shop}\n"
    text += f"spec:\n  hosts: [a.b]\n  exportTo: {export_to}\n  http: [{{route: [{{destination: {{host: a.b}}}}]}}]\n"
    (found,) = problems_of(text)
    assert found.field == field and message in found.message


def test_rule_export_to_is_read() -> None:
    objects, problems = read_yaml_all("p.yaml", DR.replace("spec:\n", "spec:\n  exportTo: [., other]\n", 1), "default")
    assert problems == []
    (rule,) = objects
    assert isinstance(rule, DestinationRule) and rule.export_to == (".", "other")


def test_diff_without_history_names_hosts_whose_policy_changed() -> None:
    """The servers fall back to `diff` when the index history no longer reaches their last version:
    a policy change in that window must be in it, or its clusters are never rebuilt."""
    index = Index([A, B])
    services, policies = index.writer(A), index.writer(B)
    services.upsert(SERVICE)
    before = index.snapshot
    policies.set_policy(HOST, HostPolicy(DestinationRule(HOST, "shop", "r", subsets=(Subset("v1", {"v": "1"}),))))
    after_set = index.snapshot
    assert diff(before, after_set) == {HOST} == index.changed_between(before.version, after_set.version)
    policies.set_policy(HOST, None)
    assert diff(after_set, index.snapshot) == {HOST}
    assert diff(before, index.snapshot) == frozenset()  # back to the same world: nothing to rebuild
