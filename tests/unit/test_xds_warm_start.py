"""The xDS resources saved for a warm start: only those the restored index would build alike."""

from __future__ import annotations

from discoveryd import state
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.policy import DestinationRule, HostPolicy, OutlierDetection, TrafficPolicy
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, Builder, BuildOptions

A = SourceId("files/a")
WILD = Hostname("*.example.com")


def svc(host: str) -> Service:
    return Service(
        hostname=Hostname(host),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=(Endpoint("10.0.0.1"),),
        source=A,
    )


def rule() -> HostPolicy:
    traffic = TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx=3, interval=10.0))
    return HostPolicy(DestinationRule(WILD, "default", "wild", traffic))


def test_hosts_a_wildcard_rule_shaped_are_not_saved_once_it_is_gone() -> None:
    """Saved while a removed `*.example.com` rule was not yet built away, a host kept the rule's cluster;
    after a restart it was taken as saved (no wildcard rule any more) and served with the old policy."""
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example.com"), svc("b.other.org")])
    shard.set_policy(WILD, rule())
    shard.mark_synced()
    built_from = index.snapshot
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, built_from, None)
    shard.set_policy(WILD, None)  # not built yet (xDS debounces) when the state is saved
    served = state.served_resources(view, built_from, index.snapshot)
    assert set(served) == {"b.other.org"}
    # A rule that appears before the build: what was built without it is not saved either.
    index2 = Index([A])
    shard2 = index2.writer(A)
    shard2.replace([svc("a.example.com"), svc("b.other.org")])
    shard2.mark_synced()
    before = index2.snapshot
    view2, _ = Builder(BuildOptions()).update(EMPTY_VIEW, before, None)
    shard2.set_policy(WILD, rule())
    assert set(state.served_resources(view2, before, index2.snapshot)) == {"b.other.org"}
    # And the restored first build then makes of a.example.com what a build of the restored index makes.
    restored, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None, served)
    fresh, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    assert {n: r.version for n, r in restored.resources[CLUSTER].items()} == {
        n: r.version for n, r in fresh.resources[CLUSTER].items()
    }
