"""Warm restarts: the state file round trip, bad files ignored, restored parts served until resynced."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from discoveryd import state
from discoveryd.index import Index, PartCapture, Snapshot
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Location,
    Port,
    PortProtocol,
    Resolution,
    Service,
    SourceId,
)
from discoveryd.policy import DestinationRule, HostPolicy, VirtualService
from discoveryd.state import StateSaver
from discoveryd.testing import eventually
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, Builder, BuildOptions

A = SourceId("etcd/main")
B = SourceId("files/local")


def rich_service(host: str) -> Service:
    return Service(
        Hostname(host),
        namespace="ns",
        ports=(Port(80, "http", PortProtocol.HTTP, 8080), Port(53, "dns", PortProtocol.UDP)),
        addresses=("10.96.0.1",),
        resolution=Resolution.DNS,
        location=Location.MESH_EXTERNAL,
        labels={"app": "x"},
        source=A,
        endpoints=(
            Endpoint(
                "10.0.0.1",
                ports={"http": 9090},
                labels={"v": "1"},
                locality=Locality("r", "z", "s"),
                weight=3,
                health=Health.DRAINING,
                network="n",
                service_account="sa",
                hostname="pod-0",
                priority=2,
                source=A,
                tags=("t",),
                node_name="node",
                target_ref="Pod/ns/pod-0",
            ),
        ),
        name="x",
        export_to=(".",),
        subject_alt_names=("spiffe://x",),
        aliases=(Hostname("alias.example"),),
    )


def svc(host: str, ip: str) -> Service:
    return Service(Hostname(host), ports=(Port(80, "http"),), endpoints=(Endpoint(ip),))


def test_round_trip_keeps_every_field_and_resume_points(tmp_path: Path) -> None:
    index = Index([A, B])
    root = index.writer(A)
    root.replace([rich_service("a.example")])
    root.set_resume_point("rev=42")
    root.mark_synced()
    root.part("dc2").replace([svc("b.example", "10.0.0.2")])
    root.part("dc2").mark_synced()
    state.write_atomically(tmp_path, state.encode(index.capture(), 1000.0))
    loaded = state.load(tmp_path, [A, B])
    assert loaded is not None and loaded.written == 1000.0
    by_part = {(p.source, p.part): p for p in loaded.parts}
    assert by_part[(A, "")].services == (rich_service("a.example"),)  # dataclass equality: every field
    assert by_part[(A, "")].resume_point == "rev=42"
    assert [s.hostname for s in by_part[(A, "dc2")].services] == ["b.example"]
    # Registries no longer configured are not restored.
    only_b = state.load(tmp_path, [B])
    assert only_b is not None and only_b.parts == ()


def _capture(service: Service) -> PartCapture:
    return PartCapture(A, "", (service,), None)


def _file(doc: object, version: int = state.VERSION) -> bytes:
    """A state file holding `doc`, with a valid header and checksum."""
    body = orjson.dumps(doc)
    return f"{state.FORMAT} {version} {hashlib.blake2b(body, digest_size=16).hexdigest()}\n".encode() + body


_TABLES = {
    "fields": {"Service": state._SERVICE_FIELDS, "Endpoint": state._ENDPOINT_FIELDS, "Port": state._PORT_FIELDS},
    "maps": [{}],
    "localities": [["", "", ""]],
    "sources": [A],
}
_HEAD = {"format": state.FORMAT, "version": state.VERSION, "written": 1, **_TABLES}


def _damaged() -> bytes:
    data = bytearray(state.encode([_capture(rich_service("a.example"))], 1.0))
    data[len(data) // 2] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"garbage", "not a readable state file", id="garbage"),
        pytest.param(_file(None)[:-1] + b"{not json", "checksum mismatch", id="truncated"),
        pytest.param(_damaged(), "checksum mismatch", id="damaged"),
        pytest.param(_file(b"{not json".decode()), "not a discoveryd state file", id="not-an-object"),
        pytest.param(_file({"format": "other"}), "not a discoveryd state file", id="other-format"),
        pytest.param(_file({"format": state.FORMAT, "version": 999}, 999), "state format version 999", id="newer"),
        pytest.param(gzip.compress(orjson.dumps({"format": state.FORMAT, "version": 1})), "version 1", id="v1"),
        pytest.param(_file({**_HEAD, "parts": [{"source": "x"}]}), "parts[0]", id="no-part-name"),
        pytest.param(
            _file({**_HEAD, "parts": [{"source": A, "part": "", "services": [["x", "ns", [], [], "BOGUS"]]}]}),
            "parts[0]",
            id="bad-row",
        ),
        pytest.param(
            _file({**_HEAD, "parts": [{"source": A, "part": "", "services": [], "policies": [["x", 1]]}]}),
            "parts[0]",
            id="bad-policy",
        ),
        pytest.param(
            _file({"format": state.FORMAT, "version": state.VERSION, "parts": []}), "malformed", id="no-tables"
        ),
    ],
)
def test_an_unusable_file_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    (tmp_path / state.FILE_NAME).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="discoveryd.state"):
        assert state.load(tmp_path, [A]) is None
    assert reason in caplog.text and str(tmp_path / state.FILE_NAME) in caplog.text


def test_a_missing_file_is_a_cold_start(tmp_path: Path) -> None:
    assert state.load(tmp_path / "nothing-here", [A]) is None


def restored_index(tmp_path: Path) -> Index:
    before = Index([A, B])
    root = before.writer(A)
    root.replace([svc("kept.example", "10.0.0.1"), svc("gone.example", "10.0.0.2")])
    root.mark_synced()
    before.writer(A).part("old-dc").replace([svc("old-dc.example", "10.0.1.1")])
    before.writer(A).part("old-dc").mark_synced()
    before.writer(B).replace([svc("file.example", "10.0.2.1")])
    before.writer(B).mark_synced()
    state.write_atomically(tmp_path, state.encode(before.capture(), 1.0))
    after = Index([A, B])
    loaded = state.load(tmp_path, [A, B])
    assert loaded is not None
    state.restore(after, loaded)
    return after


def test_restored_parts_are_served_stale_and_count_as_ready(tmp_path: Path) -> None:
    index = restored_index(tmp_path)
    snap = index.snapshot
    assert {"kept.example", "gone.example", "old-dc.example", "file.example"} <= set(snap.services)
    assert snap.ready  # restored counts, before any registry ran
    status = snap.shards[A]
    assert status.restored and status.stale and not status.synced


def test_first_sync_replaces_restored_content(tmp_path: Path) -> None:
    index = restored_index(tmp_path)
    a = index.writer(A)
    a.upsert(svc("kept.example", "10.0.0.1"))  # an adapter that upserts what it lists ...
    a.upsert(svc("new.example", "10.0.0.3"))
    assert "gone.example" in index.snapshot.services  # ... serves the restored rest until it has synced
    a.mark_synced()
    services = set(index.snapshot.services)
    assert {"kept.example", "new.example"} <= services
    assert "gone.example" not in services  # restored, not seen by the sync: gone
    assert "old-dc.example" not in services  # a restored part the adapter never reopened: dropped
    status = index.snapshot.shards[A]
    assert status.synced and not status.restored and not status.stale and not status.parts  # the root alone
    # Another registry's restored content is untouched until it syncs.
    assert "file.example" in services and index.snapshot.shards[B].restored


def test_resume_point_is_handed_back_after_a_restart(tmp_path: Path) -> None:
    index = Index([A])
    index.writer(A).part("dc1").set_resume_point("index=7")
    index.writer(A).part("dc1").replace([svc("x.example", "10.0.0.1")])
    index.writer(A).part("dc1").mark_synced()
    state.write_atomically(tmp_path, state.encode(index.capture(), 1.0))
    again = Index([A])
    loaded = state.load(tmp_path, [A])
    assert loaded is not None
    state.restore(again, loaded)
    assert again.writer(A).part("dc1").resume_point == "index=7"


async def test_saver_writes_throttled_and_on_stop(tmp_path: Path) -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.mark_synced()
    saver = StateSaver(index, tmp_path, interval=0.2)
    task = asyncio.create_task(saver.run())
    try:
        for i in range(20):
            shard.upsert(svc(f"s{i}.example", "10.0.0.1"))
            await asyncio.sleep(0.01)
        await eventually(lambda: saver.writes, timeout=3, what="a first write")
        assert 1 <= saver.writes <= 3  # 20 versions in ~0.2 s: throttled
        shard.upsert(svc("last.example", "10.0.0.9"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    loaded = state.load(tmp_path, [A])
    assert loaded is not None
    assert "last.example" in {s.hostname for p in loaded.parts for s in p.services}  # written at stop
    assert not [p.name for p in os.scandir(tmp_path) if p.name.startswith(".index.")]  # no temporary file left


def test_restore_keeps_field_list_complete() -> None:
    # A new model field must round-trip: the rows follow the model's field lists, which the file names.
    saved = rich_service("z.example")
    raw = state.encode([_capture(saved)], 0.0)
    out = state.decode(raw, "mem")
    assert out.parts[0].services[0] == saved
    doc = orjson.loads(raw.partition(b"\n")[2])
    assert doc["fields"]["Service"] == [f.name for f in dataclasses.fields(Service)]
    assert doc["fields"]["Endpoint"] == [f.name for f in dataclasses.fields(Endpoint)]
    assert doc["fields"]["Port"] == [f.name for f in dataclasses.fields(Port)]


def test_a_file_with_other_model_fields_is_read_by_name() -> None:
    saved = rich_service("z.example")
    doc = orjson.loads(state.encode([_capture(saved)], 0.0).partition(b"\n")[2])
    # As written by a model whose Endpoint had a field this one lacks, and lacked `target_ref`.
    fields = doc["fields"]["Endpoint"]
    at = fields.index("target_ref")
    fields[at] = "from_the_future"
    doc["parts"][0]["services"][0][8][0][at] = "ignored"
    out = state.decode(_file(doc), "mem").parts[0].services[0]
    assert out == dataclasses.replace(saved, endpoints=(dataclasses.replace(saved.endpoints[0], target_ref=""),))


def test_equal_labels_and_localities_are_stored_once_and_shared() -> None:
    services = [svc(f"s{i}.example", f"10.0.0.{i}") for i in range(3)]
    services = [
        s.with_endpoints((dataclasses.replace(s.endpoints[0], labels={"app": "x"}, locality=Locality("r", "z")),))
        for s in services
    ]
    raw = state.encode([PartCapture(A, "", tuple(services), None)], 0.0)
    doc = orjson.loads(raw.partition(b"\n")[2])
    assert doc["maps"].count({"app": "x"}) == 1 and doc["localities"] == [["r", "z", ""]]
    out = state.decode(raw, "mem").parts[0].services
    assert list(out) == services
    assert out[0].endpoints[0].labels is out[2].endpoints[0].labels


def test_a_replace_identical_to_the_restored_content_keeps_it_after_sync(tmp_path: Path) -> None:
    index = restored_index(tmp_path)
    a = index.writer(A)
    a.replace([svc("kept.example", "10.0.0.1"), svc("gone.example", "10.0.0.2")])
    version = index.snapshot.version
    a.mark_synced()
    assert {"kept.example", "gone.example"} <= set(index.snapshot.services)
    assert not (index.snapshot.changed & {"kept.example", "gone.example"})
    assert index.snapshot.version > version


def test_leftovers_of_an_interrupted_write_are_removed_at_load(tmp_path: Path) -> None:
    (tmp_path / ".index.abc.tmp").write_bytes(b"half a file")
    assert state.load(tmp_path, [A]) is None  # no state file: a cold start
    assert not (tmp_path / ".index.abc.tmp").exists()


def test_config_keys_state_dir_and_ready_timeout(tmp_path: Path) -> None:
    from discoveryd.config import ConfigError, parse

    cfg = parse("state_dir: state\nready_timeout: 5s\n", tmp_path / "discoveryd.yaml")
    assert cfg.state_dir == tmp_path / "state" and cfg.ready_timeout == 5.0
    defaults = parse("", tmp_path / "discoveryd.yaml")
    assert defaults.state_dir is None and defaults.ready_timeout == 30.0
    with pytest.raises(ConfigError) as e:
        parse("ready_timeout: soon\n", tmp_path / "discoveryd.yaml")
    assert "ready_timeout" in str(e.value) and "discoveryd.yaml:1" in str(e.value)


def test_an_adapter_that_resumes_keeps_the_restored_content(tmp_path: Path) -> None:
    before = Index([A])
    before.writer(A).replace([svc("a.example", "10.0.0.1"), svc("b.example", "10.0.0.2")])
    before.writer(A).set_resume_point("cluster:42")
    before.writer(A).mark_synced()
    state.write_atomically(tmp_path, state.encode(before.capture(), 1.0))
    index = Index([A])
    loaded = state.load(tmp_path, [A])
    assert loaded is not None
    state.restore(index, loaded)
    shard = index.writer(A)
    assert shard.resume_point == "cluster:42"  # the adapter resumes from here ...
    shard.mark_synced()  # ... finds nothing changed, and says so without writing
    assert {"a.example", "b.example"} <= set(index.snapshot.services)
    assert index.snapshot.shards[A].synced and not index.snapshot.shards[A].restored


def test_content_saved_under_another_registry_config_is_not_restored(tmp_path: Path) -> None:
    from discoveryd.registry import RegistryConfig

    old, new = RegistryConfig(kind="etcd", name="main"), RegistryConfig(kind="etcd", name="main2")
    index = Index([A])
    index.writer(A).replace([svc("a.example", "10.0.0.1")])
    index.writer(A).mark_synced()
    state.write_atomically(tmp_path, state.encode(index.capture(), 1.0, {A: state.config_fingerprint(old)}))
    same = state.load(tmp_path, {A: state.config_fingerprint(old)})
    assert same is not None and [p.source for p in same.parts] == [A]
    changed = state.load(tmp_path, {A: state.config_fingerprint(new)})
    assert changed is not None and changed.parts == ()


def test_a_part_that_never_synced_is_not_saved(tmp_path: Path) -> None:
    index = Index([A, B])
    index.writer(A).mark_failing("etcd down")  # never synced: nothing known about it
    index.writer(B).replace([svc("file.example", "10.0.0.1")])
    index.writer(B).mark_synced()
    state.write_atomically(tmp_path, state.encode(index.capture(), 1.0))
    again = Index([A, B])
    loaded = state.load(tmp_path, [A, B])
    assert loaded is not None and [p.source for p in loaded.parts] == [B]
    state.restore(again, loaded)
    again.writer(A)
    assert not again.snapshot.ready  # A must still sync (or time out): it was never restored


def test_policies_are_saved_and_restored_with_their_part(tmp_path: Path) -> None:
    from tests.fakes.policy import DR, HOST, SERVICE, VS, built, policy_of

    policy = policy_of(DR + "---\n" + VS)
    other = Hostname("gone.shop.internal")
    before = Index([A])
    shard = before.writer(A)
    shard.replace([dataclasses.replace(SERVICE, source=A)])
    shard.set_policy(HOST, policy)
    scoped = HostPolicy(
        DestinationRule(other, "shop", "gone"),
        None,
        (DestinationRule(other, "web", "web-own", export_to=(".",)),),
        (VirtualService((other,), "web", "web-routes", export_to=("web", "mobile")),),
    )
    shard.set_policy(other, scoped)
    shard.mark_synced()
    state.write_atomically(tmp_path, state.encode(before.capture(), 1.0))
    loaded = state.load(tmp_path, [A])
    assert loaded is not None
    assert dict(loaded.parts[0].policies)[HOST] == policy  # every field, nested, back as it was
    assert dict(loaded.parts[0].policies)[other] == scoped  # every rule of the host, with its exportTo
    index = Index([A])
    state.restore(index, loaded)
    # Served with its policy from the first version: the same resources as before the restart.
    assert index.snapshot.policies[HOST] == policy and other in index.snapshot.policies
    assert built(index.snapshot.policies[HOST]) == built(before.snapshot.policies[HOST])
    # The first sync keeps the policies the adapter sets again and drops the others.
    again = index.writer(A)
    again.replace([dataclasses.replace(SERVICE, source=A)])
    again.set_policy(HOST, policy)
    assert other in index.snapshot.policies  # restored, not yet synced
    again.mark_synced()
    assert index.snapshot.policies.get(HOST) == policy and other not in index.snapshot.policies


def _saved_xds_round_trip(tmp_path: Path) -> tuple[Index, state.LoadResult, dict[str, Any]]:
    from tests.fakes.policy import DR, HOST, SERVICE, policy_of

    index = Index([A, B])
    shard = index.writer(A)
    exported = dataclasses.replace(svc("only-ns-a.example", "10.0.0.9"), export_to=("ns-a",))
    shard.replace(
        [dataclasses.replace(SERVICE, source=A), exported, *(svc(f"s{i}.example", f"10.0.0.{i}") for i in range(5))]
    )
    shard.set_policy(HOST, policy_of(DR))
    shard.mark_synced()
    index.writer(B).replace([svc("file.example", "10.0.2.1")])
    index.writer(B).mark_synced()
    snap = index.snapshot
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, snap, None)
    served = state.served_resources(view, snap, snap)
    saved = state.SavedXds("fp", (A, B), served)
    state.write_atomically(tmp_path, state.encode(index.capture(), 1.0, None, saved))
    loaded = state.load(tmp_path, [A, B])
    assert loaded is not None
    bodies = {name: r.body for table in view.resources.values() for name, r in table.items()}
    return index, loaded, bodies


def test_saved_xds_resources_make_the_first_build_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.policy import HOST

    before, loaded, bodies = _saved_xds_round_trip(tmp_path)
    # Every host but the one with a policy (built at start, with its namespace variants).
    assert loaded.xds is not None and set(loaded.xds.resources) == set(before.snapshot.services) - {HOST}
    index = Index([A, B])
    state.restore(index, loaded)
    built: list[str] = []
    original = Builder.build

    def counting(self: Builder, service: Service, policy: Any = None) -> Any:
        built.append(service.hostname)
        return original(self, service, policy)

    monkeypatch.setattr(Builder, "build", counting)
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None, loaded.xds.resources)
    assert built == [HOST]  # nothing else built: every other resource taken as saved ...
    assert {name: r.body for table in view.resources.values() for name, r in table.items()} == bodies
    fresh, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    assert {n: r.version for t in fresh.resources.values() for n, r in t.items()} == {
        n: r.version for t in view.resources.values() for n, r in t.items()
    }  # ... and exactly what a build makes of the restored index (same versions: no push after start)
    assert (view.by_host, view.audiences, view.granted) == (fresh.by_host, fresh.audiences, fresh.granted)
    assert view.sotw_body(CLUSTER, "ns-a") == fresh.sotw_body(CLUSTER, "ns-a")
    assert view.sotw_body(CLUSTER, None) == fresh.sotw_body(CLUSTER, None)


def test_saved_xds_resources_are_dropped_when_the_restored_world_may_differ(tmp_path: Path) -> None:
    _, loaded, _ = _saved_xds_round_trip(tmp_path)
    assert loaded.xds is not None
    assert loaded.xds.usable("fp", [A, B]) and loaded.xds.usable("fp", [A, SourceId("new/one"), B])
    assert not loaded.xds.usable("other", [A, B])  # other code or xds config
    assert not loaded.xds.usable("fp", [B, A])  # another precedence: other merged services
    only_a = state.load(tmp_path, [A])  # a registry's part left out: merges may differ
    assert only_a is not None and only_a.xds is None


def test_only_resources_built_from_the_saved_services_are_saved() -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("kept.example", "10.0.0.1"), svc("moved.example", "10.0.0.2")])
    shard.mark_synced()
    built_from = index.snapshot
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, built_from, None)
    shard.upsert(svc("moved.example", "10.0.0.3"))  # not built yet (xDS debounces)
    served = state.served_resources(view, built_from, index.snapshot)
    assert set(served) == {"kept.example"}


def test_a_capture_missing_a_part_with_content_is_incomplete() -> None:
    index = Index([A, B])
    index.writer(A).replace([svc("a.example", "10.0.0.1")])
    index.writer(A).mark_synced()
    index.writer(B)  # opened, empty, not synced: leaving it out changes nothing
    assert index.capture_is_complete()
    index.writer(B).replace([svc("b.example", "10.0.0.2")])  # content that is not saved
    assert not index.capture_is_complete()


@contextlib.asynccontextmanager
async def _running_saver_with_xds(
    index: Index, directory: Path, built: list[tuple[Any, Snapshot]]
) -> AsyncIterator[StateSaver]:
    """A running saver whose xDS side reports `built[-1]` as the last (view, snapshot) it built."""
    saver = StateSaver(index, directory, interval=0.05, xds=lambda: ("fp", (A,), *built[-1]))
    task = asyncio.create_task(saver.run())
    await asyncio.sleep(0)  # the saver runs: what the index holds now counts as saved
    try:
        yield saver
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _xds_catches_up(index: Index, built: list[tuple[Any, Snapshot]]) -> None:
    """xDS builds the index's current snapshot."""
    snap = index.snapshot
    built.append((Builder(BuildOptions()).update(EMPTY_VIEW, snap, None)[0], snap))


