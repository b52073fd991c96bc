"""Index semantics: versions, changed sets, merge rule, staleness, readiness, waiting."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from discoveryd.index import Index, diff, stamp_endpoint
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Port,
    PortProtocol,
    Problem,
    Resolution,
    Service,
    SourceId,
)

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


def test_ready_needs_a_sync_not_just_a_failure() -> None:
    index = Index([A, B])
    a, b = index.writer(A), index.writer(B)
    assert not index.snapshot.ready
    a.mark_synced()
    assert not index.snapshot.ready
    b.mark_failing("unreachable")
    assert not index.snapshot.ready  # a registry that never synced is not ready because it failed
    index.set_timed_out(B, True)  # ready_timeout passed: it stops blocking, and is reported
    assert index.snapshot.ready and index.snapshot.shards[B].timed_out
    b.mark_synced()
    assert index.snapshot.ready and not index.snapshot.shards[B].timed_out


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


async def test_waiters_wake_after_versions_published_while_nobody_waited() -> None:
    index = Index([A])
    shard = index.writer(A)
    for i in range(3):  # versions with no waiter: nothing to wake
        shard.upsert(svc("a.example", f"10.0.0.{i + 1}"))
    version = index.snapshot.version
    waiters = [asyncio.create_task(index.wait(version)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one gives up: the others still wake
    await asyncio.sleep(0)
    shard.upsert(svc("a.example", "10.0.0.9"))
    snaps = await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1)
    assert [s.version for s in snaps] == [version + 1, version + 1]
    later = asyncio.create_task(index.wait(version + 1))
    await asyncio.sleep(0)
    shard.upsert(svc("a.example", "10.0.0.10"))
    assert (await asyncio.wait_for(later, 1)).version == version + 2


def test_status_counts_follow_every_upsert() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.upsert(svc("a.example", "10.0.0.1"))
    shard.mark_synced()
    first = index.snapshot
    shard.upsert(svc("a.example", "10.0.0.2"))  # same counts: the status object is kept
    same = index.snapshot
    assert same.version == first.version + 1 and same.shards[A] is first.shards[A]
    shard.upsert(svc("a.example", "10.0.0.2", "10.0.0.3"))  # one endpoint more
    assert index.snapshot.shards[A].endpoints == 2 and index.snapshot.shards[A].services == 1
    shard.upsert(svc("b.example", "10.0.1.1"))
    assert (index.snapshot.shards[A].services, index.snapshot.shards[A].endpoints) == (2, 3)
    shard.delete(Hostname("a.example"))
    assert (index.snapshot.shards[A].services, index.snapshot.shards[A].endpoints) == (1, 1)


@pytest.mark.parametrize("count", [1, 3])
def test_endpoint_sources_are_stamped(count: int) -> None:
    index = Index([A])
    index.writer(A).replace([svc("a.example", *[f"10.0.0.{i}" for i in range(count)])])
    service = index.snapshot.services[Hostname("a.example")]
    assert service.source == A and all(ep.source == A for ep in service.endpoints)


# -- named parts ---------------------------------------------------------------------------


def test_parts_are_shards_with_their_own_state() -> None:
    index = Index([A, B])
    root = index.writer(B)
    dc1, dc2 = root.part("dc1"), root.part("dc2")
    assert (dc1.source, dc1.part_name, root.part_name) == (B, "dc1", "")
    assert root.part("dc1").part_name == "dc1"  # reopening returns the same part
    dc1.replace([svc("one.example", "10.0.0.1")])
    dc2.replace([svc("two.example", "10.0.0.2")])
    dc1.mark_synced()
    dc2.mark_synced()
    dc2.mark_failing("dc2 unreachable")
    status = index.snapshot.shards[B]
    assert set(status.parts) == {"dc1", "dc2"}  # the unused root does not count
    assert not status.parts["dc1"].stale and status.parts["dc2"].stale
    assert status.stale and status.services == 2
    # Only dc2 is stale; both parts' content is still served.
    assert {"one.example", "two.example"} <= set(index.snapshot.services)
    # Writing one part never touches another.
    dc1.replace([])
    assert set(index.snapshot.services) == {"two.example"}


def test_registry_is_ready_when_every_opened_part_is() -> None:
    index = Index([B])
    root = index.writer(B)
    assert not index.snapshot.ready
    dc1, dc2 = root.part("dc1"), root.part("dc2")
    dc1.mark_synced()
    assert not index.snapshot.ready  # dc2 not yet; the unused root does not count
    dc2.mark_failing("down")
    assert not index.snapshot.ready  # a failure alone is not ready
    dc2.mark_synced()
    assert index.snapshot.ready
    root.replace([])  # writing the root makes it count, and it has not synced
    assert not index.snapshot.ready
    root.mark_synced()
    assert index.snapshot.ready
    root.part("dc3")
    assert not index.snapshot.ready
    root.close_part("dc3")
    assert index.snapshot.ready


def test_hostname_in_two_parts_merges_like_two_registries() -> None:
    index = Index([A, B])
    root = index.writer(B)
    root.replace([svc("shared.example", "10.0.0.1", port=8080)])
    root.part("extra").replace([svc("shared.example", "10.0.0.2", port=9090)])
    merged = index.snapshot.services[Hostname("shared.example")]
    assert [ep.address for ep in merged.endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert merged.ports[0].number == 8080  # root before named parts
    conflict = index.snapshot.conflicts[Hostname("shared.example")]
    assert conflict.sources == (B,) and [k.part for k in conflict.shards] == ["", "extra"]
    # A higher-ranked registry wins over every part of a lower one.
    index.writer(A).replace([svc("shared.example", "10.0.0.3", port=7070)])
    merged = index.snapshot.services[Hostname("shared.example")]
    assert merged.ports[0].number == 7070
    assert [ep.address for ep in merged.endpoints] == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]


def test_close_part_and_drop_remove_parts_and_their_data() -> None:
    index = Index([A, B])
    root = index.writer(B)
    root.replace([svc("root.example", "10.0.0.1")])
    dc2 = root.part("dc2")
    dc2.replace([svc("dc2.example", "10.0.0.2")])
    root.close_part("dc2")
    assert "dc2.example" not in index.snapshot.services
    assert "dc2" not in index.snapshot.shards[B].parts
    with pytest.raises(RuntimeError):
        dc2.upsert(svc("dc2.example", "10.0.0.2"))  # a closed part's writer cannot resurrect it
    root.close_part("never-opened")  # no error
    with pytest.raises(ValueError):
        root.close_part("")
    dc3 = root.part("dc3")
    dc3.replace([svc("dc3.example", "10.0.0.3")])
    index.drop(B)
    assert not set(index.snapshot.services) & {"root.example", "dc3.example"}
    assert B not in index.snapshot.shards


# -- staged batches ------------------------------------------------------------------------


def test_an_exception_inside_a_batch_applies_nothing() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("keep.example", "10.0.0.1")])
    shard.mark_synced()
    before = index.snapshot
    with pytest.raises(ZeroDivisionError), shard.batch():
        shard.replace([svc("new.example", "10.0.0.2")])
        shard.mark_failing("half-way")
        _ = 1 / 0
    assert index.snapshot is before
    assert set(index.snapshot.services) == {"keep.example"}
    # A nested batch that fails is discarded alone; the outer one still applies.
    with shard.batch():
        shard.upsert(svc("outer.example", "10.0.0.3"))
        with pytest.raises(KeyError), shard.batch():
            shard.upsert(svc("inner.example", "10.0.0.4"))
            raise KeyError("x")
    assert set(index.snapshot.services) == {"keep.example", "outer.example"}
    assert index.snapshot.version == before.version + 1


async def test_awaiting_inside_a_batch_does_not_delay_other_shards() -> None:
    index = Index([A, B])
    a, b = index.writer(A), index.writer(B)
    release = asyncio.Event()
    in_batch = asyncio.Event()

    async def slow_relist() -> None:
        with a.batch():
            a.replace([svc("a.example", "10.0.0.1")])
            in_batch.set()
            await release.wait()  # a paged relist, still reading
            a.mark_synced()

    task = asyncio.create_task(slow_relist())
    try:
        await asyncio.wait_for(in_batch.wait(), 1)
        b.upsert(svc("b.example", "10.0.0.2"))
        snap = index.snapshot
        assert "b.example" in snap.services and snap.changed == {"b.example"}
        assert "a.example" not in snap.services and not snap.shards[A].synced
        release.set()
        await asyncio.wait_for(task, 1)
        snap = index.snapshot
        assert "a.example" in snap.services and snap.shards[A].synced
        assert snap.changed == {"a.example"}  # the whole batch is one version
    finally:
        release.set()
        await asyncio.gather(task, return_exceptions=True)


def test_stamping_keeps_every_endpoint_field() -> None:
    values: dict[str, object] = {
        "address": "10.1.2.3",
        "ports": {"http": 8080},
        "labels": {"app": "x"},
        "locality": Locality("r", "z", "s"),
        "weight": 7,
        "health": Health.DRAINING,
        "network": "net1",
        "service_account": "sa",
        "hostname": "pod-0",
        "priority": 3,
        "source": SourceId("other/src"),
        "tags": ("primary",),
        "node_name": "node-1",
        "target_ref": "Pod/ns/pod-0",
    }
    names = [f.name for f in dataclasses.fields(Endpoint)]
    assert set(names) == set(values), "a new Endpoint field needs a distinct value here"
    ep = Endpoint(**values)  # type: ignore[arg-type]
    stamped = stamp_endpoint(ep, A)
    for name in names:
        expected = A if name == "source" else values[name]
        assert getattr(stamped, name) == expected, name


def test_vips_come_from_the_highest_ranked_shard_that_has_any() -> None:
    index = Index([A, B])
    host = Hostname("shared.example")
    a, b = index.writer(A), index.writer(B)
    b.replace([dataclasses.replace(svc(host, "10.0.0.2"), addresses=("10.96.0.2",))])
    b.part("dc2").replace([dataclasses.replace(svc(host, "10.0.0.3"), addresses=("10.97.0.3",))])
    a.replace([svc(host, "10.0.0.1")])  # the winner has no VIPs: it does not hide B's
    merged = index.snapshot.services[host]
    assert merged.source == A and merged.addresses == ("10.96.0.2",)
    by_shard = {(k.source, k.part): addrs for k, addrs in index.snapshot.conflicts[host].addresses}
    assert by_shard == {(A, ""): (), (B, ""): ("10.96.0.2",), (B, "dc2"): ("10.97.0.3",)}
    a.replace([dataclasses.replace(svc(host, "10.0.0.1"), addresses=("10.95.0.1",))])
    assert index.snapshot.services[host].addresses == ("10.95.0.1",)  # a lower rank never adds VIPs
    assert host in index.snapshot.changed


def _world(n: int, gen: int, suffix: str = "mesh.local") -> list[Service]:
    return [
        Service(
            hostname=Hostname(f"s{i}.{suffix}"),
            ports=(Port(80, "http", PortProtocol.HTTP),),
            endpoints=(Endpoint(f"10.{gen}.{i >> 8 & 255}.{i & 255}", ports={"http": 8000 + gen}, source=A),),
            source=A,  # as adapters are told to: the shard then has nothing to stamp
        )
        for i in range(n)
    ]


async def test_a_stepwise_replace_of_100k_services_keeps_the_loop_serving_and_publishes_one_world() -> None:
    import time

    index = Index([A, B])
    shard, other = index.writer(A), index.writer(B)
    shard.replace(_world(10, 1))
    start = index.snapshot.version
    new = _world(100_000, 2)
    seen: list[tuple[int, int, int]] = []  # per version seen: (version, services, port of s5)
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.thread_time()
        ticks = 0
        while not done:
            await asyncio.sleep(0)
            now = time.thread_time()  # CPU time of this thread: other processes' load does not count
            gaps.append(now - last)
            last = now
            snap = index.snapshot
            if not seen or seen[-1][0] != snap.version:
                s5 = snap.services[Hostname("s5.mesh.local")]
                seen.append((snap.version, len(snap.services), s5.endpoints[0].port_for(s5.ports[0])))
            ticks += 1
            if ticks == 5:  # another registry publishes meanwhile, also a hostname the replace brings
                other.upsert(svc("b.example", "10.9.0.1"))
                other.upsert(svc("s7.mesh.local", "10.9.0.7"))

    task = asyncio.create_task(ticker())
    await shard.replace_in_steps(new)
    done = True
    await task
    assert len(gaps) > 20, "the replace never yielded to the loop"
    # A replace in one call holds the loop for the whole diff (0.3-1 s of CPU at 100k); steps aim at 2 ms.
    assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms of CPU"
    # Readers saw the old world (10 services, port 8001) or the new one (port 8002), nothing between.
    for version, count, port in seen:
        assert (count, port) in {(10, 8001), (11, 8001), (12, 8001), (100_001, 8002)}, (version, count, port)
    snap = index.snapshot
    assert len(snap.services) == 100_001 and snap.version > start
    assert snap.services[Hostname("b.example")].endpoints[0].address == "10.9.0.1"
    assert [ep.address for ep in snap.services[Hostname("s7.mesh.local")].endpoints] == ["10.2.0.7", "10.9.0.7"]
    assert snap.conflicts[Hostname("s7.mesh.local")].sources == (A, B)
    assert snap.shards[A].services == 100_000 and snap.shards[A].endpoints == 100_000
    # The same content again changes nothing; a smaller one publishes only what changed.
    version = snap.version
    await shard.replace_in_steps(_world(100_000, 2))
    assert index.snapshot.version == version
    await shard.replace_in_steps(_world(99_999, 2))
    assert index.snapshot.version == version + 1 and index.snapshot.changed == {"s99999.mesh.local"}


async def test_a_stepwise_replace_inside_a_batch_applies_on_exit_or_not_at_all() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace(_world(3, 1))
    before = index.snapshot
    with shard.batch():
        await shard.replace_in_steps(_world(5, 2))
        shard.mark_synced()
        assert index.snapshot is before
    after = index.snapshot
    assert after.version == before.version + 1 and after.ready and len(after.services) == 5
    with pytest.raises(RuntimeError), shard.batch():
        await shard.replace_in_steps(_world(1, 3))
        raise RuntimeError("relist failed")
    assert index.snapshot is after


async def test_a_write_to_the_part_during_a_stepwise_replace_is_replaced_like_any_earlier_write() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace(_world(10, 1))

    async def meddle() -> None:
        await asyncio.sleep(0)
        shard.upsert(svc("late.example", "10.8.0.1"))

    task = asyncio.create_task(meddle())
    await shard.replace_in_steps(_world(50_000, 2))
    await task
    assert Hostname("late.example") not in index.snapshot.services
    assert len(index.snapshot.services) == 50_000 and index.snapshot.shards[A].services == 50_000


async def test_a_precedence_change_during_a_stepwise_replace_ranks_every_merge_it_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload re-ranks the registries while a stepwise replace is merging: a hostname the replace
    brings that another registry already has (not a conflict yet, so `set_order` does not re-merge it)
    was merged under the old ranking; it must come out as the new ranking merges it."""
    from discoveryd import index as index_mod

    monkeypatch.setattr(index_mod, "_STEP", 0.0)  # yield at every chance
    index = Index([A, B])
    shard, other = index.writer(A), index.writer(B)
    other.replace([Service(Hostname("s0.mesh.local"), namespace="from-b", endpoints=(Endpoint("10.9.9.9"),))])
    replace = asyncio.create_task(shard.replace_in_steps(_world(20_000, 2)))
    for _ in range(1_000_000):  # one loop turn at a time, until the merge step has begun
        if index._watchers or replace.done():
            break
        await asyncio.sleep(0)
    assert not replace.done()
    index.set_order([B, A])
    await replace
    merged = index.snapshot.services[Hostname("s0.mesh.local")]
    assert merged.namespace == "from-b"  # B ranks first now: its attributes win
    assert index.snapshot.conflicts[Hostname("s0.mesh.local")].sources == (B, A)
