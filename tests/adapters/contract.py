"""The contract every registry adapter passes.

An adapter's test module subclasses `AdapterContract` and provides the
`harness` fixture: an object implementing `Harness` that drives the real (or,
for Kubernetes and Consul, faithfully faked) registry behind the adapter.
The suite then runs the adapter against a real `Index` and checks what every
adapter owes the daemon: the first full sync, adds, changes and deletes
reflected, bad input reported and skipped without losing other data, and a
clean stop on cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import pytest

from discoveryd.index import Index
from discoveryd.model import Hostname
from discoveryd.registry import Registry
from tests.helpers import eventually


class Harness(Protocol):
    def registry(self) -> Registry:
        """A new Registry under test, configured against the backend."""

    async def put(self, service: str, endpoints: list[tuple[str, int]]) -> Hostname:
        """Register (or replace) `service` with these IPv4 `ip:port` endpoints in the backend.

        Returns the hostname under which the adapter must publish it.
        """

    async def remove(self, service: str) -> None:
        """Remove `service` and all its endpoints from the backend."""

    async def put_broken(self, service: str) -> None:
        """Write input for `service` that the adapter cannot parse."""


def _endpoints(index: Index, host: Hostname) -> set[tuple[str, int]] | None:
    svc = index.snapshot.services.get(host)
    if svc is None:
        return None
    out = set()
    for ep in svc.endpoints:
        for port in svc.ports or ():
            out.add((ep.address, ep.port_for(port)))
    return out


class AdapterContract:
    """Subclass and provide a `harness` fixture."""

    @pytest.fixture
    async def running(self, harness: Harness) -> AsyncIterator[tuple[Harness, Index]]:
        index = Index()
        registry = harness.registry()
        shard = index.writer(registry.config.source)
        task = asyncio.create_task(registry.run(shard), name=f"contract:{registry.config.source}")
        try:
            yield harness, index
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def test_existing_services_arrive_with_first_sync(self, harness: Harness) -> None:
        host = await harness.put("alpha", [("10.0.0.1", 8080), ("10.0.0.2", 8080)])
        index = Index()
        registry = harness.registry()
        task = asyncio.create_task(registry.run(index.writer(registry.config.source)))
        try:
            await eventually(lambda: index.snapshot.ready, what="first sync")
            status = index.snapshot.shards[registry.config.source]
            assert status.synced and not status.stale
            assert _endpoints(index, host) == {("10.0.0.1", 8080), ("10.0.0.2", 8080)}
            svc = index.snapshot.services[host]
            assert svc.source == registry.config.source
            assert all(ep.source == registry.config.source for ep in svc.endpoints)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def test_add_change_delete_are_reflected(self, running: tuple[Harness, Index]) -> None:
        harness, index = running
        await eventually(lambda: index.snapshot.ready, what="first sync")
        host = await harness.put("beta", [("10.0.1.1", 9000)])
        await eventually(lambda: _endpoints(index, host) == {("10.0.1.1", 9000)}, what="add")
        await harness.put("beta", [("10.0.1.1", 9000), ("10.0.1.2", 9000)])
        await eventually(lambda: _endpoints(index, host) == {("10.0.1.1", 9000), ("10.0.1.2", 9000)}, what="change")
        version = index.snapshot.version
        await harness.remove("beta")
        await eventually(lambda: host not in index.snapshot.services, what="delete")
        assert index.snapshot.version > version
        assert host in (index.changed_between(version, index.snapshot.version) or ())

    async def test_bad_input_is_reported_and_skipped(self, running: tuple[Harness, Index]) -> None:
        harness, index = running
        good = await harness.put("gamma", [("10.0.2.1", 80)])
        await eventually(lambda: _endpoints(index, good) == {("10.0.2.1", 80)}, what="good service")
        await harness.put_broken("delta")
        await eventually(lambda: any(st.problems for st in index.snapshot.shards.values()), what="problem reported")
        # The good service is still served, and the adapter still follows changes.
        assert _endpoints(index, good) == {("10.0.2.1", 80)}
        await harness.put("gamma", [("10.0.2.2", 80)])
        await eventually(lambda: _endpoints(index, good) == {("10.0.2.2", 80)}, what="change after bad input")

    async def test_cancellation_stops_cleanly(self, harness: Harness) -> None:
        index = Index()
        registry = harness.registry()
        task = asyncio.create_task(registry.run(index.writer(registry.config.source)))
        await eventually(lambda: index.snapshot.ready, what="first sync")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
