"""The etcd registry against a real etcd: the contract suite in both formats, and etcd's own behaviours.

One etcd serves the session (`tests.fakes.etcd.etcd`); every test works under a
prefix of its own. Tests that cut the adapter off go through a `TcpProxy`;
the restart test runs an etcd of its own.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aetcd
import grpc
import grpc.aio
import pytest
from aetcd import rpc

from adapters.etcd import ADAPTER, EtcdRegistry
from adapters.etcd import registry as etcd_registry
from discoveryd.index import Index, ShardStatus
from discoveryd.model import Health, Hostname, Resolution
from discoveryd.registry import AdapterContext, Registry, ZoneProvider
from discoveryd.testing import AdapterContract
from tests.fakes.etcd import EtcdServer, TcpProxy, etcd, make_certs
from tests.helpers import eventually

__all__ = ["etcd"]  # the session fixture, imported to be found by pytest

pytestmark = pytest.mark.integration

# Quick reconnects: tests cut connections on purpose.
FAST = {"dial_timeout": "1s", "backoff_initial": "50ms", "backoff_max": "500ms", "request_timeout": "5s"}


def make_registry(endpoints: list[str], prefix: str, tmp: Path, **extra: Any) -> EtcdRegistry:
    config = ADAPTER.config_model.model_validate(
        {"kind": "etcd", "name": "test", "endpoints": endpoints, "prefix": prefix, **FAST, **extra}
    )
    registry = ADAPTER.factory(config, AdapterContext(base_dir=tmp))
    assert isinstance(registry, EtcdRegistry)
    return registry


@asynccontextmanager
async def running(registry: Registry) -> AsyncIterator[Index]:
    index = Index()
    task = asyncio.create_task(registry.run(index.writer(registry.config.source)))
    try:
        yield index
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@asynccontextmanager
async def connect(server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = aetcd.Client(host="127.0.0.1", port=server.client_port, timeout=10)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    async with connect(etcd) as c:
        yield c


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"


def status(index: Index) -> ShardStatus:
    (st,) = index.snapshot.shards.values()
    return st


def addresses(index: Index, host: str) -> set[tuple[str, int]] | None:
    svc = index.snapshot.services.get(Hostname(host))
    if svc is None:
        return None
    return {(ep.address, ep.port_for(p)) for ep in svc.endpoints for p in svc.ports}


def _counting(commit: Callable[..., Awaitable[None]], calls: list[int]) -> Callable[..., Awaitable[None]]:
    """Wraps `_View.commit` (a full list replacing the shard) to record each one's revision."""

    async def wrapper(self: Any, listing: Any, revision: int) -> None:
        calls.append(revision)
        await commit(self, listing, revision)

    return wrapper


def naming(addr: str, **metadata: Any) -> bytes:
    return json.dumps({"Op": 0, "Addr": addr, "Metadata": metadata or None}).encode()


# -- the contract suite, in both formats ------------------------------------------------


class _Harness:
    def __init__(self, client: aetcd.Client, url: str, prefix: str, tmp: Path, fmt: str) -> None:
        self._client, self._url, self._prefix, self._tmp, self._fmt = client, url, prefix, tmp, fmt

    def registry(self) -> Registry:
        return make_registry([self._url], self._prefix, self._tmp, format=self._fmt)

    def _dir(self, service: str) -> str:
        if self._fmt == "skydns":
            return f"{self._prefix}local/mesh/{service}/"
        return f"{self._prefix}{service}/"

    async def put(self, service: str, endpoints: list[tuple[str, int]]) -> Hostname:
        wanted: dict[str, bytes] = {}
        for ip, port in endpoints:
            key = f"{self._dir(service)}{ip.replace('.', '-')}-{port}"
            if self._fmt == "skydns":
                wanted[key] = json.dumps({"host": ip, "port": port}).encode()
            else:
                wanted[key] = naming(f"{ip}:{port}")
        for kv in await self._client.get_prefix(self._dir(service).encode()):
            if kv.key.decode() not in wanted:
                await self._client.delete(kv.key)
        for key, value in wanted.items():
            await self._client.put(key.encode(), value)
        return Hostname(f"{service}.mesh.local")

    async def remove(self, service: str) -> None:
        await self._client.delete_prefix(self._dir(service).encode())

    async def put_broken(self, service: str) -> None:
        await self._client.put(f"{self._dir(service)}broken".encode(), b"{not json")


