"""The Consul registry against the fake agent: what reaches each datacenter's part, and the load it puts on Consul.

`Recorder` is a `ShardWriter` that keeps each part's services, sync state
and errors and counts writes, so a test can say "nothing was written" as
well as "this was written". Timings in the configs are short so that a
test waits on conditions for a fraction of a second, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters.consul import ConsulConfig, ConsulRegistry
from adapters.consul.registry import next_index
from discoveryd.model import Health, Hostname, PortProtocol, Problem, Service, SourceId
from discoveryd.testing import AdapterContract
from tests.fakes.consul import FakeConsul
from tests.fakes.etcd import make_certs
from tests.helpers import eventually, watching_the_loop

SOURCE = SourceId("consul/test")


@dataclass
class Part:
    services: dict[Hostname, Service] = field(default_factory=dict)
    synced: bool = False
    stale: bool = False
    errors: list[str] = field(default_factory=list)
    problems: dict[str, tuple[Problem, ...]] = field(default_factory=dict)
    writes: int = 0
    """Service writes applied (upsert, delete, replace): a version each."""


class Recorder:
    """A ShardWriter over in-memory parts; `parts[""]` is the root."""

    def __init__(self, parts: dict[str, Part] | None = None, name: str = "") -> None:
        self.parts = parts if parts is not None else {}
        self._name = name
        self.parts.setdefault(name, Part())
        self._staged: list[Any] | None = None

    @property
    def me(self) -> Part:
        return self.parts[self._name]

    @property
    def source(self) -> SourceId:
        return SOURCE

    @property
    def part_name(self) -> str:
        return self._name

    def part(self, name: str) -> Recorder:
        return Recorder(self.parts, name)

    def close_part(self, name: str) -> None:
        self.parts.pop(name, None)

    def _do(self, op: Any) -> None:
        if self._staged is not None:
            self._staged.append(op)
        else:
            op()

    def replace(self, services: Iterable[Service]) -> None:
        new = {s.hostname: s for s in services}

        def op() -> None:
            self.me.services = new
            self.me.writes += 1

        self._do(op)

    def upsert(self, service: Service) -> None:
        def op() -> None:
            self.me.services[service.hostname] = service
            self.me.writes += 1

        self._do(op)

    def delete(self, hostname: Hostname) -> None:
        def op() -> None:
            if self.me.services.pop(hostname, None) is not None:
                self.me.writes += 1

        self._do(op)

    def mark_synced(self) -> None:
        def op() -> None:
            self.me.synced, self.me.stale = True, False

        self._do(op)

    def mark_failing(self, error: str) -> None:
        def op() -> None:
            self.me.stale = True
            self.me.errors.append(error)

        self._do(op)

    def set_problems(self, scope: str, problems: Sequence[Problem]) -> None:
        def op() -> None:
            if problems:
                self.me.problems[scope] = tuple(problems)
            else:
                self.me.problems.pop(scope, None)

        self._do(op)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._staged = []
        try:
            yield
        except BaseException:
            self._staged = None
            raise
        staged, self._staged = self._staged, None
        for op in staged:
            op()


def config(fake: FakeConsul, **extra: Any) -> ConsulConfig:
    doc: dict[str, Any] = {
        "kind": "consul",
        "name": "test",
        "address": fake.url,
        "wait": "2s",
        "min_interval": "20ms",
        "backoff_initial": "20ms",
        "backoff_max": "200ms",
        "acl_retry": "100ms",
        "request_timeout": "2s",
        "connect_timeout": "1s",
    }
    doc.update(extra)
    return ConsulConfig.model_validate(doc)


@dataclass
class Running:
    fake: FakeConsul
    shard: Recorder

    def part(self, dc: str = "dc1") -> Part:
        return self.shard.parts.get(dc) or Part()

    def service(self, name: str, dc: str = "dc1") -> Service | None:
        return self.part(dc).services.get(Hostname(f"{name}.service.{dc}.consul"))


@contextlib.asynccontextmanager
async def running(fake: FakeConsul, tmp_path: Path | None = None, **extra: Any) -> AsyncIterator[Running]:
    registry = ConsulRegistry(config(fake, **extra), tmp_path or Path("."))
    shard = Recorder()
    task = asyncio.create_task(registry.run(shard), name="consul-under-test")
    try:
        yield Running(fake, shard)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    async with FakeConsul() as f:
        yield f


def _addresses(svc: Service | None) -> set[tuple[str, int]]:
    assert svc is not None
    return {(ep.address, ep.port_for(svc.ports[0])) for ep in svc.endpoints}


async def test_next_index_follows_consuls_rules() -> None:
    assert next_index(0, 7) == 7
    assert next_index(7, 7) == 7  # timeout or idempotent write: same index, block again
    assert next_index(7, 9) == 9
    assert next_index(9, 3) == 0  # went backwards: reset, read anew without blocking
    assert next_index(0, 0) == 1  # 0 or less is used as 1, so the next read blocks
    assert next_index(5, -2) == 0  # backwards after the sanity floor


async def test_first_sync_names_aliases_endpoints(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 8080, node="n1")
    fake.register("web", "10.0.0.2", 8080, node="n2", service_id="web-2")
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="dc1 synced")
        svc = r.service("web")
        assert svc is not None
        assert svc.hostname == "web.service.dc1.consul"
        assert svc.aliases == ("web.service.consul",)
        assert svc.name == "web" and svc.source == SOURCE
        assert [(p.name, p.number, p.protocol) for p in svc.ports] == [("tcp", 8080, PortProtocol.TCP)]
        assert _addresses(svc) == {("10.0.0.1", 8080), ("10.0.0.2", 8080)}
        assert {ep.node_name for ep in svc.endpoints} == {"n1", "n2"}
        assert all(ep.locality.region == "dc1" and ep.health is Health.HEALTHY for ep in svc.endpoints)
        assert r.part("").errors == [] and not r.part().stale


async def test_registration_and_deregistration_follow(fake: FakeConsul) -> None:
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="dc1 synced")
        assert r.part().services == {}
        fake.register("api", "10.0.1.1", 9000)
        await eventually(lambda: r.service("api"), what="api registered")
        fake.register("api", "10.0.1.2", 9001, service_id="api-2")
        await eventually(lambda: len(r.service("api").endpoints) == 2, what="second instance")  # type: ignore[union-attr]
        assert _addresses(r.service("api")) == {("10.0.1.1", 9000), ("10.0.1.2", 9001)}
        fake.deregister("api-2")
        await eventually(lambda: len(r.service("api").endpoints) == 1, what="instance gone")  # type: ignore[union-attr]
        fake.deregister("api")
        await eventually(lambda: r.service("api") is None, what="service gone")


async def test_check_transitions_and_weights(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80, node="n1", weights={"Passing": 10, "Warning": 3})
    fake.register("web", "10.0.0.2", 80, node="n2", service_id="web-2", weights={"Passing": 5, "Warning": 0})

    def state() -> dict[str, tuple[Health, int]]:
        svc = r.service("web")
        assert svc is not None
        return {ep.address: (ep.health, ep.weight) for ep in svc.endpoints}

    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        assert state() == {"10.0.0.1": (Health.HEALTHY, 10), "10.0.0.2": (Health.HEALTHY, 5)}
        fake.set_service_check("web", "warning")
        fake.set_service_check("web-2", "warning")
        want = {"10.0.0.1": (Health.HEALTHY, 3), "10.0.0.2": (Health.UNHEALTHY, 1)}  # Warning 0: excluded
        await eventually(lambda: state() == want, what="warning weights")
        fake.set_service_check("web", "critical")
        await eventually(lambda: state()["10.0.0.1"] == (Health.UNHEALTHY, 1), what="critical")
        fake.set_service_check("web", "passing")
        fake.set_service_check("web-2", "passing")
        want = {"10.0.0.1": (Health.HEALTHY, 10), "10.0.0.2": (Health.HEALTHY, 5)}
        await eventually(lambda: state() == want, what="passing again")
        # A node check counts for every service on the node.
        fake.set_check("n2", "serfHealth", "critical")
        await eventually(lambda: state()["10.0.0.2"][0] is Health.UNHEALTHY, what="node check critical")
        assert state()["10.0.0.1"] == (Health.HEALTHY, 10)
        fake.set_check("n2", "serfHealth", "passing")
        await eventually(lambda: state()["10.0.0.2"] == (Health.HEALTHY, 5), what="node check passing")


async def test_tags_meta_protocol_locality_and_addresses(fake: FakeConsul) -> None:
    fake.register(
        "api",
        "",
        7000,
        node="n1",
        node_address="10.9.0.1",
        node_meta={"zone": "eu-1a"},
        tags=["v1", "env=prod"],
        meta={"protocol": "grpc", "team": "core"},
    )
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        svc = r.service("api")
        assert svc is not None
        (ep,) = svc.endpoints
        assert ep.address == "10.9.0.1"  # Service.Address empty: Node.Address
        assert ep.tags == ("v1", "env=prod")
        assert ep.labels == {"env": "prod", "protocol": "grpc", "team": "core"}
        assert (ep.locality.region, ep.locality.zone) == ("dc1", "eu-1a")
        assert [(p.name, p.protocol) for p in svc.ports] == [("grpc", PortProtocol.GRPC)]
        fake.register(
            "api",
            "10.9.0.2",
            7001,
            node="n1",
            tags=["v2"],
            meta={"protocol": "http"},
        )

        def changed() -> bool:
            s = r.service("api")
            return s is not None and s.endpoints[0].tags == ("v2",)

        await eventually(changed, what="tags changed")
        svc = r.service("api")
        assert svc is not None
        assert svc.endpoints[0].address == "10.9.0.2" and svc.endpoints[0].labels == {"protocol": "http"}
        assert [(p.name, p.number, p.protocol) for p in svc.ports] == [("http", 7001, PortProtocol.HTTP)]


async def test_tagged_wan_address_and_tag_filter(fake: FakeConsul) -> None:
    fake.register(
        "web",
        "10.0.0.1",
        80,
        node="n1",
        tags=["prod"],
        tagged_addresses={"wan_ipv4": {"Address": "203.0.113.1", "Port": 8443}},
    )
    fake.register("web", "10.0.0.2", 80, node="n2", service_id="web-2", tags=["canary"])
    fake.register("batch", "10.0.0.3", 80, node="n3", tags=["canary"])
    async with running(fake, tagged_address="wan", tags=["prod"]) as r:
        await eventually(lambda: r.part().synced, what="synced")
        assert set(r.part().services) == {"web.service.dc1.consul"}  # batch has no prod instance
        assert _addresses(r.service("web")) == {("203.0.113.1", 8443)}
        # Not counted: the watch for `batch` is never started.
        assert fake.requests["/v1/health/service/batch"] == 0


async def test_unchanged_content_writes_nothing_and_steady_state_does_not_poll(fake: FakeConsul) -> None:
    for i in range(3):
        fake.register(f"svc{i}", f"10.0.0.{i + 1}", 80)
    async with running(fake, wait="500ms") as r:
        await eventually(lambda: r.part().synced, what="synced")
        writes = r.part().writes
        fake.touch("svc0")  # the index moves, the content does not
        await eventually(lambda: fake.blocking_requests["/v1/health/service/svc0"] >= 2, what="re-read")
        before = sum(fake.requests.values())
        await asyncio.sleep(3.0)  # a quiet period: only blocking queries timing out may reach the agent
        during = sum(fake.requests.values()) - before
        assert r.part().writes == writes, "an unchanged answer was written"
        # 4 watches, each at most one request per wait (500 ms) + jitter: at most 4 * 7 over 3 s. A poller at
        # min_interval (20 ms) would have sent 600.
        assert during <= 28, dict(fake.requests)
        non_blocking = sum(fake.requests.values()) - sum(fake.blocking_requests.values())
        assert non_blocking == 1 + 1 + 3  # agent/self, the first catalog read, the first read of each service


async def test_churning_service_is_rate_limited(fake: FakeConsul) -> None:
    fake.register("hot", "10.0.0.1", 80)
    async with running(fake, min_interval="100ms") as r:
        await eventually(lambda: r.part().synced, what="synced")
        before, started = fake.requests["/v1/health/service/hot"], time.monotonic()
        for i in range(200):  # a change every 5 ms or so
            fake.set_service_check("hot", "warning" if i % 2 else "passing")
            await asyncio.sleep(0.005)
        during, elapsed = fake.requests["/v1/health/service/hot"] - before, time.monotonic() - started
        # One request per 100 ms at most (plus the one in flight when the churn started); unpaced, it
        # would be one per change: 200.
        assert during <= elapsed / 0.1 + 2, (during, elapsed)


async def test_index_reset_is_followed(fake: FakeConsul) -> None:
    for i in range(20):
        fake.register("web", f"10.0.0.{i + 1}", 80, service_id=f"web-{i}")
    # A long wait: only a watch that starts over after the reset sees the changes within the test's deadlines;
    # one that kept blocking on its old, higher index would hear of them only when its wait ran out.
    async with running(fake, wait="60s") as r:
        await eventually(lambda: r.part().synced, what="synced")
        high = fake.index()
        held = ("/v1/catalog/services", "/v1/health/service/web")
        await eventually(lambda: all(fake.blocked[p] for p in held), what="watches blocked")
        before = fake.requests["/v1/catalog/services"]
        fake.reset_index(to=2)  # e.g. a restored snapshot: far below what the watches hold
        await eventually(lambda: fake.requests["/v1/catalog/services"] > before + 1, what="catalog read anew")
        fake.register("late", "10.1.0.1", 81)
        fake.register("web", "10.0.0.99", 80, service_id="web-99")
        assert fake.index() < high
        await eventually(lambda: r.service("late"), what="new service after the reset")
        await eventually(lambda: len(r.service("web").endpoints) == 21, what="new instance after reset")  # type: ignore[union-attr]
        held = ("/v1/catalog/services", "/v1/health/service/late")
        await eventually(lambda: all(fake.blocked[p] for p in held), what="watches blocked")
        before = fake.requests["/v1/health/service/late"]
        fake.reset_index(to=0)  # an index of 0 is used as 1: the watch blocks instead of spinning
        await eventually(lambda: fake.requests["/v1/health/service/late"] > before + 1, what="late asked again")
        before = fake.requests["/v1/health/service/late"]
        await asyncio.sleep(0.5)  # a window to count requests in, not a wait for a condition
        assert fake.requests["/v1/health/service/late"] - before <= 1
        fake.deregister("late")
        await eventually(lambda: r.service("late") is None, what="deregistration after a reset to 0")


async def test_second_datacenter_appears_and_one_goes_down(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80)
    async with running(fake, datacenters=["dc1", "dc2"]) as r:
        await eventually(lambda: r.part("dc1").synced, what="dc1 synced")
        await eventually(lambda: r.part("dc2").errors, what="dc2 failing")
        assert "No path to datacenter" in r.part("dc2").errors[-1]
        assert not r.part("dc1").stale and r.part("dc2").stale
        fake.add_datacenter("dc2")
        fake.register("api", "10.2.0.1", 9000, dc="dc2")
        await eventually(lambda: r.part("dc2").synced and not r.part("dc2").stale, what="dc2 synced")
        api = r.service("api", "dc2")
        assert api is not None and api.aliases == ()  # not the agent's own datacenter
        assert api.endpoints[0].locality.region == "dc2"
        fake.datacenter_down("dc2")
        await eventually(lambda: r.part("dc2").stale, what="dc2 stale")
        assert r.service("api", "dc2") is not None, "last known data of dc2 was dropped"
        assert not r.part("dc1").stale
        fake.register("web", "10.0.0.2", 80, service_id="web-2")
        await eventually(lambda: len(r.service("web").endpoints) == 2, what="dc1 still followed")  # type: ignore[union-attr]
        fake.datacenter_down("dc2", False)
        await eventually(lambda: not r.part("dc2").stale, what="dc2 back")


async def test_outage_keeps_last_known_good(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80)
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        await fake.stop()
        await eventually(lambda: r.part().stale, what="stale during the outage")
        assert _addresses(r.service("web")) == {("10.0.0.1", 80)}
        fake.register("web", "10.0.0.2", 80, service_id="web-2")
        errors = len(r.part().errors)
        await asyncio.sleep(1.0)
        # Backoff: with 200 ms max and 2 watches, a second costs a handful of attempts, not a spin.
        assert len(r.part().errors) - errors <= 20
        await fake.start()
        await eventually(lambda: not r.part().stale, timeout=5, what="synced after the outage")
        await eventually(lambda: len(r.service("web").endpoints) == 2, what="change made during the outage")  # type: ignore[union-attr]


async def test_rate_limit_and_server_errors_back_off_and_recover(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80)
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        fake.fail(429, count=3, path="/v1/health/service/web")
        fake.fail(500, count=2, path="/v1/catalog/services")
        fake.register("web", "10.0.0.2", 80, service_id="web-2")
        await eventually(lambda: len(r.service("web").endpoints) == 2, what="change after errors")  # type: ignore[union-attr]
        await eventually(lambda: not r.part().stale, what="recovered")
        errors = " | ".join(r.part().errors)
        assert "HTTP 429" in errors and "HTTP 500" in errors


async def test_acl_denied_is_reported_and_a_rotated_token_heals(
    fake: FakeConsul, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.acl_token = "tok-9d1c5e2f-right"
    fake.register("web", "10.0.0.1", 80)
    token_file = tmp_path / "token"
    token_file.write_text("tok-0000-wrong\n")
    async with running(fake, tmp_path, token_file="token") as r:
        await eventually(lambda: r.part("").errors, what="root failing on 403")
        assert "HTTP 403" in r.part("").errors[-1] and "ACL" in r.part("").errors[-1]
        token_file.write_text("tok-9d1c5e2f-right\n")
        await eventually(lambda: r.part().synced, what="synced with the rotated token")
        assert r.service("web") is not None
        fake.denied_services.add("web")
        fake.register("web", "10.0.0.2", 80, service_id="web-2")
        await eventually(lambda: any("HTTP 403" in e for e in r.part().errors), what="403 on one service")
        assert r.service("web") is not None  # kept
    assert "tok-9d1c5e2f-right" in fake.seen_tokens
    assert "tok-9d1c5e2f" not in caplog.text and "tok-0000" not in caplog.text


async def test_environment_token_is_sent(fake: FakeConsul, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token-1")
    fake.acl_token = "env-token-1"
    fake.register("web", "10.0.0.1", 80)
    async with running(fake) as r:
        await eventually(lambda: r.service("web"), what="read with the env token")
    assert "env-token-1" not in repr(config(fake).model_dump())


async def test_unusable_service_name_is_a_problem_not_a_failure(fake: FakeConsul) -> None:
    fake.register("web_api", "10.0.0.1", 80)
    fake.register("ok", "10.0.0.2", 80)
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        assert set(r.part().services) == {"ok.service.dc1.consul"}
        assert "dc1/web_api" in r.part().problems
        fake.deregister("web_api")
        await eventually(lambda: "dc1/web_api" not in r.part().problems, what="problem cleared")


class ConsulHarness:
    """The contract suite's view of Consul: service `<name>` in dc1, one node per endpoint."""

    def __init__(self, fake: FakeConsul, tmp: Path) -> None:
        self.fake, self.tmp = fake, tmp

    def registry(self) -> ConsulRegistry:
        return ConsulRegistry(config(self.fake), self.tmp)

    async def put(self, name: str, endpoints: list[tuple[str, int]]) -> Hostname:
        self.fake.deregister_service(name)
        for i, (ip, port) in enumerate(endpoints):
            self.fake.register(name, ip, port, node=f"{name}-node-{i}", service_id=f"{name}-{i}")
        return Hostname(f"{name}.service.dc1.consul")

    async def remove(self, name: str) -> None:
        self.fake.deregister_service(name)

    async def put_broken(self, name: str) -> None:
        # An instance without any address (neither the service's nor its node's).
        self.fake.register(name, "", 80, node=f"{name}-node", node_address="")

    async def outage(self) -> None:
        await self.fake.stop()

    async def restore(self) -> None:
        await self.fake.start()

    async def reset(self) -> None:
        self.fake.new_cluster()


