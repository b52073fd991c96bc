"""xDS protocol rules, one hand-driven stream test each, state of the world and delta.

"No response" is never checked by waiting: a test provokes a later response it
can predict (an index change, a new subscription) and asserts that this is
the very next one on the stream.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2

from discoveryd.model import PortProtocol
from discoveryd.xds.connection import Connection
from discoveryd.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.fakes.xds import (  # noqa: F401 - fixtures
    RunningXds,
    Stream,
    channel,
    cluster,
    endpoints_of,
    names,
    service,
    xds,
)
from tests.helpers import eventually

A, B, C = "a.test", "b.test", "c.test"


def only_conn(xds: RunningXds) -> Connection:
    conns = xds.server.connections
    assert len(conns) == 1, conns
    return conns[0]


def counter(metric: object, short: str) -> float:
    return float(metric.labels(short)._value.get())  # type: ignore[attr-defined]


async def processed(xds: RunningXds, type_url: str, check: object) -> None:
    """Wait until the server has applied a request: `check(TypeState)` is true."""
    await eventually(lambda: check(only_conn(xds).types[type_url]), what="request processed")  # type: ignore[operator]


# -- nonces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_every_response_has_a_fresh_nonce(xds: RunningXds, channel: grpc.aio.Channel, delta: bool) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    await s.send(CLUSTER)
    seen = []
    for i in range(2, 6):
        r = await s.recv()
        seen.append(r.nonce)
        await s.ack(r)
        xds.put(service(A, "10.0.0.1", port=8080 + i))
    seen.append((await s.recv()).nonce)
    assert all(seen) and len(set(seen)) == len(seen)
    await s.close()


async def test_sotw_stale_nonce_is_ignored(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel)
    await s.send(ENDPOINT, resource_names=[cluster(A)])
    first = await s.recv()
    await s.ack(first, [cluster(A)])
    xds.put(service(A, "10.0.0.3"), service(B, "10.0.0.2"))
    second = await s.recv()
    assert endpoints_of(second) == {cluster(A): ["10.0.0.3:8080"]}
    before = counter(xds.server.metrics.stale_nonces, "EDS")
    # Answers `first`, not the latest response: must change nothing, including the subscription.
    await s.send(
        ENDPOINT, version_info=first.version_info, response_nonce=first.nonce, resource_names=[cluster(A), cluster(B)]
    )
    await eventually(lambda: counter(xds.server.metrics.stale_nonces, "EDS") > before)
    assert only_conn(xds).types[ENDPOINT].names == {cluster(A)}
    xds.put(service(A, "10.0.0.4"), service(B, "10.0.0.2"))
    third = await s.recv()
    assert endpoints_of(third) == {cluster(A): ["10.0.0.4:8080"]}
    # The same subscription with the current nonce is honoured.
    await s.ack(third, [cluster(A), cluster(B)])
    fourth = await s.recv()
    assert names(fourth) == [cluster(B)]
    await s.close()


async def test_delta_stale_nonce_still_subscribes_but_does_not_ack(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(ENDPOINT, resource_names_subscribe=[cluster(A)])
    first = await s.recv()
    xds.put(service(A, "10.0.0.3"), service(B, "10.0.0.2"))
    second = await s.recv()
    assert endpoints_of(second) == {cluster(A): ["10.0.0.3:8080"]}
    await s.send(ENDPOINT, response_nonce=first.nonce, resource_names_subscribe=[cluster(B)])
    third = await s.recv()
    assert names(third) == [cluster(B)]
    state = only_conn(xds).types[ENDPOINT]
    assert state.acked_nonce == "", "a stale nonce must not count as an ACK"
    await s.close()


# -- NACK and ACK ----------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nack_is_recorded_and_not_answered(xds: RunningXds, channel: grpc.aio.Channel, delta: bool) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    await s.send(CLUSTER)
    first = await s.recv()
    nacks = counter(xds.server.metrics.nacks, "CDS")
    error = status_pb2.Status(code=3, message="cluster outbound|8080||a.test: bad thing")
    if delta:
        await s.send(CLUSTER, response_nonce=first.nonce, error_detail=error)
    else:
        await s.send(CLUSTER, version_info="", response_nonce=first.nonce, error_detail=error)
    await processed(xds, CLUSTER, lambda st: st.nack is not None)
    assert counter(xds.server.metrics.nacks, "CDS") == nacks + 1
    cds = xds.server.syncz()["connections"][0]["types"]["CDS"]
    assert cds["state"] == "ERROR" and "bad thing" in cds["nack"]
    # The next response is the next change, not a resend of what was rejected.
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    second = await s.recv()
    assert int(version(second)) > int(version(first))
    assert cluster(B) in names(second)
    await s.ack(second)
    await processed(xds, CLUSTER, lambda st: st.state == "SYNCED")
    await s.close()


def version(response: object) -> str:
    return str(getattr(response, "version_info", "") or getattr(response, "system_version_info", ""))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_ack_without_new_names_gets_no_response(xds: RunningXds, channel: grpc.aio.Channel, delta: bool) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    await s.send(CLUSTER)
    first = await s.recv()
    await s.ack(first)
    await processed(xds, CLUSTER, lambda st: st.acked_nonce == first.nonce)
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    second = await s.recv()
    assert cluster(B) in names(second), "the response after an ACK must be the next change"
    await s.close()


# -- wildcard types (CDS, LDS) ----------------------------------------------------------------


@pytest.mark.parametrize("type_url", [CLUSTER, LISTENER], ids=["cds", "lds"])
async def test_sotw_wildcard_until_named_full_state(xds: RunningXds, channel: grpc.aio.Channel, type_url: str) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    a, b = (cluster(A), cluster(B)) if type_url == CLUSTER else (f"{A}:8080", f"{B}:8080")
    s = Stream(channel)
    await s.send(type_url)
    r = await s.recv()
    assert sorted(names(r)) == [a, b]
    # Naming a resource ends the implicit wildcard.
    await s.ack(r, [a])
    r = await s.recv()
    assert names(r) == [a]
    # "*" is the explicit wildcard.
    await s.ack(r, ["*", a])
    r = await s.recv()
    assert sorted(names(r)) == [a, b]
    await s.ack(r, ["*", a])
    # Full state: a deleted service is absent from the next response.
    xds.put(service(A, "10.0.0.1"))
    r = await s.recv()
    assert names(r) == [a]
    await s.close()


async def test_sotw_first_wildcard_request_is_answered_even_when_empty(
    xds: RunningXds, channel: grpc.aio.Channel
) -> None:
    s = Stream(channel)
    await s.send(CLUSTER)
    r = await s.recv()
    assert names(r) == [] and r.type_url == CLUSTER
    await s.close()


async def test_delta_wildcard_removals_and_explicit_star(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER)
    r = await s.recv()
    assert sorted(names(r)) == [cluster(A), cluster(B)]
    await s.ack(r)
    xds.put(service(A, "10.0.0.1"))
    r = await s.recv()
    assert names(r) == [] and list(r.removed_resources) == [cluster(B)]
    await s.ack(r)
    # Leaving the wildcard and naming one resource, then "*" again.
    await s.send(CLUSTER, resource_names_unsubscribe=["*"], resource_names_subscribe=[cluster(C)])
    r = await s.recv()
    assert list(r.removed_resources) == [cluster(C)], "a subscribed name that does not exist is reported"
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"), service(C, "10.0.0.3"))
    r = await s.recv()
    assert names(r) == [cluster(C)], "only named resources while not a wildcard"
    await s.send(CLUSTER, resource_names_subscribe=["*"])
    r = await s.recv()
    assert names(r) == [cluster(B)], "the wildcard adds what the client does not have yet"
    await s.close()


# -- named types (EDS, RDS) -------------------------------------------------------------------


@pytest.mark.parametrize("type_url", [ENDPOINT, ROUTE], ids=["eds", "rds"])
async def test_sotw_only_requested_names_and_empty_list_unsubscribes(
    xds: RunningXds, channel: grpc.aio.Channel, type_url: str
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"), service(C, "10.0.0.3"))
    n = (lambda h: cluster(h)) if type_url == ENDPOINT else (lambda h: f"{h}:8080")
    s = Stream(channel)
    await s.send(type_url)
    await s.send(type_url, resource_names=[n(A)])
    r = await s.recv()
    assert names(r) == [n(A)], "an empty list on a named type subscribes to nothing"
    await s.ack(r, [])
    await processed(xds, type_url, lambda st: not st.names)
    xds.put(service(A, "10.0.0.9", port=8080), service(B, "10.0.0.2"), service(C, "10.0.0.3"))
    await s.send(type_url, version_info=r.version_info, response_nonce=r.nonce, resource_names=[n(B)])
    r = await s.recv()
    assert names(r) == [n(B)], "unsubscribed A must not be sent"
    await s.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_names_that_do_not_exist_yet_are_sent_when_they_appear(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    if delta:
        await s.send(ENDPOINT, resource_names_subscribe=[cluster(C)])
        r = await s.recv()
        assert list(r.removed_resources) == [cluster(C)]
        await s.ack(r)
    else:
        await s.send(ENDPOINT, resource_names=[cluster(C)])
    xds.put(service(A, "10.0.0.1"), service(C, "10.0.0.3"))
    r = await s.recv()
    assert endpoints_of(r) == {cluster(C): ["10.0.0.3:8080"]}
    await s.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_newly_requested_names_are_sent_even_if_unchanged(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta)
    if delta:
        await s.send(ENDPOINT, resource_names_subscribe=[cluster(A), cluster(B)])
        r = await s.recv()
        await s.send(ENDPOINT, response_nonce=r.nonce, resource_names_unsubscribe=[cluster(B)])
        await processed(xds, ENDPOINT, lambda st: cluster(B) not in st.names)
        await s.send(ENDPOINT, response_nonce=r.nonce, resource_names_subscribe=[cluster(B)])
    else:
        await s.send(ENDPOINT, resource_names=[cluster(A), cluster(B)])
        r = await s.recv()
        await s.ack(r, [cluster(A)])
        await processed(xds, ENDPOINT, lambda st: st.names == {cluster(A)})
        await s.ack(r, [cluster(A), cluster(B)])
    again = await s.recv()
    assert names(again) == [cluster(B)]
    await s.close()


async def test_delta_unsubscribed_names_are_not_pushed(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(ENDPOINT, resource_names_subscribe=[cluster(A), cluster(B)])
    r = await s.recv()
    await s.send(ENDPOINT, response_nonce=r.nonce, resource_names_unsubscribe=[cluster(A)])
    await processed(xds, ENDPOINT, lambda st: st.names == {cluster(B)})
    xds.put(service(A, "10.0.0.5"), service(B, "10.0.0.2"))
    xds.put(service(A, "10.0.0.5"), service(B, "10.0.0.6"))
    r = await s.recv()
    assert endpoints_of(r) == {cluster(B): ["10.0.0.6:8080"]}
    await s.close()


# -- push order -------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_push_order_cds_eds_lds_rds(xds: RunningXds, channel: grpc.aio.Channel, delta: bool) -> None:
    s = Stream(channel, delta)
    # Subscribe in the reverse order, before the service exists.
    for type_url, name in ((ROUTE, f"{A}:8080"), (LISTENER, None), (ENDPOINT, cluster(A)), (CLUSTER, None)):
        if delta:
            await s.send(type_url, resource_names_subscribe=[name] if name else [])
        else:
            await s.send(type_url, resource_names=[name] if name else [])
    pending = {LISTENER, CLUSTER} if not delta else {LISTENER, CLUSTER, ENDPOINT, ROUTE}
    while pending:  # the answers to the first requests (empty wildcards; delta: missing names)
        r = await s.recv()
        pending.discard(r.type_url)
        await s.ack(r, [name for name in names(r)])
    await processed(xds, CLUSTER, lambda st: st.state == "SYNCED")
    xds.put(service(A, "10.0.0.1"))
    order = [(await s.recv()).type_url for _ in range(4)]
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    await s.close()


# -- delta reconnect --------------------------------------------------------------------------


async def test_delta_initial_resource_versions(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER)
    r = await s.recv()
    versions = {res.name: res.version for res in r.resources}
    assert set(versions) == {cluster(A), cluster(B)} and all(versions.values())
    await s.close()
    xds.put(service(A, "10.0.0.1"), service(C, "10.0.0.3"))
    # Reconnect, telling the server what we have: A (current), B (now gone).
    again = Stream(channel, delta=True)
    await again.send(CLUSTER, initial_resource_versions=versions)
    r = await again.recv()
    assert names(r) == [cluster(C)]
    assert list(r.removed_resources) == [cluster(B)]
    await again.close()


# -- per-type services ------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_per_type_cluster_service(xds: RunningXds, channel: grpc.aio.Channel, delta: bool) -> None:
    xds.put(service(A, "10.0.0.1"))
    method = "/envoy.service.cluster.v3.ClusterDiscoveryService/" + ("DeltaClusters" if delta else "StreamClusters")
    s = Stream(channel, delta, method=method)
    await s.send("")  # per-type services may leave type_url empty
    r = await s.recv()
    assert names(r) == [cluster(A)] and r.type_url == CLUSTER
    await s.close()


async def test_per_type_service_ignores_other_types(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, method="/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints")
    await s.send(CLUSTER)
    await s.send(ENDPOINT, resource_names=[cluster(A)])
    r = await s.recv()
    assert r.type_url == ENDPOINT
    await s.close()


async def test_a_change_goes_only_to_streams_subscribed_to_it(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    sa, sb = Stream(channel), Stream(channel)
    sa.node, sb.node = {"id": "a", "cluster": "t"}, {"id": "b", "cluster": "t"}
    for s, host in ((sa, A), (sb, B)):
        await s.send(ENDPOINT, resource_names=[cluster(host)])
        await s.ack(await s.recv(), [cluster(host)])
    xds.put(service(A, "10.0.0.3"), service(B, "10.0.0.2"))
    assert endpoints_of(await sa.recv()) == {cluster(A): ["10.0.0.3:8080"]}
    xds.put(service(A, "10.0.0.3"), service(B, "10.0.0.4"))
    assert endpoints_of(await sb.recv()) == {cluster(B): ["10.0.0.4:8080"]}, "b heard nothing of a's change"
    await sa.close()
    await sb.close()


def histogram_count(metric: object, short: str) -> float:
    samples = metric.labels(short)._child_samples()  # type: ignore[attr-defined]
    return float(next(s.value for s in samples if s.name == "_count"))


async def test_convergence_is_measured_from_index_change_to_ack(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel)
    await s.send(ENDPOINT, resource_names=[cluster(A)])
    await s.ack(await s.recv(), [cluster(A)])
    before = histogram_count(xds.server.metrics.convergence_seconds, "EDS")
    xds.put(service(A, "10.0.0.2"))
    r = await s.recv()
    await s.ack(r, [cluster(A)])
    await eventually(lambda: histogram_count(xds.server.metrics.convergence_seconds, "EDS") == before + 1)
    await s.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_changed_cluster_is_followed_by_its_unchanged_assignment(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool
) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    await s.send(CLUSTER)
    await s.ack(await s.recv())
    if delta:
        await s.send(ENDPOINT, resource_names_subscribe=[cluster(A)])
    else:
        await s.send(ENDPOINT, resource_names=[cluster(A)])
    first = await s.recv()
    await s.ack(first, [cluster(A)])
    await processed(xds, ENDPOINT, lambda st: st.acked_nonce == first.nonce)
    xds.put(service(A, "10.0.0.1", protocol=PortProtocol.GRPC))  # the cluster changes, the assignment does not
    cds, eds = await s.recv(), await s.recv()
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    assert endpoints_of(eds) == endpoints_of(first)
    await s.close()


@pytest.mark.parametrize("eds_first", [False, True], ids=["cds-then-eds", "eds-then-cds"])
async def test_delta_resume_after_a_cluster_change_resends_its_unchanged_assignment(
    xds: RunningXds, channel: grpc.aio.Channel, eds_first: bool
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER)
    cds = await s.recv()
    await s.ack(cds)
    await s.send(ENDPOINT, resource_names_subscribe=[cluster(A), cluster(B)])
    eds = await s.recv()
    await s.ack(eds)
    clusters = {r.name: r.version for r in cds.resources}
    assignments = {r.name: r.version for r in eds.resources}
    await s.close()
    # A's cluster changes (HTTP/2 options), its endpoints do not; B is untouched.
    xds.put(service(A, "10.0.0.1", protocol=PortProtocol.GRPC), service(B, "10.0.0.2"))
    await eventually(lambda: xds.server.view.resources[CLUSTER][cluster(A)].version != clusters[cluster(A)])
    again = Stream(channel, delta=True)
    requests = [
        (CLUSTER, {"initial_resource_versions": clusters}),
        (
            ENDPOINT,
            {"initial_resource_versions": assignments, "resource_names_subscribe": [cluster(A), cluster(B)]},
        ),
    ]
    for type_url, fields in reversed(requests) if eds_first else requests:
        await again.send(type_url, **fields)
    got: dict[str, list[str]] = {}
    while ENDPOINT not in got or CLUSTER not in got:
        r = await again.recv()
        got.setdefault(r.type_url, []).extend(names(r))
        await again.ack(r)
    assert got[CLUSTER] == [cluster(A)], "only the changed cluster"
    assert got[ENDPOINT] == [cluster(A)], "the changed cluster's assignment follows it, unchanged as it is"
    await again.close()


# -- delta: named subscriptions next to the wildcard ------------------------------------------


@pytest.mark.parametrize("legacy", [True, False], ids=["implicit-wildcard", "explicit-star"])
async def test_delta_unsubscribing_a_name_the_wildcard_covers_resends_it(
    xds: RunningXds, channel: grpc.aio.Channel, legacy: bool
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER, resource_names_subscribe=[] if legacy else ["*"])
    r = await s.recv()
    assert sorted(names(r)) == [cluster(A), cluster(B)]
    await s.ack(r)
    await s.send(CLUSTER, resource_names_subscribe=[cluster(A)])
    await processed(xds, CLUSTER, lambda st: cluster(A) in st.names)
    # The protocol: the server answers whether the unsubscribed resource still exists for the
    # client; the wildcard still covers A, so A itself comes back, in full.
    await s.send(CLUSTER, resource_names_unsubscribe=[cluster(A)])
    r = await s.recv()
    assert names(r) == [cluster(A)] and list(r.removed_resources) == []
    await s.ack(r)
    # And it stays subscribed through the wildcard: its next change is pushed.
    xds.put(service(A, "10.0.0.1", protocol=PortProtocol.GRPC), service(B, "10.0.0.2"))
    r = await s.recv()
    assert names(r) == [cluster(A)]
    await s.close()


async def test_delta_unsubscribing_a_missing_name_under_the_wildcard_reports_it_removed(
    xds: RunningXds, channel: grpc.aio.Channel
) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER, resource_names_subscribe=["*", cluster(C)])
    r = await s.recv()
    assert names(r) == [cluster(A)] and list(r.removed_resources) == [cluster(C)]
    await s.ack(r)
    await s.send(CLUSTER, resource_names_unsubscribe=[cluster(C)])
    r = await s.recv()
    assert names(r) == [] and list(r.removed_resources) == [cluster(C)]
    await s.close()


async def test_delta_unsubscribing_a_name_and_the_wildcard_together_drops_it(
    xds: RunningXds, channel: grpc.aio.Channel
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER, resource_names_subscribe=["*", cluster(A), cluster(B)])
    await s.ack(await s.recv())
    await s.send(CLUSTER, resource_names_unsubscribe=["*", cluster(A)])
    await processed(xds, CLUSTER, lambda st: not st.wildcard and st.names == {cluster(B)})
    xds.put(service(A, "10.0.0.1", protocol=PortProtocol.GRPC), service(B, "10.0.0.2"))
    xds.put(service(A, "10.0.0.1", protocol=PortProtocol.GRPC), service(B, "10.0.0.2", protocol=PortProtocol.GRPC))
    r = await s.recv()
    assert names(r) == [cluster(B)], "A is no longer subscribed at all: neither resent nor pushed"
    await s.close()


async def test_delta_unsubscribing_a_name_without_the_wildcard_sends_nothing(
    xds: RunningXds, channel: grpc.aio.Channel
) -> None:
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2"))
    s = Stream(channel, delta=True)
    await s.send(CLUSTER, resource_names_subscribe=[cluster(A), cluster(B)])
    await s.ack(await s.recv())
    await s.send(CLUSTER, resource_names_unsubscribe=[cluster(A)])
    await processed(xds, CLUSTER, lambda st: st.names == {cluster(B)})
    assert cluster(A) not in only_conn(xds).types[CLUSTER].known
    xds.put(service(A, "10.0.0.1"), service(B, "10.0.0.2", protocol=PortProtocol.GRPC))
    r = await s.recv()
    assert names(r) == [cluster(B)]
    await s.close()


# -- NACK hygiene ------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nack_text_is_clipped_escaped_and_logged_at_a_bounded_rate(
    xds: RunningXds, channel: grpc.aio.Channel, delta: bool, caplog: pytest.LogCaptureFixture
) -> None:
    xds.put(service(A, "10.0.0.1"))
    s = Stream(channel, delta)
    await s.send(CLUSTER)
    first = await s.recv()
    nacks = counter(xds.server.metrics.nacks, "CDS")
    huge = "bad\nCRITICAL forged line " + "x" * 200_000
    count = 30
    caplog.set_level("WARNING", logger="discoveryd.xds")
    for _ in range(count):
        error = status_pb2.Status(code=3, message=huge)
        if delta:
            await s.send(CLUSTER, response_nonce=first.nonce, error_detail=error)
        else:
            await s.send(CLUSTER, version_info="", response_nonce=first.nonce, error_detail=error)
    await eventually(lambda: counter(xds.server.metrics.nacks, "CDS") == nacks + count, what="every NACK counted")
    kept = only_conn(xds).types[CLUSTER].nack
    assert kept is not None and 1000 <= len(kept) <= 1200, len(kept or "")
    assert "\n" not in kept and "bad\\nCRITICAL" in kept, "control characters escaped where the text is kept"
    shown = xds.server.syncz()["connections"][0]["types"]["CDS"]["nack"]
    assert shown == kept
    lines = [r for r in caplog.records if r.name.startswith("discoveryd.xds") and "rejected" in r.getMessage()]
    assert 1 <= len(lines) <= 2, f"{len(lines)} NACK log lines for {count} NACKs on one stream"
    assert all(len(r.getMessage()) < 1500 and "\n" not in r.getMessage() for r in lines)
    await s.close()
