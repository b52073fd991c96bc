"""The one reconnect policy: a loop of sessions with exponential backoff and jitter (tenacity).

Every long-running loop to a registry, and the supervisor's restart guard
around each adapter, runs through `run_sessions`:

  loop: session(state) ── connect → full sync → follow, until it fails ──┐
        ^                                                                 │
        └── sleep (backoff with jitter) ── shard.mark_failing(reason) <───┘

- A session is an async callable the adapter provides. It calls
  `state.healthy()` once it has reached its steady state (synced and
  following). It ends by raising; returning is treated as a failure too
  (a session is meant to follow until cancelled).
- Before each sleep the shard is marked failing (its content is kept and
  shown stale) and one warning is logged.
- The delay doubles from `Backoff.initial` up to `Backoff.maximum`, with
  "equal jitter" (half fixed, half random) so that many replicas that lost
  the same registry do not reconnect in step.
- A session that stayed healthy for `Backoff.healthy_after` resets the
  backoff: the next attempt waits `initial` again.
- No two sessions start less than `Backoff.min_spacing` apart, even after a
  reset or with a zero delay: the loop never spins.
- Exceptions not in `retry_on` end the loop (they are bugs: the supervisor's
  guard restarts the adapter); cancellation ends it at once.

Runs in the caller's task; owns no other task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import tenacity

from discoveryd.registry import ShardWriter

__all__ = ["Backoff", "SessionEnded", "SessionState", "run_sessions"]

log = logging.getLogger("discoveryd.session")


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait between sessions (seconds)."""

    initial: float = 0.2
    maximum: float = 30.0
    healthy_after: float = 5.0
    """A session healthy this long resets the backoff."""
    min_spacing: float = 0.1
    """The least time between the starts of two sessions."""

    def delay(self, failures: int) -> float:
        """The sleep after the `failures`-th failure in a row (1-based): half fixed, half random."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(failures - 1, 62))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))


class SessionEnded(Exception):
    """A session returned instead of following until cancelled."""


class SessionState:
    """Handed to one session; the loop reads it when the session ends. Used from the loop's task only."""

    __slots__ = ("healthy_since", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.healthy_since: float | None = None

    def healthy(self) -> None:
        """The session reached its steady state (synced, following): its later loss may reset the backoff."""
        if self.healthy_since is None:
            self.healthy_since = time.monotonic()

    def stayed_healthy(self, backoff: Backoff) -> bool:
        return self.healthy_since is not None and time.monotonic() - self.healthy_since >= backoff.healthy_after


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class _Wait(tenacity.wait.wait_base):
    """The backoff of `Backoff`, counted from the last healthy session, never closer than `min_spacing`."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.failures = 0
        self.state = SessionState()

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        self.failures = 1 if self.state.stayed_healthy(self.backoff) else self.failures + 1
        delay = self.backoff.delay(self.failures)
        since_start = time.monotonic() - self.state.started
        return max(delay, self.backoff.min_spacing - since_start)


async def run_sessions(
    shard: ShardWriter,
    session: Callable[[SessionState], Awaitable[object]],
    *,
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    describe: Callable[[BaseException], str] = _describe,
    what: str = "registry",
    logger: logging.Logger | None = None,
    traceback: bool = False,
) -> NoReturn:
    """Run `session` again and again until cancelled (see the module docstring).

    `describe` turns a failure into the reason given to `mark_failing` and the
    log; `what` names the loop in the log (`etcd files/main`); `traceback`
    logs failures with their traceback (for crashes, which are bugs).
    """
    policy = backoff or Backoff()
    out = logger or log
    wait = _Wait(policy)

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        reason = describe(error) if error is not None else "session ended"
        delay = retry_state.upcoming_sleep
        exc_info = error if traceback and error is not None and not isinstance(error, SessionEnded) else None
        out.warning("%s %s: %s; retrying in %.2fs", what, shard.source, reason, delay, exc_info=exc_info)
        shard.mark_failing(reason)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_never,
        wait=wait,
        retry=tenacity.retry_if_exception_type((*retry_on, SessionEnded)),
        before_sleep=before_sleep,
        sleep=asyncio.sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            wait.state = SessionState()
            await session(wait.state)
            raise SessionEnded("session ended")
    raise AssertionError("unreachable: the retry loop never stops")  # pragma: no cover
