"""The supervisor's guard around adapters: a crash is logged, marked failing, and the adapter restarted."""

from __future__ import annotations

import asyncio

import pytest

from discoveryd import supervisor
from discoveryd.index import Index
from discoveryd.model import Hostname, Service, SourceId
from discoveryd.registry import RegistryConfig, ShardWriter
from tests.helpers import eventually


class Flaky:
    """Crashes on its first run, then syncs one service and waits to be cancelled."""

    def __init__(self) -> None:
        self.config = RegistryConfig(kind="test", name="flaky")
        self.runs = 0

    async def run(self, shard: ShardWriter) -> None:
        self.runs += 1
        if self.runs == 1:
            raise ValueError("bad input")
        shard.replace([Service(Hostname("a.example"))])
        shard.mark_synced()
        await asyncio.Event().wait()


async def test_a_crashing_adapter_is_marked_failing_and_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "_RESTART_MIN", 0.01)
    index = Index()
    flaky = Flaky()
    source = SourceId("test/flaky")
    task = asyncio.create_task(supervisor._guard(flaky, index.writer(source)))
    try:
        await eventually(lambda: flaky.runs == 2 and "a.example" in index.snapshot.services, what="restarted")
        status = index.snapshot.shards[source]
        assert status.last_error == "adapter crashed: ValueError('bad input')"
        assert status.synced and not status.stale
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
