"""Shared test helpers: waiting on conditions with a deadline, free loopback ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from discoveryd import testing

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
