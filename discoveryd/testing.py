"""What an adapter author tests with: the adapter contract suite and an in-memory registry.

The contract suite (`AdapterContract`) is what every registry adapter owes the
daemon, checked against a real `Index`; a third-party adapter found through
the `discoveryd.adapters` entry points runs it too:

    from discoveryd.testing import AdapterContract

    class TestMyAdapter(AdapterContract):
        @pytest.fixture
        def harness(self) -> MyHarness:   # implements `Harness`
            return MyHarness(...)

Data flow: the harness drives the registry behind the adapter (a real server,
or a faithful fake); the adapter writes through a recording `ShardWriter`
proxy into an `Index`; the checks read only published snapshots. Harnesses
that can also simulate an outage (`OutageHarness`: the registry stops
answering, then comes back) or a reset (`ResetHarness`: the registry comes
back as a new, different cluster at the same address) get the failure-mode
checks; for the others those tests are skipped, saying why.

`MemoryRegistry` is a registry whose backend is a `MemoryBackend` in this
process: for tests of the daemon that need a registry they can steer (sync,
fail, recover, change) without a server. `MemoryHarness` runs the contract
suite against it. Everything here runs on one event loop; requires pytest.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pytest

from discoveryd.index import Index, ShardStatus, Snapshot
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Problem, Service, SourceId
from discoveryd.registry import AdapterSpec, Registry, RegistryConfig, ShardWriter

__all__ = [
    "MEMORY",
    "AdapterContract",
    "Harness",
    "MemoryBackend",
    "MemoryConfig",
    "MemoryHarness",
    "MemoryRegistry",
    "OutageHarness",
    "RecordingShard",
    "ResetHarness",
    "eventually",
]


async def eventually(
    probe: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Call `probe` (sync or async) until it returns a truthy value (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


# -- what a harness provides -------------------------------------------------------------


class Harness(Protocol):
    def registry(self) -> Registry:
        """A new Registry under test, configured against the backend."""

    async def put(self, service: str, endpoints: list[tuple[str, int]]) -> Hostname:
        """Register (or replace) `service` with these IPv4 `ip:port` endpoints in the backend.

        Returns the hostname under which the adapter must publish it.
        """

    async def remove(self, service: str) -> None:
        """Remove `service` and all its endpoints (and any broken input written for it) from the backend."""

    async def put_broken(self, service: str) -> None:
        """Write input for `service` that the adapter cannot parse."""


@runtime_checkable
class OutageHarness(Protocol):
    """A harness that can make the registry unreachable and bring it back, its data intact."""

    async def outage(self) -> None:
        """From now on the adapter cannot reach the registry (connections refused or cut)."""

    async def restore(self) -> None:
        """The registry answers again; what `put`/`remove` did meanwhile is there."""


@runtime_checkable
class ResetHarness(Protocol):
    """A harness that can replace the registry by a new, empty one at the same address."""

    async def reset(self) -> None:
        """The registry restarts empty (a new cluster, e.g. etcd on a new data dir); `put` works after."""


# -- a ShardWriter proxy that checks every published version ---------------------------------


class RecordingShard:
    """Forwards to a real writer and calls `check(snapshot)` after every call that may publish.

    Writes outside a batch publish at once, a batch publishes on exit: checking
    after each call sees every version this adapter publishes (the relist
    checks use it to catch a transient delete).
    """

    def __init__(self, inner: ShardWriter, index: Index, check: Callable[[Snapshot], None]) -> None:
        self._inner, self._index, self._check = inner, index, check
        self._depth = 0

    def _after(self) -> None:
        if not self._depth:
            self._check(self._index.snapshot)

    @property
    def source(self) -> SourceId:
        return self._inner.source

    @property
    def part_name(self) -> str:
        return self._inner.part_name

    def part(self, name: str) -> ShardWriter:
        return RecordingShard(self._inner.part(name), self._index, self._check)

    def close_part(self, name: str) -> None:
        self._inner.close_part(name)
        self._after()

    def replace(self, services: Iterable[Service]) -> None:
        self._inner.replace(services)
        self._after()

    def upsert(self, service: Service) -> None:
        self._inner.upsert(service)
        self._after()

    def delete(self, hostname: Hostname) -> None:
        self._inner.delete(hostname)
        self._after()

    def mark_synced(self) -> None:
        self._inner.mark_synced()
        self._after()

    def mark_failing(self, error: str) -> None:
        self._inner.mark_failing(error)
        self._after()

    def set_problems(self, scope: str, problems: Sequence[Problem]) -> None:
        self._inner.set_problems(scope, problems)
        self._after()

    @property
    def resume_point(self) -> str | None:
        return self._inner.resume_point

    def set_resume_point(self, value: str) -> None:
        self._inner.set_resume_point(value)

    def batch(self) -> AbstractContextManager[None]:
        return self._batch()

    @contextmanager
    def _batch(self) -> Iterator[None]:
        self._depth += 1
        try:
            with self._inner.batch():
                yield
        finally:
            self._depth -= 1
        self._after()


def _endpoints(snap: Snapshot, host: Hostname) -> set[tuple[str, int]] | None:
    svc = snap.services.get(host)
    if svc is None:
        return None
    out = set()
    for ep in svc.endpoints:
        for port in svc.ports or ():
            out.add((ep.address, ep.port_for(port)))
    return out


@dataclass(slots=True)
class _Run:
    index: Index
    registry: Registry
    task: asyncio.Task[None]
    violations: list[str] = field(default_factory=list)
    must_stay: dict[Hostname, set[tuple[str, int]]] = field(default_factory=dict)

    @property
    def source(self) -> SourceId:
        return self.registry.config.source

    def status(self) -> ShardStatus:
        return self.index.snapshot.shards[self.source]


def _start(harness: Harness) -> _Run:
    """Run a new registry from `harness` against a new Index, every published version checked."""
    index = Index()
    registry = harness.registry()
    source = registry.config.source
    must_stay: dict[Hostname, set[tuple[str, int]]] = {}
    violations: list[str] = []

    def check(snap: Snapshot) -> None:
        for host, wanted in must_stay.items():
            got = _endpoints(snap, host)
            if got is None or not wanted <= got:
                violations.append(f"version {snap.version}: {host} had {got}, expected at least {wanted}")

    shard = RecordingShard(index.writer(source), index, check)
    task = asyncio.create_task(registry.run(shard), name=f"contract:{source}")
    return _Run(index, registry, task, violations, must_stay)


async def _stop(run: _Run) -> None:
    """Cancel the adapter: it must end with CancelledError (a deadline generous for a loaded machine)."""
    run.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run.task, timeout=30)


class AdapterContract:
    """Subclass and provide a `harness` fixture (see the module docstring)."""

    @pytest.fixture
    async def running(self, harness: Harness) -> AsyncIterator[tuple[Harness, Index]]:
        run = _start(harness)
        try:
            yield harness, run.index
        finally:
            await _stop(run)

    async def test_existing_services_arrive_with_first_sync(self, harness: Harness) -> None:
        host = await harness.put("alpha", [("10.0.0.1", 8080), ("10.0.0.2", 8080)])
        run = _start(harness)
        try:
            await eventually(lambda: run.index.snapshot.ready, what="first sync")
            status = run.status()
            assert status.synced and not status.stale
            assert _endpoints(run.index.snapshot, host) == {("10.0.0.1", 8080), ("10.0.0.2", 8080)}
            svc = run.index.snapshot.services[host]
            assert svc.source == run.source
            assert all(ep.source == run.source for ep in svc.endpoints)
        finally:
            await _stop(run)

    async def test_add_change_delete_are_reflected(self, running: tuple[Harness, Index]) -> None:
        harness, index = running
        await eventually(lambda: index.snapshot.ready, what="first sync")
        host = await harness.put("beta", [("10.0.1.1", 9000)])
        await eventually(lambda: _endpoints(index.snapshot, host) == {("10.0.1.1", 9000)}, what="add")
        await harness.put("beta", [("10.0.1.1", 9000), ("10.0.1.2", 9000)])
        await eventually(
            lambda: _endpoints(index.snapshot, host) == {("10.0.1.1", 9000), ("10.0.1.2", 9000)}, what="change"
        )
        version = index.snapshot.version
        await harness.remove("beta")
        await eventually(lambda: host not in index.snapshot.services, what="delete")
        assert index.snapshot.version > version
        assert host in (index.changed_between(version, index.snapshot.version) or ())

    async def test_bad_input_is_reported_skipped_and_cleared(self, running: tuple[Harness, Index]) -> None:
        harness, index = running
        good = await harness.put("gamma", [("10.0.2.1", 80)])
        await eventually(lambda: _endpoints(index.snapshot, good) == {("10.0.2.1", 80)}, what="good service")
        await harness.put_broken("delta")
        await eventually(lambda: any(st.problems for st in index.snapshot.shards.values()), what="problem reported")
        # The good service is still served, and the adapter still follows changes.
        assert _endpoints(index.snapshot, good) == {("10.0.2.1", 80)}
        await harness.put("gamma", [("10.0.2.2", 80)])
        await eventually(lambda: _endpoints(index.snapshot, good) == {("10.0.2.2", 80)}, what="change after bad input")
        # Removing the bad input clears its problem.
        await harness.remove("delta")
        await eventually(lambda: not any(st.problems for st in index.snapshot.shards.values()), what="problem cleared")

    async def test_cancellation_stops_cleanly(self, harness: Harness) -> None:
        run = _start(harness)
        await eventually(lambda: run.index.snapshot.ready, what="first sync")
        await _stop(run)

    # -- failure modes (harnesses with outage/restore/reset hooks) ---------------------------

    async def test_outage_keeps_content_marked_stale(self, harness: Harness) -> None:
        if not isinstance(harness, OutageHarness):
            pytest.skip("this harness cannot simulate an outage (no outage/restore hooks)")
        host = await harness.put("omega", [("10.0.3.1", 80)])
        run = _start(harness)
        try:
            await eventually(lambda: run.status().synced, what="first sync")
            await harness.outage()
            await eventually(lambda: run.status().stale, what="stale during the outage")
            assert _endpoints(run.index.snapshot, host) == {("10.0.3.1", 80)}, "content kept while stale"
            assert run.status().last_error
            await harness.restore()
            await eventually(lambda: not run.status().stale and run.status().synced, what="fresh after restore")
            assert _endpoints(run.index.snapshot, host) == {("10.0.3.1", 80)}
        finally:
            await _stop(run)

    async def test_first_failure_is_reported(self, harness: Harness) -> None:
        if not isinstance(harness, OutageHarness):
            pytest.skip("this harness cannot simulate an outage (no outage/restore hooks)")
        await harness.put("sigma", [("10.0.4.1", 80)])
        await harness.outage()
        run = _start(harness)
        try:
            await eventually(lambda: run.status().failed, what="first failure reported")
            status = run.status()
            assert status.last_error and not status.synced and status.stale
            assert not status.ready and not run.index.snapshot.ready  # a failure alone is not ready
            await harness.restore()
            await eventually(lambda: run.status().synced and run.index.snapshot.ready, what="synced after restore")
        finally:
            await _stop(run)

    async def test_relist_after_outage_replaces_without_transient_delete(self, harness: Harness) -> None:
        if not isinstance(harness, OutageHarness):
            pytest.skip("this harness cannot simulate an outage (no outage/restore hooks)")
        kept = await harness.put("kept", [("10.0.5.1", 80)])
        gone = await harness.put("gone", [("10.0.5.2", 80)])
        run = _start(harness)
        try:
            await eventually(lambda: run.status().synced and gone in run.index.snapshot.services, what="first sync")
            await harness.outage()
            await eventually(lambda: run.status().stale, what="stale")
            await harness.remove("gone")
            added = await harness.put("added", [("10.0.5.3", 80)])
            await harness.put("kept", [("10.0.5.1", 80), ("10.0.5.4", 80)])
            # From here on, every version the adapter publishes must still serve `kept`'s first endpoint.
            run.must_stay[kept] = {("10.0.5.1", 80)}
            await harness.restore()
            await eventually(
                lambda: (
                    not run.status().stale
                    and gone not in run.index.snapshot.services
                    and _endpoints(run.index.snapshot, added) == {("10.0.5.3", 80)}
                    and _endpoints(run.index.snapshot, kept) == {("10.0.5.1", 80), ("10.0.5.4", 80)}
                ),
                what="relist applied",
            )
            assert not run.violations, run.violations
        finally:
            await _stop(run)

    async def test_reset_registry_is_relisted(self, harness: Harness) -> None:
        if not isinstance(harness, ResetHarness):
            pytest.skip("this harness cannot reset its registry (no reset hook)")
        old = await harness.put("before-reset", [("10.0.6.1", 80)])
        run = _start(harness)
        try:
            await eventually(lambda: old in run.index.snapshot.services, what="first sync")
            await harness.reset()
            new = await harness.put("after-reset", [("10.0.6.2", 80)])
            await eventually(
                lambda: old not in run.index.snapshot.services and new in run.index.snapshot.services,
                timeout=30,
                what="the new cluster's content replaces the old",
            )
        finally:
            await _stop(run)


# -- the in-memory registry ---------------------------------------------------------------


class MemoryConfig(RegistryConfig):
    """Config of a `MemoryRegistry`: `kind: memory`, a name, the DNS domain its services live under."""

    domain: str = "memory.test"


@dataclass(slots=True, eq=False)
class MemoryBackend:
    """The registry a `MemoryRegistry` reads: services by name, an `up` switch, a change signal.

    Owned by the test; every change wakes the registries reading it. `broken`
    names hold input the registry reports as a problem. `epoch` grows on
    `reset()` (a new cluster): a registry relists when it sees it change.
    """

    services: dict[str, Service] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    up: bool = True
    epoch: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def put(self, service: Service, name: str | None = None) -> None:
        self.services[name or service.hostname] = service
        self.broken.discard(name or service.hostname)
        self.notify()

    def remove(self, name: str) -> None:
        self.services.pop(name, None)
        self.broken.discard(name)
        self.notify()

    def set_up(self, up: bool) -> None:
        self.up = up
        self.notify()

    def reset(self) -> None:
        self.services.clear()
        self.broken.clear()
        self.epoch += 1
        self.notify()


class MemoryRegistry:
    """A `Registry` over a `MemoryBackend`: full sync, follow changes, fail while the backend is down.

    While down it marks the shard failing once per outage and waits; when back
    it lists again and replaces the shard in one call (never a delete then an
    add), then marks it synced. Cancellation is the only way out of `run`.
    """

    def __init__(self, config: MemoryConfig, backend: MemoryBackend) -> None:
        self._config = config
        self.backend = backend

    @property
    def config(self) -> MemoryConfig:
        return self._config

    @property
    def source(self) -> SourceId:
        return self._config.source

    async def run(self, shard: ShardWriter) -> None:
        backend = self.backend
        failing = False
        while True:
            waiter = asyncio.ensure_future(backend.changed())
            try:
                if not backend.up:
                    if not failing:
                        shard.mark_failing(f"{self.source}: backend is down")
                        failing = True
                else:
                    failing = False
                    with shard.batch():
                        shard.replace(backend.services.values())
                        shard.set_problems(
                            "input", [Problem(f"memory:{name}", "cannot parse") for name in sorted(backend.broken)]
                        )
                        shard.mark_synced()
                await waiter
            finally:
                waiter.cancel()


MEMORY: AdapterSpec[MemoryConfig] = AdapterSpec(
    kind="memory",
    config_model=MemoryConfig,
    factory=lambda cfg, ctx: MemoryRegistry(cfg, MemoryBackend()),
)
"""An `AdapterSpec` for the memory registry (each instance gets its own empty backend)."""


class MemoryHarness:
    """Runs the contract suite against `MemoryRegistry`, with every hook."""

    def __init__(self, name: str = "contract") -> None:
        self.backend = MemoryBackend()
        self.config = MemoryConfig(kind="memory", name=name)

    def registry(self) -> Registry:
        return MemoryRegistry(self.config, self.backend)

    def _host(self, service: str) -> Hostname:
        return Hostname(f"{service}.{self.config.domain}")

    async def put(self, service: str, endpoints: list[tuple[str, int]]) -> Hostname:
        host = self._host(service)
        self.backend.put(
            Service(
                host,
                ports=(Port(80, "http", PortProtocol.HTTP),),
                endpoints=tuple(Endpoint(ip, ports={"http": port}) for ip, port in endpoints),
            ),
            service,
        )
        return host

    async def remove(self, service: str) -> None:
        self.backend.remove(service)

    async def put_broken(self, service: str) -> None:
        self.backend.services.pop(service, None)
        self.backend.broken.add(service)
        self.backend.notify()

    async def outage(self) -> None:
        self.backend.set_up(False)

    async def restore(self) -> None:
        self.backend.set_up(True)

    async def reset(self) -> None:
        self.backend.reset()
