"""The fake Consul agent, checked with py-consul (`consul.aio`), the Python client Consul users run.

If py-consul can register, read and block against the fake the way it does
against Consul, the fake's wire format and index semantics are the ones the
adapter must cope with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import consul
import consul.aio
import consul.exceptions
import pytest

from tests.fakes.consul import FakeConsul
from tests.helpers import eventually


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    async with FakeConsul() as f:
        yield f


@pytest.fixture
async def client(fake: FakeConsul) -> AsyncIterator[consul.aio.Consul]:
    c = consul.aio.Consul(host="127.0.0.1", port=fake.port)
    try:
        yield c
    finally:
        await c.close()


async def test_register_and_read_back(fake: FakeConsul, client: consul.aio.Consul) -> None:
    ok = await client.catalog.register(
        "node-a",
        "10.1.0.1",
        service={
            "Service": "web",
            "ID": "web-1",
            "Port": 8080,
            "Tags": ["v1", "env=prod"],
            "Meta": {"protocol": "http"},
        },
        check={"CheckID": "service:web-1", "Status": "passing", "ServiceID": "web-1"},
    )
    assert ok is True
    index, services = await client.catalog.services()
    assert services == {"web": ["env=prod", "v1"]}
    assert int(index) == fake.index()
    index, rows = await client.health.service("web")
    assert [(r["Node"]["Node"], r["Node"]["Address"], r["Node"]["Meta"]) for r in rows] == [("node-a", "10.1.0.1", {})]
    svc = rows[0]["Service"]
    assert (svc["ID"], svc["Port"], svc["Tags"], svc["Meta"], svc["Weights"]) == (
        "web-1",
        8080,
        ["v1", "env=prod"],
        {"protocol": "http"},
        {"Passing": 1, "Warning": 1},
    )
    assert [c["Status"] for c in rows[0]["Checks"]] == ["passing"]
    self_doc = await client.agent.self()
    assert self_doc["Config"]["Datacenter"] == "dc1"


async def test_blocking_query_returns_on_change_with_a_higher_index(
    fake: FakeConsul, client: consul.aio.Consul
) -> None:
    fake.register("web", "10.1.0.1", 80)
    index, _ = await client.health.service("web")
    blocked = asyncio.create_task(client.health.service("web", index=index, wait="30s"))
    await eventually(lambda: fake.blocked["/v1/health/service/web"] == 1, what="the query blocks")
    assert not blocked.done(), "a blocking query answered without a change"
    fake.register("web", "10.1.0.2", 80, service_id="web-2")
    new_index, rows = await asyncio.wait_for(blocked, 5)
    assert int(new_index) > int(index)
    assert sorted(r["Service"]["Address"] for r in rows) == ["10.1.0.1", "10.1.0.2"]


async def test_blocking_query_times_out_after_wait_plus_at_most_a_sixteenth(
    fake: FakeConsul, client: consul.aio.Consul
) -> None:
    fake.register("web", "10.1.0.1", 80)
    index, _ = await client.catalog.services()
    started = time.monotonic()
    same, _ = await client.catalog.services(index=index, wait="800ms")
    elapsed = time.monotonic() - started
    assert same == index
    assert 0.8 <= elapsed < 0.8 * 17 / 16 + 0.3


async def test_unrelated_service_change_does_not_wake_a_service_watch(
    fake: FakeConsul, client: consul.aio.Consul
) -> None:
    fake.register("web", "10.1.0.1", 80)
    index, _ = await client.health.service("web")
    blocked = asyncio.create_task(client.health.service("web", index=index, wait="1s"))
    await eventually(lambda: fake.blocked["/v1/health/service/web"] == 1, what="the query blocks")
    fake.set_service_check("db", "critical")  # no such instance: touches nothing
    fake.register("db", "10.1.0.9", 5432)
    await asyncio.sleep(0.2)
    assert not blocked.done()
    assert (await blocked)[0] == index


async def test_index_reset_and_index_zero_are_answered(fake: FakeConsul, client: consul.aio.Consul) -> None:
    for i in range(5):
        fake.register("web", f"10.1.0.{i + 1}", 80, service_id=f"web-{i}")
    index, _ = await client.catalog.services()
    blocked = asyncio.create_task(client.catalog.services(index=index, wait="5s"))
    await eventually(lambda: fake.blocked["/v1/catalog/services"] == 1, what="the query blocks")
    fake.reset_index(to=2)
    fake.register("web", "10.1.0.99", 80, service_id="web-99")  # index 3 now: lower than before
    new_index, _ = await asyncio.wait_for(blocked, 2)
    assert int(new_index) == 3 < int(index)
    fake.reset_index(to=0)
    zero, _ = await client.catalog.services()
    assert zero == "0"


async def test_acl_rate_limit_errors_and_datacenters(fake: FakeConsul, client: consul.aio.Consul) -> None:
    fake.acl_token = "s3cret"
    with pytest.raises(consul.ACLPermissionDenied):
        await client.catalog.services()
    authed = consul.aio.Consul(host="127.0.0.1", port=fake.port, token="s3cret")
    try:
        assert (await authed.catalog.services())[1] == {}
        fake.fail(429)
        with pytest.raises(consul.exceptions.ClientError, match="429"):
            await authed.catalog.services()
        fake.fail(500)
        with pytest.raises(consul.ConsulException, match="500 No cluster leader"):
            await authed.catalog.services()
        with pytest.raises(consul.ConsulException, match="No path to datacenter"):
            await authed.catalog.services(dc="dc2")
        fake.add_datacenter("dc2")
        fake.register("api", "10.2.0.1", 9000, dc="dc2")
        assert (await authed.catalog.services(dc="dc2"))[1] == {"api": []}
        assert (await authed.catalog.services())[1] == {}
        assert await authed.catalog.datacenters() == ["dc1", "dc2"]
        fake.datacenter_down("dc2")
        with pytest.raises(consul.ConsulException, match="No path to datacenter"):
            await authed.catalog.services(dc="dc2")
    finally:
        await authed.close()


async def test_stop_and_start_keep_port_and_data(fake: FakeConsul, client: consul.aio.Consul) -> None:
    fake.register("web", "10.1.0.1", 80)
    port = fake.port
    await fake.stop()
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        await client.catalog.services()
    await fake.start()
    assert fake.port == port
    assert (await client.catalog.services())[1] == {"web": []}