class TestContract(AdapterContract):
    @pytest.fixture
    async def harness(self, fake: FakeConsul, tmp_path: Path) -> ConsulHarness:
        return ConsulHarness(fake, tmp_path)


async def test_port_number_and_so_the_cluster_name_stay_while_used(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 9000, node="n1")
    async with running(fake) as r:
        await eventually(lambda: r.part().synced, what="synced")
        # Two instances on a lower port now outnumber the first: the number stays while 9000 is used.
        fake.register("web", "10.0.0.2", 8000, node="n2", service_id="web-2")
        fake.register("web", "10.0.0.3", 8000, node="n3", service_id="web-3")
        await eventually(lambda: len(r.service("web").endpoints) == 3, what="three instances")  # type: ignore[union-attr]
        svc = r.service("web")
        assert svc is not None and svc.ports[0].number == 9000
        assert _addresses(svc) == {("10.0.0.1", 9000), ("10.0.0.2", 8000), ("10.0.0.3", 8000)}
        fake.deregister("web")
        await eventually(lambda: len(r.service("web").endpoints) == 2, what="first gone")  # type: ignore[union-attr]
        assert r.service("web").ports[0].number == 8000  # type: ignore[union-attr]


async def test_capped_connections_still_deliver_every_change(fake: FakeConsul) -> None:
    for i in range(4):
        fake.register(f"svc{i}", f"10.0.0.{i + 1}", 80)
    # 5 watches over 2 connections: the watches queue for a connection, each change still arrives
    # (at most one `wait` late).
    async with running(fake, max_connections=2, wait="500ms") as r:
        await eventually(lambda: r.part().synced, timeout=10, what="synced")
        assert len(r.part().services) == 4
        fake.register("svc3", "10.0.0.99", 80, service_id="svc3-b")
        await eventually(lambda: len(r.service("svc3").endpoints) == 2, timeout=10, what="change seen")  # type: ignore[union-attr]
        assert not r.part().stale


