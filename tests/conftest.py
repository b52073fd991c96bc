"""Fixtures shared by every test: leaked-task detection and an index to write to."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from discoveryd.index import Index

# CI runs the property tests on a fixed seed so that a landing is reproducible;
# developers' runs keep exploring new inputs (and replay failures from .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tasks that belong to libraries and outlive a test by design (grpc's aio
# poller is one per process). Matched against the coroutine's qualified name.
_ALLOWED_LEFTOVERS = ("_poll_wrapper", "_handle_callback_wrapper", "AioServer")


def _leftovers() -> list[asyncio.Task[object]]:
    current = asyncio.current_task()
    out = []
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        name = getattr(task.get_coro(), "__qualname__", "")
        if any(a in name for a in _ALLOWED_LEFTOVERS):
            continue
        out.append(task)
    return out


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running after its fixtures are torn down."""
    yield
    # Let cancelled tasks run their cleanup: a closed server's connection handlers (aiohttp's,
    # for one) finish a few loop turns later, which on a loaded machine can take a while.
    deadline = asyncio.get_running_loop().time() + 5.0
    while _leftovers():
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    else:
        return
    leaked = _leftovers()
    for task in leaked:
        task.cancel()
    pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {[repr(t.get_coro()) for t in leaked]}")


@pytest.fixture
def index() -> Index:
    return Index()