async def test_saver_writes_again_once_xds_has_built_the_saved_version(tmp_path: Path) -> None:
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1"), svc("b.example", "10.0.0.2")])
    shard.mark_synced()
    old_snap = index.snapshot
    old_view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, old_snap, None)
    built: list[tuple[Any, Snapshot]] = [(old_view, old_snap)]
    async with _running_saver_with_xds(index, tmp_path, built) as saver:
        shard.upsert(svc("b.example", "10.0.0.3"))  # xDS has not built this version yet
        await eventually(lambda: saver.writes >= 1, timeout=10, what="first write")
        first = state.load(tmp_path, [A])
        assert first is not None and first.xds is not None and set(first.xds.resources) == {"a.example"}
        await asyncio.sleep(0.2)
        assert saver.writes == 1  # nothing new: no write
        _xds_catches_up(index, built)
        await eventually(lambda: saver.writes >= 2, timeout=10, what="a write with the caught-up resources")
    again = state.load(tmp_path, [A])
    assert again is not None and again.xds is not None and set(again.xds.resources) == {"a.example", "b.example"}


async def test_the_write_that_adds_xds_resources_to_the_saved_version_is_not_paced_by_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes are paced by their cost (10x the last one), but the one that only completes the saved
    version with the resources xDS has since built comes after `interval`: until it is written, a
    restart builds every xDS resource itself (0.4 s of CPU at 50k endpoints) before its first answer."""
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1")])
    shard.mark_synced()
    built: list[tuple[Any, Snapshot]] = [(EMPTY_VIEW, index.snapshot)]
    write = state.write_atomically

    def slow_write(directory: Path, data: bytes) -> None:
        time.sleep(1.0)  # a big index: the next cost-paced write would be 10 s later
        write(directory, data)

    monkeypatch.setattr(state, "write_atomically", slow_write)
    async with _running_saver_with_xds(index, tmp_path, built) as saver:
        shard.upsert(svc("b.example", "10.0.0.2"))  # synced; xDS has not built it yet
        await eventually(lambda: saver.writes >= 1, timeout=10, what="first write")
        first = state.load(tmp_path, [A])
        assert first is not None and (first.xds is None or "b.example" not in first.xds.resources)
        _xds_catches_up(index, built)
        await eventually(lambda: saver.writes >= 2, timeout=5, what="the catch-up write, well before 10 s")
    again = state.load(tmp_path, [A])
    assert again is not None and again.xds is not None and set(again.xds.resources) == {"a.example", "b.example"}


def test_a_format_1_file_is_removed_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / state.LEGACY_FILE_NAME).write_bytes(gzip.compress(b'{"format": "discoveryd-index-state"}'))
    with caplog.at_level(logging.INFO, logger="discoveryd.state"):
        assert state.load(tmp_path, [A]) is None  # no current file: a cold start
    assert not (tmp_path / state.LEGACY_FILE_NAME).exists()
    assert "format version 1" in caplog.text


def _endpoint_row(**fields: Any) -> list[Any]:
    row: list[Any] = ["10.0.0.1", 0, 0, 0, 1, "HEALTHY", "", "", "", 0, 0, [], "", ""]
    for name, value in fields.items():
        row[state._ENDPOINT_FIELDS.index(name)] = value
    return row


def _service_row(endpoints: list[Any] | None = None, **fields: Any) -> list[Any]:
    row: list[Any] = ["a.example", "ns", [[80, "http", "HTTP", None]], [], "STATIC", "MESH_INTERNAL", 0, 0]
    row += [[_endpoint_row()] if endpoints is None else endpoints, "", [], [], []]
    for name, value in fields.items():
        row[state._SERVICE_FIELDS.index(name)] = value
    return row


def _lying(*services: list[Any], maps: list[Any] | None = None, xds: Any = None, blob: bytes = b"") -> bytes:
    """A state file with a valid checksum around `services` (the checksum finds damage, not lies)."""
    doc = {
        **_HEAD,
        "maps": [{}, {"http": 8080}] if maps is None else maps,
        "xds": xds,
        "parts": [{"source": A, "part": "", "services": list(services), "policies": []}],
    }
    body = orjson.dumps(doc) + b"\n" + blob
    return f"{state.FORMAT} {state.VERSION} {hashlib.blake2b(body, digest_size=16).hexdigest()}\n".encode() + body


def test_a_well_formed_lying_file_loads() -> None:
    """The baseline of the next test: its rows are read when nothing in them lies."""
    loaded = state.decode(_lying(_service_row([_endpoint_row(ports=1)])), "f")
    assert [s.hostname for p in loaded.parts for s in p.services] == ["a.example"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(_lying(_service_row(hostname=5)), "service hostname: a value of type int", id="int-hostname"),
        pytest.param(_lying(_service_row(hostname="a..b")), "'a..b' is not a hostname", id="empty-label"),
        pytest.param(_lying(_service_row(hostname="A.example")), "is not a hostname", id="not-normalised"),
        pytest.param(_lying(_service_row(aliases=["x y"])), "service aliases", id="bad-alias"),
        pytest.param(_lying(_service_row(labels=-1)), "service labels: a reference outside", id="negative-ref"),
        pytest.param(_lying(_service_row(labels=True)), "service labels: a value of type bool", id="bool-ref"),
        pytest.param(_lying(_service_row(source=7)), "service source: a reference outside", id="source-ref"),
        pytest.param(_lying(_service_row([_endpoint_row(locality=3)])), "endpoint locality", id="locality-ref"),
        pytest.param(_lying(_service_row([_endpoint_row(source=-1)])), "endpoint source", id="endpoint-source"),
        pytest.param(
            _lying(_service_row(addresses="10.0.0.1")), "service: addresses is a str, not list", id="str-for-list"
        ),
        pytest.param(_lying(_service_row(addresses=[1])), "service addresses: a value of type int", id="int-vip"),
        pytest.param(
            _lying(_service_row(ports=[["80", "http", "HTTP", None]])),
            "port number: a value of type str",
            id="str-port",
        ),
        pytest.param(_lying(_service_row(ports=[[80, "http", "HTTP", 70000]])), "target_port", id="port-range"),
        pytest.param(_lying(_service_row(ports=[[80, "http", "BOGUS", None]])), "'BOGUS'", id="protocol"),
        pytest.param(_lying(_service_row([_endpoint_row(weight=2**40)])), "endpoint weight", id="huge-weight"),
        pytest.param(
            _lying(_service_row([_endpoint_row(weight="1")])), "endpoint weight: a value of type str", id="str-weight"
        ),
        pytest.param(_lying(_service_row([_endpoint_row(health="FINE")])), "endpoint health", id="health"),
        pytest.param(
            _lying(_service_row([_endpoint_row(tags="abc")])), "endpoint: tags is a str, not list", id="str-tags"
        ),
        pytest.param(
            _lying(_service_row([_endpoint_row()[:5]])), "endpoint: a row of 5 fields, not 14", id="short-row"
        ),
        pytest.param(_lying(_service_row(labels=1)), "labels values: a value of type int", id="ports-as-labels"),
        pytest.param(_lying(_service_row([_endpoint_row(ports=0)]), maps=[{"a": "b"}]), "ports", id="labels-as-ports"),
        pytest.param(_lying(_service_row(), maps=[["a"]]), "labels: a value of type list", id="map-not-a-dict"),
        pytest.param(
            _lying(_service_row(), xds={"fingerprint": "f", "order": [A], "types": ["bogus"], "hosts": []}),
            "unknown resource type",
            id="xds-type",
        ),
        pytest.param(
            _lying(
                _service_row(),
                xds={
                    "fingerprint": "f",
                    "order": [A],
                    "types": list(state.TYPES),
                    "hosts": [["a.example", [[-1, "c", 1]]]],
                },
                blob=b"x",
            ),
            "xds types",
            id="xds-negative-type",
        ),
    ],
)
def test_a_file_whose_checksum_matches_but_whose_content_lies_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    """Values of the wrong type, references outside their tables (negative ones included: Python would
    index from the end), out-of-range numbers, unknown enum values: rejected before anything is served."""
    (tmp_path / state.FILE_NAME).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="discoveryd.state"):
        assert state.load(tmp_path, [A]) is None
    assert reason in caplog.text and str(tmp_path / state.FILE_NAME) in caplog.text
    assert caplog.text.count(str(tmp_path / state.FILE_NAME)) == 1  # named once, then the reason


@pytest.mark.parametrize(
    ("at", "value", "reason"),
    [
        pytest.param(2, -1, "outside the table maps", id="negative-ref"),
        pytest.param(4, "heavy", "endpoint weight", id="str-weight"),
        pytest.param(0, None, "endpoint", id="no-address"),
    ],
)
def test_a_file_read_by_name_is_checked_too(at: int, value: Any, reason: str) -> None:
    doc = orjson.loads(state.encode([_capture(rich_service("z.example"))], 0.0).partition(b"\n")[2])
    doc["fields"]["Endpoint"][-1] = "from_the_future"  # another model: read by name
    doc["parts"][0]["services"][0][8][0][at] = value
    with pytest.raises(state.StateError, match=reason):
        state.decode(_file(doc), "mem")


@pytest.mark.parametrize("kind", ["fifo", "device"])
async def test_a_state_file_that_is_not_a_regular_file_is_ignored_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A FIFO at the state file's path blocked the start until something wrote to it; a link to a
    device (/dev/zero) was read until memory ran out."""
    path = tmp_path / state.FILE_NAME
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    loading = asyncio.create_task(asyncio.to_thread(state.load, tmp_path, [A]))
    try:
        with caplog.at_level(logging.ERROR, logger="discoveryd.state"):
            done, _ = await asyncio.wait({loading}, timeout=5.0)
            assert done, "the load did not return"
            assert loading.result() is None
        assert "not a regular file" in caplog.text and str(path) in caplog.text
    finally:
        if not loading.done() and kind == "fifo":  # release a reader blocked in open() (before the fix)
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        await asyncio.wait({loading}, timeout=5.0)