async def test_consistency_namespace_partition_and_tags_go_on_the_wire(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80, tags=["prod"])
    async with running(fake) as r:
        await eventually(lambda: r.service("web"), what="read")
        plain = fake.last_query["/v1/health/service/web"]
        assert not {"stale", "consistent", "ns", "partition", "tag"} & plain.keys(), plain
    async with running(fake, consistency="stale", namespace="team-a", partition="p1", tags=["prod"]) as r:
        await eventually(lambda: r.service("web"), what="read")
        query = fake.last_query["/v1/health/service/web"]
        assert "stale" in query and query["ns"] == "team-a" and query["partition"] == "p1" and query["tag"] == "prod"
        assert "stale" in fake.last_query["/v1/catalog/services"]
        assert r.service("web").namespace == "team-a"  # type: ignore[union-attr]


async def test_https_with_client_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs["ca"]))
    server.load_cert_chain(certs["server_cert"], certs["server_key"])
    server.verify_mode = ssl.CERT_REQUIRED
    fake = FakeConsul()
    await fake.start(server)
    try:
        fake.register("web", "10.0.0.1", 80)
        tls = {"ca_file": "pki/ca.pem", "cert_file": "pki/client.pem", "key_file": "pki/client.key"}
        async with running(fake, tmp_path, tls=tls) as r:
            await eventually(lambda: r.service("web"), what="read over mTLS")
        # Without our certificate the agent refuses the handshake: failing, reported, nothing read.
        async with running(fake, tmp_path, tls={"ca_file": "pki/ca.pem"}) as r:
            await eventually(lambda: r.part("").errors, what="handshake refused")
            assert r.part("dc1").services == {}
    finally:
        await fake.stop()