class _OutageHarness(_Harness):
    """The adapter reaches etcd through a `TcpProxy`; an outage resets its connections and refuses new ones."""

    def __init__(self, client: aetcd.Client, proxy: TcpProxy, prefix: str, tmp: Path, fmt: str) -> None:
        super().__init__(client, proxy.url, prefix, tmp, fmt)
        self._proxy = proxy

    async def outage(self) -> None:
        self._proxy.block()

    async def restore(self) -> None:
        self._proxy.unblock()


@pytest.fixture
def proxy(etcd: EtcdServer) -> Iterator[TcpProxy]:
    through = TcpProxy(etcd.client_port)
    try:
        yield through
    finally:
        through.close()


class TestEtcdNamingContract(AdapterContract):
    @pytest.fixture
    def harness(self, client: aetcd.Client, proxy: TcpProxy, prefix: str, tmp_path: Path) -> _Harness:
        return _OutageHarness(client, proxy, prefix, tmp_path, "etcd-naming")


class TestSkyDnsContract(AdapterContract):
    @pytest.fixture
    def harness(self, client: aetcd.Client, proxy: TcpProxy, prefix: str, tmp_path: Path) -> _Harness:
        return _OutageHarness(client, proxy, prefix, tmp_path, "skydns")


# -- etcd naming ----------------------------------------------------------------------