def test_a_policy_with_a_boolean_for_a_number_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """JSON's true is an int to isinstance(): a DestinationRule's maxConnections of `true` was restored."""
    from tests.fakes.policy import DR, HOST, SERVICE, policy_of

    data = state.encode(
        [PartCapture(A, "", (dataclasses.replace(SERVICE, source=A),), None, ((HOST, policy_of(DR)),))], 1.0
    )
    doc, _, blob = data.partition(b"\n")[2].partition(b"\n")
    assert b'"max_connections":7' in doc
    body = doc.replace(b'"max_connections":7', b'"max_connections":true') + b"\n" + blob
    (tmp_path / state.FILE_NAME).write_bytes(
        f"{state.FORMAT} {state.VERSION} {hashlib.blake2b(body, digest_size=16).hexdigest()}\n".encode() + body
    )
    with caplog.at_level(logging.ERROR, logger="discoveryd.state"):
        assert state.load(tmp_path, [A]) is None
    assert "max_connections: expected int, got bool" in caplog.text


async def test_a_saver_that_cannot_write_backs_off_and_logs_a_few_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk: each try encodes the whole index (most of a second of CPU at 100k endpoints) and
    logged an ERROR, once per interval for as long as the disk stayed full."""
    import errno

    monkeypatch.setattr(state, "_RETRY_MAX", 0.3, raising=False)
    tries: list[float] = []
    full = True
    write = state.write_atomically

    def writing(directory: Path, data: bytes) -> None:
        tries.append(time.monotonic())
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(directory, data)

    monkeypatch.setattr(state, "write_atomically", writing)
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1")])
    shard.mark_synced()
    saver = StateSaver(index, tmp_path, interval=0.01)
    task = asyncio.create_task(saver.run())
    try:
        await asyncio.sleep(0)  # the saver takes the current version as saved
        shard.upsert(svc("b.example", "10.0.0.2"))
        with caplog.at_level(logging.INFO, logger="discoveryd.state"):
            await eventually(lambda: len(tries) >= 6, timeout=10, what="retries")
            # 0.01 s apart at first, then doubling: a 0.01 s interval without backoff makes 6 tries in 0.06 s.
            assert tries[5] - tries[0] >= 0.01 * (2 + 4 + 8 + 16 + 32) * 0.9
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) <= 3  # tries 1, 2 and 4 (then 8, 16, ...)
            assert "No space left on device" in errors[0].getMessage()
            full = False
            await eventually(lambda: saver.writes >= 1, timeout=10, what="written once the disk has room")
            assert "written again after" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_restored_content_keeps_the_time_of_its_last_sync_across_restarts(tmp_path: Path) -> None:
    """A registry down for days across several restarts: each start saved the restored content again,
    and its status said nothing of when it was last synced. The time of the last sync is saved with
    each part and restored into its status (/debug/registryz, metrics), however often it is re-saved."""
    index = Index([A])
    shard = index.writer(A)
    shard.replace([svc("a.example", "10.0.0.1")])
    shard.mark_synced()
    synced = index.snapshot.shards[A].last_sync
    assert synced is not None
    for _ in range(2):  # two restarts without a sync: restored, saved again, restored
        state.write_atomically(tmp_path, state.encode(index.capture(), synced + 3600.0))
        loaded = state.load(tmp_path, [A])
        assert loaded is not None
        index = Index([A])
        state.restore(index, loaded)
        status = index.snapshot.shards[A]
        assert status.restored and status.last_sync == synced
