"""The shared session loop: backoff with jitter, failing marked before each wait, reset after health, no spinning."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from discoveryd.index import Index
from discoveryd.model import SourceId
from discoveryd.session import Backoff, SessionState, run_sessions

SOURCE = SourceId("test/session")


def test_delay_doubles_up_to_the_maximum_with_equal_jitter() -> None:
    backoff = Backoff(initial=0.2, maximum=3.0)
    for failures, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (5, 3.0), (500, 3.0)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling / 10, "jittered"


async def test_failing_is_marked_before_each_wait_and_the_loop_never_spins() -> None:
    index = Index()
    shard = index.writer(SOURCE)
    starts: list[float] = []
    errors_seen: list[str | None] = []
    enough = asyncio.Event()

    async def session(state: SessionState) -> None:
        starts.append(time.monotonic())
        if len(starts) >= 6:
            enough.set()
        errors_seen.append(index.snapshot.shards[SOURCE].last_error if starts[1:] else None)
        raise ConnectionRefusedError(f"refused #{len(starts)}")

    backoff = Backoff(initial=0.0, maximum=0.0, min_spacing=0.05)
    task = asyncio.create_task(run_sessions(shard, session, backoff=backoff, what="test"))
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.045, gaps  # a zero delay still keeps the minimum spacing
    assert errors_seen[1:5] == [f"refused #{i}" for i in range(1, 5)]  # marked before the wait that preceded it
    assert index.snapshot.shards[SOURCE].stale


async def test_a_session_that_stayed_healthy_resets_the_backoff() -> None:
    index = Index()
    shard = index.writer(SOURCE)
    starts: list[float] = []
    healthy_run = 6  # the 6th session becomes healthy and lasts
    enough = asyncio.Event()

    async def session(state: SessionState) -> None:
        starts.append(time.monotonic())
        if len(starts) >= healthy_run + 2:
            enough.set()
        if len(starts) == healthy_run:
            state.healthy()
            await asyncio.sleep(0.15)
        raise OSError("lost")

    backoff = Backoff(initial=0.01, maximum=10.0, healthy_after=0.1, min_spacing=0.0)
    task = asyncio.create_task(run_sessions(shard, session, backoff=backoff))
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Before: 0.005-0.01, ..., the 5th failure waits at least 0.08 s. After the healthy session: back to <= 0.01 s
    # (plus scheduling), far below the 0.16 s the 6th failure in a row would have waited.
    assert gaps[4] >= 0.08
    assert gaps[healthy_run] < 0.06, gaps


async def test_errors_outside_retry_on_end_the_loop() -> None:
    index = Index()

    async def session(state: SessionState) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await asyncio.wait_for(
            run_sessions(index.writer(SOURCE), session, retry_on=(OSError,), backoff=Backoff(initial=0.01)), 5
        )