async def test_put_and_delete_follow_keys(client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    registry = make_registry([etcd.url], prefix, tmp_path)
    assert isinstance(registry, ZoneProvider)
    assert [z.name for z in registry.zones()] == ["mesh.local"]
    async with running(registry) as index:
        await eventually(lambda: status(index).synced, what="first sync")
        meta = {"protocol": "http", "weight": 5, "zone": "z1", "region": "r1", "labels": {"v": "2"}}
        await client.put(f"{prefix}web/a".encode(), naming("10.1.0.1:8080", **meta))
        await client.put(f"{prefix}web/b".encode(), naming("10.1.0.2:8080", health="unhealthy"))
        await eventually(lambda: addresses(index, "web.mesh.local") == {("10.1.0.1", 8080), ("10.1.0.2", 8080)})
        svc = index.snapshot.services[Hostname("web.mesh.local")]
        a, b = svc.endpoints
        assert (a.weight, a.locality.zone, a.locality.region, a.labels) == (5, "z1", "r1", {"v": "2"})
        assert b.health is Health.UNHEALTHY
        assert {p.name for p in svc.ports} == {"http", "grpc"}

        await client.delete(f"{prefix}web/a".encode())
        await eventually(lambda: addresses(index, "web.mesh.local") == {("10.1.0.2", 8080)}, what="one deleted")
        await client.delete(f"{prefix}web/b".encode())
        await eventually(lambda: "web.mesh.local" not in index.snapshot.services, what="service gone")
        assert not status(index).stale


async def test_lease_expiry_removes_the_endpoint(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    async with running(make_registry([etcd.url], prefix, tmp_path)) as index:
        await eventually(lambda: status(index).synced, what="first sync")
        lease = await client.lease(2)
        await client.put(f"{prefix}leased/1".encode(), naming("10.2.0.1:9000"), lease=lease)
        await client.put(f"{prefix}leased/2".encode(), naming("10.2.0.2:9000"))
        await eventually(lambda: addresses(index, "leased.mesh.local") == {("10.2.0.1", 9000), ("10.2.0.2", 9000)})
        # No keep-alive: etcd expires the lease and deletes its key.
        await eventually(
            lambda: addresses(index, "leased.mesh.local") == {("10.2.0.2", 9000)}, timeout=20, what="lease expiry"
        )


async def test_unparsable_value_is_reported_skipped_and_cleared(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    bad = f"{prefix}api/bad"
    await client.put(f"{prefix}api/good".encode(), naming("10.3.0.1:80"))
    await client.put(bad.encode(), naming("not-an-ip:80"))
    async with running(make_registry([etcd.url], prefix, tmp_path)) as index:
        await eventually(lambda: status(index).synced, what="first sync")
        (problem,) = status(index).problems
        assert problem.where == bad and problem.field == "Addr"
        assert addresses(index, "api.mesh.local") == {("10.3.0.1", 80)}

        await client.put(bad.encode(), naming("10.3.0.2:80"))  # fixed
        await eventually(lambda: not status(index).problems, what="problem cleared")
        await eventually(lambda: addresses(index, "api.mesh.local") == {("10.3.0.1", 80), ("10.3.0.2", 80)})

        await client.put(bad.encode(), b"\xff\xfe")  # broken again, while watching
        await eventually(lambda: len(status(index).problems) == 1, what="problem reported from the watch")
        assert addresses(index, "api.mesh.local") == {("10.3.0.1", 80)}
        await client.delete(bad.encode())
        await eventually(lambda: not status(index).problems, what="problem cleared by delete")
        assert not status(index).stale


async def test_large_prefix_is_listed_in_pages(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    for i in range(25):
        await client.put(f"{prefix}svc{i % 5}/{i}".encode(), naming(f"10.4.0.{i}:7000"))
    async with running(make_registry([etcd.url], prefix, tmp_path, page_size=4)) as index:
        await eventually(lambda: status(index).synced, what="first sync")
        assert status(index).endpoints == 25
        assert addresses(index, "svc3.mesh.local") == {(f"10.4.0.{i}", 7000) for i in (3, 8, 13, 18, 23)}


async def test_fails_over_to_the_next_endpoint(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    await client.put(f"{prefix}api/1".encode(), naming("10.5.0.1:80"))
    dead = EtcdServer(tmp_path)  # ports reserved, never started
    async with running(make_registry([dead.url, etcd.url], prefix, tmp_path)) as index:
        await eventually(lambda: status(index).synced, timeout=10, what="sync through the second endpoint")
        assert addresses(index, "api.mesh.local") == {("10.5.0.1", 80)}


async def test_unreachable_etcd_marks_failing(prefix: str, tmp_path: Path) -> None:
    dead = EtcdServer(tmp_path)
    async with running(make_registry([dead.url], prefix, tmp_path)) as index:
        await eventually(lambda: status(index).failed, timeout=10, what="failure reported")
        st = status(index)
        assert st.stale and not st.ready and not st.synced and st.last_error and dead.url in st.last_error


# -- connectivity: compaction while cut off, a crashed etcd ------------------------------


async def test_compaction_while_disconnected_forces_a_relist(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lists: list[int] = []
    monkeypatch.setattr(etcd_registry._View, "commit", _counting(etcd_registry._View.commit, lists))
    await client.put(f"{prefix}kept/1".encode(), naming("10.6.0.1:80"))
    await client.put(f"{prefix}gone/1".encode(), naming("10.6.0.2:80"))
    proxy = TcpProxy(etcd.client_port)
    try:
        async with running(make_registry([proxy.url], prefix, tmp_path)) as index:
            await eventually(lambda: status(index).synced, what="first sync")
            assert addresses(index, "gone.mesh.local") == {("10.6.0.2", 80)}

            proxy.block()
            await eventually(lambda: status(index).stale, timeout=10, what="marked stale while cut off")
            assert addresses(index, "kept.mesh.local") == {("10.6.0.1", 80)}, "content kept while cut off"
            await client.delete(f"{prefix}gone/1".encode())
            await client.put(f"{prefix}kept/2".encode(), naming("10.6.0.3:80"))
            put = await client.put(f"{prefix}new/1".encode(), naming("10.6.0.4:80"))
            await client.compact(put.header.revision)
            proxy.unblock()

            # The watch cannot resume past the compaction: only a new list shows these.
            await eventually(lambda: "gone.mesh.local" not in index.snapshot.services, timeout=15, what="relist")
            assert addresses(index, "kept.mesh.local") == {("10.6.0.1", 80), ("10.6.0.3", 80)}
            assert addresses(index, "new.mesh.local") == {("10.6.0.4", 80)}
            await eventually(lambda: not status(index).stale, what="fresh again")
            assert len(lists) == 2 and lists[1] >= put.header.revision, lists
            # And the watch runs again after the relist.
            await client.put(f"{prefix}after/1".encode(), naming("10.6.0.5:80"))
            await eventually(lambda: addresses(index, "after.mesh.local") == {("10.6.0.5", 80)}, what="watching")
    finally:
        proxy.close()


async def test_resume_after_reconnect_without_relist(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count every watch as stable, so that losing it takes the reconnect-at-once path.
    monkeypatch.setattr(etcd_registry, "_STABLE_AFTER", 0.0)
    lists: list[int] = []
    monkeypatch.setattr(etcd_registry._View, "commit", _counting(etcd_registry._View.commit, lists))
    proxy = TcpProxy(etcd.client_port)
    try:
        async with running(make_registry([proxy.url], prefix, tmp_path)) as index:
            await eventually(lambda: status(index).synced, what="first sync")
            await client.put(f"{prefix}a/1".encode(), naming("10.7.0.1:80"))
            await eventually(lambda: addresses(index, "a.mesh.local") == {("10.7.0.1", 80)})
            proxy.block()
            await eventually(lambda: status(index).stale, timeout=10, what="marked stale")
            await client.put(f"{prefix}a/2".encode(), naming("10.7.0.2:80"))
            await client.delete(f"{prefix}a/1".encode())
            proxy.unblock()
            await eventually(lambda: addresses(index, "a.mesh.local") == {("10.7.0.2", 80)}, timeout=15)
            await eventually(lambda: not status(index).stale, what="fresh again")
            assert len(lists) == 1, "resumed the watch from the last revision, without listing again"
    finally:
        proxy.close()


async def test_a_stalled_connection_is_noticed_within_twice_the_keepalive(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    proxy = TcpProxy(etcd.client_port)
    try:
        registry = make_registry([proxy.url], prefix, tmp_path, keepalive="1s")
        async with running(registry) as index:
            await client.put(f"{prefix}a/1".encode(), naming("10.7.1.1:80"))
            await eventually(lambda: addresses(index, "a.mesh.local") == {("10.7.1.1", 80)}, what="first sync")
            # An idle but healthy watch is not mistaken for a stalled one: over 3x keepalive of silence
            # the liveness probes are answered and nothing fails.
            await asyncio.sleep(3.0)
            assert status(index).errors_total == 0 and not status(index).stale, status(index)
            proxy.stall()  # nothing is closed: only a deadline of our own can notice
            # 2x keepalive, plus the watchdog's tick and scheduling on a loaded machine; grpc alone takes ~60 s.
            await eventually(lambda: status(index).stale, timeout=4.0, what="stale within ~2x keepalive")
            assert any(why in (status(index).last_error or "") for why in ("stalled", "ping timeout"))
            await client.put(f"{prefix}a/2".encode(), naming("10.7.1.2:80"))
            proxy.resume()
            await eventually(
                lambda: (
                    addresses(index, "a.mesh.local") == {("10.7.1.1", 80), ("10.7.1.2", 80)} and not status(index).stale
                ),
                timeout=15,
                what="reconnected and caught up",
            )
    finally:
        proxy.close()


async def test_etcd_killed_and_restarted(prefix: str, tmp_path: Path) -> None:
    own = EtcdServer(tmp_path)
    own.start()
    try:
        async with connect(own) as c:
            await c.put(f"{prefix}api/1".encode(), naming("10.8.0.1:80"))
        async with running(make_registry([own.url], prefix, tmp_path)) as index:
            await eventually(lambda: status(index).synced, what="first sync")

            own.stop(signal.SIGKILL)
            await eventually(lambda: status(index).stale, timeout=10, what="marked stale while down")
            assert addresses(index, "api.mesh.local") == {("10.8.0.1", 80)}, "content kept while down"

            own.start()  # same data dir, same ports
            await eventually(lambda: not status(index).stale, timeout=15, what="reconnected")
            async with connect(own) as c:
                await c.put(f"{prefix}api/2".encode(), naming("10.8.0.2:80"))
                await c.delete(f"{prefix}api/1".encode())
            await eventually(lambda: addresses(index, "api.mesh.local") == {("10.8.0.2", 80)}, timeout=15)
    finally:
        own.stop()


@pytest.mark.parametrize("more_writes", [0, 40], ids=["lower-revision", "higher-revision"])
async def test_etcd_restarted_as_a_new_cluster_is_listed_again(prefix: str, tmp_path: Path, more_writes: int) -> None:
    """etcd restored or restarted on a new data dir at the same URL: the old content must not linger as fresh.

    With `more_writes`, the new cluster's revision is already past the old one when the adapter reconnects,
    so only the cluster ID tells them apart.
    """
    own = EtcdServer(tmp_path)
    own.start()
    try:
        async with connect(own) as c:
            for i in range(10):  # revision 11 in the old cluster
                await c.put(f"{prefix}old/{i}".encode(), naming(f"10.8.1.{i}:80"))
        async with running(make_registry([own.url], prefix, tmp_path)) as index:
            await eventually(lambda: status(index).synced and addresses(index, "old.mesh.local"), what="first sync")

            own.stop(signal.SIGKILL)
            await eventually(lambda: status(index).stale, timeout=10, what="marked stale while down")
            shutil.rmtree(own.data_dir)
            own.start()  # a new, empty cluster at the same URL
            async with connect(own) as c:
                for i in range(more_writes):
                    await c.put(f"{prefix}filler/{i}".encode(), b"not json")
                await c.put(f"{prefix}new/1".encode(), naming("10.8.2.1:80"))
            await eventually(
                lambda: (
                    addresses(index, "new.mesh.local") == {("10.8.2.1", 80)}
                    and addresses(index, "old.mesh.local") is None
                    and not status(index).stale
                ),
                timeout=20,
                what="the new cluster's content replaced the old",
            )
            # And it follows the new cluster from there.
            async with connect(own) as c:
                await c.put(f"{prefix}new/2".encode(), naming("10.8.2.2:80"))
            await eventually(lambda: addresses(index, "new.mesh.local") == {("10.8.2.1", 80), ("10.8.2.2", 80)})
    finally:
        own.stop()


class _RestoredShard:
    """A shard as a warm restart hands it over: restored content and resume point (the index's state loader)."""

    def __init__(self, inner: Any, point: str | None) -> None:
        self._inner, self._point = inner, point

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def resume_point(self) -> str | None:
        return self._point

    def set_resume_point(self, value: str) -> None:
        self._point = value
        self._inner.set_resume_point(value)


async def test_resume_point_is_saved_and_a_current_restore_is_fresh_at_once(
    client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put = await client.put(f"{prefix}a/1".encode(), naming("10.7.2.1:80"))
    first = Index()
    registry = make_registry([etcd.url], prefix, tmp_path)
    task = asyncio.create_task(registry.run(first.writer(registry.config.source)))
    try:
        writer = first.writer(registry.config.source)
        await eventually(lambda: writer.resume_point is not None, what="resume point saved")
        cluster, _, revision = (writer.resume_point or "").partition(":")
        assert int(revision) >= put.header.revision and int(cluster, 16) == put.header.cluster_id
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    point = writer.resume_point

    # The list is held back, so what the adapter does before listing is visible.
    listed = asyncio.Event()
    release = asyncio.Event()
    real_list = etcd_registry.EtcdRegistry._list

    async def held_list(self: Any, conn: Any, on_page: Any) -> int:
        listed.set()
        await release.wait()
        return await real_list(self, conn, on_page)

    monkeypatch.setattr(etcd_registry.EtcdRegistry, "_list", held_list)
    for stored, fresh_at_once in ((point, True), (f"{cluster}:1", False)):
        listed.clear()
        release.clear()
        restarted = Index()
        inner = restarted.writer(registry.config.source)
        inner.replace(first.snapshot.services.values())  # what the state directory restored
        shard = _RestoredShard(inner, stored)
        task = asyncio.create_task(make_registry([etcd.url], prefix, tmp_path).run(shard))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(listed.wait(), 10)
            assert status(restarted).synced is fresh_at_once, (stored, status(restarted))
            release.set()
            await eventually(lambda r=restarted: status(r).synced, what="synced after the list")
            assert addresses(restarted, "a.mesh.local") == {("10.7.2.1", 80)}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# -- skydns ---------------------------------------------------------------------------


async def test_skydns_records(client: aetcd.Client, etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    def rec(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    await client.put(f"{prefix}local/mesh/db".encode(), rec(host="10.9.0.1", port=5432))
    await client.put(f"{prefix}local/mesh/api/x1".encode(), rec(host="10.9.0.2", port=80, priority=10, weight=60))
    await client.put(f"{prefix}local/mesh/api/x2".encode(), rec(host="10.9.0.3", port=80, priority=20, weight=40))
    await client.put(f"{prefix}local/mesh/ext".encode(), rec(host="backend.example.org", port=443))
    registry = make_registry([etcd.url], prefix, tmp_path, format="skydns")
    async with running(registry) as index:
        await eventually(lambda: status(index).synced, what="first sync")
        services = index.snapshot.services
        assert addresses(index, "db.mesh.local") == {("10.9.0.1", 5432)}
        api = services[Hostname("api.mesh.local")]
        assert [(ep.address, ep.hostname, ep.priority, ep.weight) for ep in api.endpoints] == [
            ("10.9.0.2", "x1", 10, 60),
            ("10.9.0.3", "x2", 20, 40),
        ]
        assert addresses(index, "x1.api.mesh.local") == {("10.9.0.2", 80)}
        ext = services[Hostname("ext.mesh.local")]
        assert ext.resolution is Resolution.DNS and ext.endpoints[0].address == "backend.example.org"
        # The apex aggregates the records one level below it.
        assert {ep.address for ep in services[Hostname("mesh.local")].endpoints} == {"10.9.0.1", "backend.example.org"}

        await client.delete(f"{prefix}local/mesh/api/x1".encode())
        await eventually(lambda: addresses(index, "api.mesh.local") == {("10.9.0.3", 80)}, what="instance removed")
        assert "x1.api.mesh.local" not in index.snapshot.services


# -- security: username/password, TLS with a client certificate ---------------------------


def _prefix_end(prefix: str) -> bytes:
    return prefix[:-1].encode() + bytes([ord(prefix[-1]) + 1])


async def _enable_auth(server: EtcdServer, prefix: str) -> None:
    """root (all keys) and reader (read-only on `prefix`), then auth on."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.client_port}") as channel:
        auth = rpc.AuthStub(channel)
        for role in ("root", "reader"):
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
        perm = rpc.Permission(permType=rpc.Permission.READ, key=prefix.encode(), range_end=_prefix_end(prefix))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="reader", perm=perm))
        for user, password in (("root", "rootpw"), ("reader", "readerpw")):
            await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=user))
        await auth.AuthEnable(rpc.AuthEnableRequest())


async def test_username_and_password(prefix: str, tmp_path: Path) -> None:
    own = EtcdServer(tmp_path)
    own.start()
    try:
        async with connect(own) as c:
            await c.put(f"{prefix}api/1".encode(), naming("10.10.0.1:80"))
        await _enable_auth(own, prefix)
        (tmp_path / "reader.pw").write_text("readerpw\n")
        reader = make_registry([own.url], prefix, tmp_path, username="reader", password_file="reader.pw")
        async with running(reader) as index:
            await eventually(lambda: status(index).synced, what="sync as reader")
            assert addresses(index, "api.mesh.local") == {("10.10.0.1", 80)}
            async with aetcd.Client(host="127.0.0.1", port=own.client_port, username="root", password="rootpw") as c:
                await c.put(f"{prefix}api/2".encode(), naming("10.10.0.2:80"))
            await eventually(lambda: addresses(index, "api.mesh.local") == {("10.10.0.1", 80), ("10.10.0.2", 80)})

        wrong = make_registry([own.url], prefix, tmp_path, username="reader", password="nope")
        async with running(wrong) as index:
            await eventually(lambda: status(index).failed, timeout=10, what="authentication failure reported")
            assert not status(index).synced
            assert "authentication failed" in (status(index).last_error or "")
    finally:
        own.stop()


async def test_tls_with_client_certificate(prefix: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    own = EtcdServer(tmp_path, tls=(certs["ca"], certs["server_cert"], certs["server_key"]))
    own.start()
    try:
        credentials = grpc.ssl_channel_credentials(
            certs["ca"].read_bytes(), certs["client_key"].read_bytes(), certs["client_cert"].read_bytes()
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{own.client_port}", credentials) as channel:
            put = rpc.PutRequest(key=f"{prefix}api/1".encode(), value=naming("10.11.0.1:443"))
            await rpc.KVStub(channel).Put(put, timeout=10)

        # Relative paths: relative to the config file's directory (tmp_path here).
        tls = {"ca_file": "pki/ca.pem", "cert_file": "pki/client.pem", "key_file": "pki/client.key"}
        async with running(make_registry([own.url], prefix, tmp_path, tls=tls)) as index:
            await eventually(lambda: status(index).synced, timeout=10, what="sync over TLS")
            assert addresses(index, "api.mesh.local") == {("10.11.0.1", 443)}

        no_client_cert = make_registry([own.url], prefix, tmp_path, tls={"ca_file": "pki/ca.pem"})
        async with running(no_client_cert) as index:
            await eventually(lambda: status(index).failed, timeout=10, what="refused without a client certificate")
            assert not status(index).synced

        missing = make_registry([own.url], prefix, tmp_path, tls={"ca_file": "pki/absent.pem"})
        async with running(missing) as index:
            await eventually(lambda: status(index).failed, timeout=10, what="unreadable CA reported")
            assert "absent.pem: cannot read" in (status(index).last_error or "")
    finally:
        own.stop()
