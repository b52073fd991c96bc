"""Index semantics: versions, changed sets, merge rule, staleness, readiness, waiting."""

from __future__ import annotations

import asyncio

import pytest

from discoveryd.index import Index, diff
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Problem, Resolution, Service, SourceId

A = SourceId("files/a")
B = SourceId("etcd/b")


def svc(host: str, *ips: str, port: int = 80, resolution: Resolution = Resolution.STATIC) -> Service:
    return Service(
        hostname=Hostname(host),
        ports=(Port(port, "http", PortProtocol.HTTP),),
        resolution=resolution,
        endpoints=tuple(Endpoint(ip) for ip in ips),
    )


def test_versions_grow_and_changed_names_only_what_changed() -> None:
    index = Index([A])
    shard = index.writer(A)
    v0 = index.snapshot.version
    shard.replace([svc("a.example", "10.0.0.1"), svc("b.example", "10.0.0.2")])
    s1 = index.snapshot
    assert s1.version > v0
    assert s1.changed == {"a.example", "b.example"}
    shard.upsert(svc("b.example", "10.0.0.3"))
    s2 = index.snapshot
    assert s2.version == s1.version + 1
    assert s2.changed == {"b.example"}
    # Unchanged hostnames keep their object: identity is the cheap "unchanged" test.
    assert s2.services["a.example"] is s1.services["a.example"]
    assert diff(s1, s2) == {"b.example"}
    shard.delete(Hostname("a.example"))
    s3 = index.snapshot
    assert s3.changed == {"a.example"} and "a.example" not in s3.services
    assert index.changed_between(s1.version, s3.version) == {"a.example", "b.example"}


def test_writes_that_change_nothing_publish_nothing() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1")])
    version = index.snapshot.version
    shard.upsert(svc("a.example", "10.0.0.1"))
    shard.replace([svc("a.example", "10.0.0.1")])
    shard.delete(Hostname("missing.example"))
    assert index.snapshot.version == version


def test_replace_removes_what_is_gone() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1"), svc("b.example", "10.0.0.2")])
    shard.replace([svc("b.example", "10.0.0.2")])
    assert set(index.snapshot.services) == {"b.example"}
    assert index.snapshot.changed == {"a.example"}


def test_batch_publishes_once() -> None:
    index = Index([A])
    shard = index.writer(A)
    version = index.snapshot.version
    with shard.batch():
        for i in range(10):
            shard.upsert(svc(f"s{i}.example", f"10.0.0.{i}"))
        assert index.snapshot.version == version
    assert index.snapshot.version == version + 1
    assert len(index.snapshot.changed) == 10


def test_merge_unions_endpoints_and_takes_attributes_from_first_registry() -> None:
    index = Index([A, B])
    a, b = index.writer(A), index.writer(B)
    b.replace([svc("shared.example", "10.0.0.2", port=9090, resolution=Resolution.DNS)])
    a.replace([svc("shared.example", "10.0.0.1", port=8080)])
    merged = index.snapshot.services[Hostname("shared.example")]
    assert [ep.address for ep in merged.endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert {ep.source for ep in merged.endpoints} == {A, B}
    assert merged.ports[0].number == 8080 and merged.resolution is Resolution.STATIC
    assert merged.source == A
    conflict = index.snapshot.conflicts[Hostname("shared.example")]
    assert conflict.winner == A and conflict.sources == (A, B)

    # Order is the config's: reversing it makes B win, without rewriting shards.
    index.set_order([B, A])
    merged = index.snapshot.services[Hostname("shared.example")]
    assert merged.ports[0].number == 9090 and merged.source == B
    assert "shared.example" in index.snapshot.changed

    # When one registry lets go, the conflict is gone and the other's data remains.
    a.delete(Hostname("shared.example"))
    assert not index.snapshot.conflicts
    assert [ep.address for ep in index.snapshot.services[Hostname("shared.example")].endpoints] == ["10.0.0.2"]


def test_failing_registry_keeps_data_and_is_stale() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1")])
    shard.mark_synced()
    shard.mark_failing("connection refused")
    snap = index.snapshot
    status = snap.shards[A]
    assert status.stale and status.last_error == "connection refused"
    assert "a.example" in snap.services
    shard.mark_synced()
    assert not index.snapshot.shards[A].stale


def test_dropping_a_registry_removes_its_data() -> None:
    index = Index([A, B])
    index.writer(A).replace([svc("a.example", "10.0.0.1")])
    index.writer(B).replace([svc("a.example", "10.0.0.2"), svc("b.example", "10.0.0.3")])
    index.drop(B)
    snap = index.snapshot
    assert set(snap.services) == {"a.example"}
    assert [ep.address for ep in snap.services[Hostname("a.example")].endpoints] == ["10.0.0.1"]
    assert B not in snap.shards


def test_ready_after_every_registry_synced_or_failed() -> None:
    index = Index([A, B])
    a, b = index.writer(A), index.writer(B)
    assert not index.snapshot.ready
    a.mark_synced()
    assert not index.snapshot.ready
    b.mark_failing("unreachable")
    assert index.snapshot.ready


def test_problems_are_kept_per_scope_and_cleared() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.set_problems("x.yaml", [Problem("x.yaml:3", "bad port", "spec.ports[0].number")])
    shard.set_problems("y.yaml", [Problem("y.yaml:1", "not YAML")])
    assert len(index.snapshot.shards[A].problems) == 2
    shard.set_problems("x.yaml", [])
    assert [p.where for p in index.snapshot.shards[A].problems] == ["y.yaml:1"]


def test_changed_between_forgets_old_history() -> None:
    index = Index([A])
    shard = index.writer(A)
    first = index.snapshot.version
    for i in range(5000):
        shard.upsert(svc("a.example", f"10.0.{i // 250}.{i % 250}"))
    assert index.changed_between(first, index.snapshot.version) is None
    latest = index.snapshot.version
    assert index.changed_between(latest - 1, latest) == {"a.example"}


async def test_wait_returns_the_next_version() -> None:
    index = Index([A])
    shard = index.writer(A)
    version = index.snapshot.version
    waiter = asyncio.create_task(index.wait(version))
    await asyncio.sleep(0)
    assert not waiter.done()
    shard.upsert(svc("a.example", "10.0.0.1"))
    snap = await asyncio.wait_for(waiter, 1)
    assert snap.version == version + 1
    # A version already passed returns at once.
    assert (await asyncio.wait_for(index.wait(version), 1)).version == snap.version


@pytest.mark.parametrize("count", [1, 3])
def test_endpoint_sources_are_stamped(count: int) -> None:
    index = Index([A])
    index.writer(A).replace([svc("a.example", *[f"10.0.0.{i}" for i in range(count)])])
    service = index.snapshot.services[Hostname("a.example")]
    assert service.source == A and all(ep.source == A for ep in service.endpoints)
