"""The admin API against a real Index: readiness, metrics, debug pages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from discoveryd.admin import AdminServer
from discoveryd.config import AdminConfig
from discoveryd.index import Index
from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, PortProtocol, Problem, Service, SourceId

A = SourceId("files/a")
B = SourceId("etcd/b")


@pytest.fixture
async def admin() -> AsyncIterator[tuple[Index, str]]:
    index = Index([A, B])
    server = AdminServer(AdminConfig(listen="127.0.0.1:0"), index, lambda: {"hello": "config"}, {"extra": lambda: [1]})
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.started.wait(), 5)
        yield index, f"http://127.0.0.1:{server.port}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_readyz_waits_for_every_registry(admin: tuple[Index, str]) -> None:
    index, base = admin
    a, b = index.writer(A), index.writer(B)
    status, body = await get(base + "/readyz")
    assert status == 503 and "etcd/b" in body and "files/a" in body
    a.mark_synced()
    status, body = await get(base + "/readyz")
    assert status == 503 and "etcd/b" in body and "files/a" not in body
    b.mark_failing("connection refused")  # a failure alone is not ready
    status, body = await get(base + "/readyz")
    assert status == 503 and "etcd/b" in body
    index.set_timed_out(B, True)  # what the supervisor does after ready_timeout
    status, body = await get(base + "/readyz")
    assert status == 200 and "ready_timeout" in body and "etcd/b" in body
    _, text = await get(base + "/metrics")
    assert 'discoveryd_registry_ready_timed_out{registry="etcd/b"} 1.0' in text
    b.mark_synced()
    assert await get(base + "/readyz") == (200, "ready\n")
    assert (await get(base + "/healthz"))[0] == 200


async def test_metrics_reflect_the_snapshot(admin: tuple[Index, str]) -> None:
    index, base = admin
    shard = index.writer(A)
    shard.replace(
        [
            Service(
                Hostname("a.example"),
                ports=(Port(80, "http", PortProtocol.HTTP),),
                endpoints=(Endpoint("10.0.0.1"), Endpoint("10.0.0.2")),
            )
        ]
    )
    shard.set_problems("x.yaml", [Problem("x.yaml:3", "bad")])
    index.writer(B).mark_failing("down")
    _, text = await get(base + "/metrics")
    assert 'discoveryd_registry_services{registry="files/a"} 1.0' in text
    assert 'discoveryd_registry_endpoints{registry="files/a"} 2.0' in text
    assert 'discoveryd_registry_input_problems{registry="files/a"} 1.0' in text
    assert 'discoveryd_registry_stale{registry="etcd/b"} 1.0' in text
    assert f"discoveryd_index_version {float(index.snapshot.version)}" in text
    assert 'discoveryd_registry_sync_errors_total{registry="etcd/b"} 1.0' in text
    assert 'discoveryd_registry_ready{registry="etcd/b"} 0.0' in text  # failed, never synced
    assert 'discoveryd_registry_last_sync_age_seconds{registry="files/a"}' not in text  # never synced


async def test_debug_pages(admin: tuple[Index, str]) -> None:
    index, base = admin
    ep = Endpoint("10.0.0.1", locality=Locality("eu", "eu-1a"), health=Health.DRAINING)
    index.writer(A).replace([Service(Hostname("a.example"), endpoints=(ep,))])
    index.writer(B).replace([Service(Hostname("a.example"), endpoints=(Endpoint("10.0.0.9"),))])
    index.writer(A).set_problems("f.yaml", [Problem("f.yaml:7", "port name must be DNS-1123", "spec.ports[0].name")])
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/debug/registryz") as resp:
            reg = await resp.json()
        async with session.get(base + "/debug/endpointz?host=a.example") as resp:
            eps = await resp.json()
        async with session.get(base + "/debug/configz") as resp:
            conf = await resp.json()
        async with session.get(base + "/debug/extra") as resp:
            extra = await resp.json()
    assert reg["registries"]["files/a"]["problems"] == [
        {
            "where": "f.yaml:7",
            "field": "spec.ports[0].name",
            "message": "port name must be DNS-1123",
            "severity": "error",
        }
    ]
    assert reg["conflicts"]["a.example"] == {
        "winner": "files/a",
        "sources": ["files/a", "etcd/b"],
        "shards": [{"registry": "files/a", "part": ""}, {"registry": "etcd/b", "part": ""}],
    }
    first, second = eps["a.example"]["endpoints"]
    assert (first["source"], first["health"], first["locality"]["zone"]) == ("files/a", "DRAINING", "eu-1a")
    assert second["source"] == "etcd/b"
    assert conf == {"hello": "config"} and extra == [1]


async def test_parts_show_per_part_in_registryz_metrics_and_readyz(admin: tuple[Index, str]) -> None:
    index, base = admin
    index.writer(A).mark_synced()
    root = index.writer(B)
    dc1, dc2 = root.part("dc1"), root.part("dc2")
    dc1.replace([Service(Hostname("x.example"), endpoints=(Endpoint("10.0.0.1"),))])
    dc1.mark_synced()
    status, body = await get(base + "/readyz")
    assert status == 503 and "etcd/b" in body  # dc2 has neither synced nor failed
    dc2.mark_synced()
    dc2.mark_failing("dc2 unreachable")
    assert (await get(base + "/readyz"))[0] == 200
    async with aiohttp.ClientSession() as session, session.get(base + "/debug/registryz") as resp:
        reg = await resp.json()
    parts = reg["registries"]["etcd/b"]["parts"]
    assert set(parts) == {"dc1", "dc2"}  # the root was never used: it does not count
    assert parts["dc1"]["stale"] is False and parts["dc1"]["services"] == 1
    assert parts["dc2"]["stale"] is True and parts["dc2"]["last_error"] == "dc2 unreachable"
    assert reg["registries"]["etcd/b"]["stale"] is True
    _, text = await get(base + "/metrics")
    assert 'discoveryd_registry_part_stale{part="dc2",registry="etcd/b"} 1.0' in text
    assert 'discoveryd_registry_part_stale{part="dc1",registry="etcd/b"} 0.0' in text
    assert 'discoveryd_registry_part_services{part="dc1",registry="etcd/b"} 1.0' in text
    assert 'discoveryd_registry_part_services{part="",registry="files/a"} 0.0' in text


async def test_two_admin_servers_keep_their_own_metrics() -> None:
    first, second = Index([A]), Index([A])
    first.writer(A).replace([Service(Hostname(f"s{i}.example")) for i in range(3)])
    second.writer(A).replace([Service(Hostname("only.example"))])
    servers = [AdminServer(AdminConfig(listen="127.0.0.1:0"), ix, dict) for ix in (first, second)]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    try:
        for s in servers:
            await asyncio.wait_for(s.started.wait(), 5)
        texts = [(await get(f"http://127.0.0.1:{s.port}/metrics"))[1] for s in servers]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert 'discoveryd_registry_services{registry="files/a"} 3.0' in texts[0]
    assert 'discoveryd_registry_services{registry="files/a"} 1.0' in texts[1]


async def test_endpointz_shows_each_sources_vips(admin: tuple[Index, str]) -> None:
    index, base = admin
    index.writer(A).replace([Service(Hostname("v.example"), endpoints=(Endpoint("10.0.0.1"),))])
    index.writer(B).replace([Service(Hostname("v.example"), addresses=("10.96.0.9",))])
    async with aiohttp.ClientSession() as session, session.get(base + "/debug/endpointz?host=v.example") as resp:
        eps = await resp.json()
    entry = eps["v.example"]
    assert entry["source"] == "files/a" and entry["addresses"] == ["10.96.0.9"]
    assert entry["addresses_by_source"] == [
        {"registry": "files/a", "part": "", "addresses": []},
        {"registry": "etcd/b", "part": "", "addresses": ["10.96.0.9"]},
    ]