async def test_an_answer_that_is_not_consuls_is_retried_with_backoff(fake: FakeConsul) -> None:
    fake.register("web", "10.0.0.1", 80)
    async with running(fake, backoff_initial="200ms", backoff_max="200ms") as r:
        await eventually(lambda: r.part().synced, what="synced")
        fake.fail(200, count=10_000, path="/v1/catalog/services", body='["not", "an", "object"]')
        fake.register("api", "10.0.0.2", 81)  # wakes the catalog watch into the bad answers
        await eventually(lambda: any("not an object" in e for e in r.part().errors), what="reported")
        before, started = fake.requests["/v1/catalog/services"], time.monotonic()
        await asyncio.sleep(1.0)  # a window to count requests in
        during, elapsed = fake.requests["/v1/catalog/services"] - before, time.monotonic() - started
        # A backoff of 100-200 ms between tries; a loop paced only by min_interval (20 ms) would send 50.
        assert during <= elapsed / 0.1 + 1, during
        assert r.service("web") is not None and r.part().stale
        fake.clear_faults()
        await eventually(lambda: r.service("api"), timeout=10, what="followed again after the bad answers")


async def test_the_first_sync_of_many_services_keeps_the_loop_serving(tmp_path: Path) -> None:
    # A datacenter's sync path once every health watch has read: 60k services replace the part in steps
    # (held 44-52 ms of loop CPU at most; in one call 188-194 ms; at 100k the steps' last one came to ~95 ms).
    # An answer that comes while the replace yields is written after it, in the same version.
    import dataclasses

    from adapters.consul.mapping import Naming
    from adapters.consul.registry import _Datacenter, _Watch
    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Port

    config = ConsulConfig.model_validate({"kind": "consul", "name": "test", "address": "127.0.0.1:1"})
    index = Index([SOURCE])
    dc = _Datacenter(
        ConsulRegistry(config, tmp_path), "dc1", index.writer(SOURCE).part("dc1"), Naming(SOURCE, "consul", "dc1")
    )
    n = 60_000
    port = (Port(80, "http", PortProtocol.HTTP),)
    for i in range(n):
        watch = dc._watches[f"s{i}"] = _Watch(f"s{i}")
        ep = Endpoint(f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", ports={"http": 8080}, source=SOURCE)
        svc = Service(hostname=Hostname(f"s{i}.service.dc1.consul"), ports=port, endpoints=(ep,), source=SOURCE)
        watch.built = svc
        watch.first.set()
    dc._tg = asyncio.TaskGroup()  # no watch is started: every service has one
    moved = dc._watches["s5"]
    gone = dc._watches["s6"]
    moved_to = dataclasses.replace(moved.built, endpoints=(Endpoint("10.99.0.5", ports={"http": 8080}, source=SOURCE),))  # type: ignore[arg-type]

    async def answers() -> None:  # what _apply does before the sync: the watch alone is updated
        for _ in range(5):
            await asyncio.sleep(0)
        moved.built, gone.built = moved_to, None

    task = asyncio.create_task(answers())
    async with watching_the_loop(index) as watch:
        await dc._reconcile(frozenset(dc._watches))
    await task
    assert watch.longest < 0.1, f"the loop was held for {watch.longest * 1000:.0f} ms of CPU"
    assert len(watch.gaps) > 20, "the sync never yielded to the loop"
    assert [len(s.services) for s in watch.seen] == [0, n - 1]
    snap = watch.seen[1]
    assert snap.version == watch.seen[0].version + 1 and snap.ready
    assert snap.services[Hostname("s5.service.dc1.consul")].endpoints[0].address == "10.99.0.5"
    assert Hostname("s6.service.dc1.consul") not in snap.services
