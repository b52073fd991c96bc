"""Shared test helpers: waiting on conditions with a deadline, free loopback ports, loop stalls."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from discoveryd import testing
from discoveryd.index import Index, Snapshot

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]], timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Call `probe` until it returns a truthy value (returned) or `timeout` passes (AssertionError).

    `probe` may be sync or async; an exception counts as "not yet" and is shown if time runs out.
    The typed face of `discoveryd.testing.eventually`, with a shorter default deadline.
    """
    return await testing.eventually(probe, timeout, interval, what)


def wait_sync(probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Blocking twin of `eventually`, for tests driving subprocesses."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on `host` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, other) as s2:
                s2.bind((host, port))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port")


@dataclass
class LoopWatch:
    """What `watching_the_loop` saw: the gaps between its ticks and every index snapshot it met."""

    gaps: list[float] = field(default_factory=list)
    """CPU time of the loop thread between two ticks (other processes' load does not count)."""
    seen: list[Snapshot] = field(default_factory=list)
    """Each snapshot version the ticker met, in order (the first is the one before the work)."""

    @property
    def longest(self) -> float:
        return max(self.gaps, default=0.0)


@asynccontextmanager
async def watching_the_loop(index: Index) -> AsyncIterator[LoopWatch]:
    """Tick on the event loop while the body runs: how long the loop was held, and which worlds readers saw.

    The cyclic garbage collector is off meanwhile: a full collection costs what the whole heap costs
    (0.15 s for the objects of 60k Kubernetes Services and their slices), whenever it comes, whatever
    runs then; the gaps measure the work of the body itself.
    """
    watch = LoopWatch(seen=[index.snapshot])
    done = False
    collector = gc.isenabled()
    gc.disable()

    async def ticker() -> None:
        last = time.thread_time()
        while not done:
            await asyncio.sleep(0)
            now = time.thread_time()
            watch.gaps.append(now - last)
            last = now
            snap = index.snapshot
            if snap.version != watch.seen[-1].version:
                watch.seen.append(snap)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        yield watch
    finally:
        done = True
        await task
        if collector:
            gc.enable()
        if index.snapshot.version != watch.seen[-1].version:
            watch.seen.append(index.snapshot)
