"""Follow a Consul agent's catalog and health through blocking queries, one shard part per datacenter.

Data flow, all in the registry's task (`run`) and the tasks of its TaskGroups:

1. `/v1/agent/self` names the agent's own datacenter (the shared session
   loop, `discoveryd.session.run_sessions`, retries it with backoff and
   marks the root shard failing meanwhile). The configured datacenters
   (empty: that one) each get a part of the shard, `shard.part(<dc>)`, and a
   `_Datacenter` task, so one unreachable datacenter is stale alone.
2. A datacenter's catalog watch runs a blocking query on
   `/v1/catalog/services`. The first answer starts one health watch per
   service (at most `initial_concurrency` first reads at once) and, when
   every one has read once, `replace`s the part with the result in one
   staged batch (compared and merged in steps that yield to the loop, with
   the index's writers; answers meanwhile are written after it in the same
   batch) and marks it synced. Later answers start watches for new
   services and stop (cancel) those of services gone, deleting their
   hostnames.
3. A health watch runs a blocking query on `/v1/health/service/<svc>`,
   builds the `Service` (`mapping.build`) and upserts it only when it
   differs from the last one built (an index that moved says nothing
   changed for sure); no instances left deletes the hostname.

Index rules (Consul's "Blocking Queries" documentation): an answer's index
lower than the one asked with resets to 0 (the next read does not block and
starts over); an index of 0 or less is used as 1; every watch waits at least
`min_interval` between two requests, so a churning service costs the agent
at most 1/min_interval requests per second.

Errors: every watch retries on its own with tenacity, with the daemon's
backoff policy (`discoveryd.session.Backoff`; a 429's Retry-After is a floor); a 403 is logged
as an ACL problem and retried after `acl_retry` (the token is re-read
first, so a rotated token heals it). While any watch of a datacenter fails,
its part is marked failing (content kept, stale); when all succeed again it
is marked synced. When the catalog watch cannot reach the agent (or gets
429/5xx), the health watches of that datacenter, after their own backoff,
also wait for it to succeed once before asking again: an outage costs about
one request per backoff period, not one per service.

Cancellation (config reload, shutdown) cancels the TaskGroups; the client
session is closed on the way out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from adapters.consul.client import ConsulClient, ConsulError, ConsulHTTPError, ConsulUnavailable, Reply, read_token
from adapters.consul.config import ConsulConfig
from adapters.consul.mapping import Naming, build, names
from adapters.toolkit.sync import replace_all
from discoveryd.model import Problem, Service, SourceId, Zone, ZoneFlavor, hostname
from discoveryd.registry import RegistryConfig, ShardWriter
from discoveryd.session import Backoff, SessionState, run_sessions

log = logging.getLogger("discoveryd.adapters.consul")

__all__ = ["ConsulRegistry", "next_index"]

_AGENT_CONNS = 200
"""Consul's default `limits.http_max_conns_per_client`."""


def next_index(asked: int, answered: int) -> int:
    """The index for the next blocking read after asking with `asked` and being answered `answered`.

    0 means: read again without blocking (the index went backwards, so the
    agent's state was reset, and everything is read anew).
    """
    if answered <= 0:
        answered = 1
    if answered < asked:
        return 0
    return answered


class _Gate:
    """Whether a datacenter's catalog watch last reached the agent; health watches wait on it after an outage."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


def _gated(error: BaseException | None) -> bool:
    """Errors that say the agent (or the datacenter) is unusable as a whole, not this one read."""
    if isinstance(error, ConsulUnavailable):
        return True
    return isinstance(error, ConsulHTTPError) and (error.status == 429 or error.status >= 500)


@dataclass(slots=True)
class _Watch:
    """One service's health watch; owned by its `_Datacenter`."""

    name: str
    task: asyncio.Task[None] | None = None
    first: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after the first read, successful or not."""
    built: Service | None = None
    problems: tuple[Problem, ...] = ()


class _Datacenter:
    """The watches of one datacenter and the part they write. Every method runs in the registry's loop."""

    def __init__(self, registry: ConsulRegistry, dc: str, part: ShardWriter, naming: Naming) -> None:
        self._registry = registry
        self._config = registry.consul_config
        self._dc = dc
        self._part = part
        self._naming = naming
        self._watches: dict[str, _Watch] = {}
        self._skipped: set[str] = set()
        """Services whose name cannot be a hostname (their problem is reported once)."""
        self._failing: dict[str, str] = {}
        self._synced = False
        self._gate = _Gate()
        self._first_reads = asyncio.Semaphore(self._config.initial_concurrency)
        self._tg: asyncio.TaskGroup | None = None

    # ---- sync state -------------------------------------------------------------------------

    def _fail(self, loop: str, error: BaseException) -> None:
        """Report a failed read of `loop`; one warning when the datacenter starts failing, not one per watch."""
        reason = str(error) or type(error).__name__
        first = not self._failing
        self._failing[loop] = reason
        self._part.mark_failing(f"{self._dc}: {reason}")
        log.log(logging.WARNING if first else logging.DEBUG, "consul %s %s: %s", self._part.source, self._dc, reason)

    def _ok(self, loop: str) -> None:
        if self._failing.pop(loop, None) is not None and not self._failing:
            log.info("consul %s %s: every watch answers again", self._part.source, self._dc)
            if self._synced:
                self._part.mark_synced()

    # ---- the loops --------------------------------------------------------------------------

    async def _retrying(self, loop: str, read: Callable[[], Awaitable[Reply]], *, gate_on_error: bool) -> Reply:
        """`read()` until it succeeds: backoff with jitter, failures reported, the gate honoured."""

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            if error is None:
                return
            if isinstance(error, ConsulHTTPError) and error.status == 403:
                self._registry.refresh_token()
            if gate_on_error and _gated(error):
                self._gate.close()
            self._fail(loop, error)

        async def sleep(seconds: float) -> None:
            await asyncio.sleep(seconds)
            if not gate_on_error:
                await self._gate.wait()

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(ConsulError),
            wait=self._registry.delay,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                reply = await read()
        if gate_on_error:
            self._gate.open()
        self._ok(loop)
        return reply

    async def run(self) -> None:
        """Watch the catalog (and, through it, every service) until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._catalog()

    async def _catalog(self) -> None:
        index, last = 0, 0.0
        current: frozenset[str] | None = None
        while True:
            last = await _pace(last, self._config.min_interval)
            asked = index
            reply = await self._retrying("catalog", functools.partial(self._read_catalog, asked), gate_on_error=True)
            index = next_index(asked, reply.index)
            if index == 0:
                log.info(
                    "consul %s %s: catalog index went back to %d; reading anew",
                    self._part.source,
                    self._dc,
                    reply.index,
                )
            found = self._service_names(reply.data)
            assert found is not None  # checked by _read_catalog
            if found != current:
                current = found
                await self._reconcile(found)

    async def _read_catalog(self, index: int) -> Reply:
        """One catalog read; an answer that is not Consul's {name: [tags]} fails (and is retried with backoff)."""
        reply = await self._registry.client.services(self._dc, index)
        if self._service_names(reply.data) is None:
            raise ConsulUnavailable("/v1/catalog/services: the answer is not an object of tag lists")
        return reply

    def _service_names(self, data: Any) -> frozenset[str] | None:
        if not isinstance(data, dict):
            return None
        wanted = self._naming.tags
        out = set()
        for name, tags in data.items():
            if not isinstance(name, str) or not isinstance(tags, list):
                return None
            if all(t in tags for t in wanted):
                out.add(name)
        return frozenset(out)

    async def _reconcile(self, found: frozenset[str]) -> None:
        """Start watches for new services, stop those of services gone; the first call syncs the part."""
        assert self._tg is not None
        for name in [n for n in self._watches if n not in found]:
            watch = self._watches.pop(name)
            self._registry.count_watches(-1)
            if watch.task is not None:
                watch.task.cancel()
            self._ok(f"service {name}")
            if watch.built is not None:
                self._part.delete(watch.built.hostname)
            if watch.problems:
                self._part.set_problems(self._scope(name), ())
        for name in self._skipped - found:
            self._skipped.discard(name)
            self._part.set_problems(self._scope(name), ())
        started: list[_Watch] = []
        for name in sorted(found):
            if name in self._watches or name in self._skipped:
                continue
            if names(name, self._dc, self._naming) is None:
                self._skipped.add(name)
                self._part.set_problems(
                    self._scope(name),
                    [Problem(self._scope(name), "the service name is not a DNS label; skipped")],
                )
                continue
            watch = self._watches[name] = _Watch(name)
            self._registry.count_watches(1)
            watch.task = self._tg.create_task(self._health(watch), name=f"consul:{self._dc}:{name}")
            started.append(watch)
        if not self._synced:
            for watch in started:
                await watch.first.wait()
            with self._part.batch():
                listed = [(w, w.built) for w in self._watches.values()]
                services = [built for _, built in listed if built is not None]
                # In steps that yield to the loop: health answers meanwhile only update their watch
                # (not synced yet), and are written after the replace, below, in the same batch.
                await replace_all(self._part, services)
                for w, built in listed:
                    if w.built is not built:
                        if w.built is not None:
                            self._part.upsert(w.built)
                        elif built is not None:
                            self._part.delete(built.hostname)
                for w in self._watches.values():
                    if w.problems:
                        self._part.set_problems(self._scope(w.name), w.problems)
                self._synced = True
                if not self._failing:
                    self._part.mark_synced()
            log.info(
                "consul %s %s: synced %d services",
                self._part.source,
                self._dc,
                sum(1 for w in self._watches.values() if w.built is not None),
            )

    def _scope(self, name: str) -> str:
        return f"{self._dc}/{name}"

    async def _health(self, watch: _Watch) -> None:
        """One service's watch; cancelled by `_reconcile` when the service leaves the catalog."""
        client = self._registry.client
        loop = f"service {watch.name}"
        tags = self._naming.tags
        index, last = 0, 0.0
        try:
            while True:
                last = await _pace(last, self._config.min_interval)
                asked = index
                read = functools.partial(client.health, watch.name, self._dc, asked, tags)
                if watch.first.is_set():
                    reply = await self._retrying(loop, read, gate_on_error=False)
                else:
                    # The first read holds a slot of the datacenter's full sync; a failure frees it
                    # (the sync goes on without this service, the part marked failing) and retries.
                    try:
                        async with self._first_reads:
                            reply = await read()
                        self._ok(loop)
                    except ConsulError as e:
                        self._fail(loop, e)
                        watch.first.set()
                        reply = await self._retrying(loop, read, gate_on_error=False)
                index = next_index(asked, reply.index)
                self._apply(watch, reply.data)
                watch.first.set()
        finally:
            watch.first.set()

    def _apply(self, watch: _Watch, rows: Any) -> None:
        built, problems = build(watch.name, self._dc, rows, self._naming, watch.built)
        previous = watch.built
        if problems != list(watch.problems):
            watch.problems = tuple(problems)
            if self._synced:
                self._part.set_problems(self._scope(watch.name), problems)
            for p in problems:
                log.warning("consul %s: %s", self._part.source, p)
        if built == previous:
            return
        watch.built = built
        if not self._synced:
            return
        if built is not None:
            self._part.upsert(built)
        elif previous is not None:
            self._part.delete(previous.hostname)


async def _pace(last: float, interval: float) -> float:
    """Sleep until `interval` after `last` (monotonic); the time the next request starts."""
    now = time.monotonic()
    if now - last < interval:
        await asyncio.sleep(interval - (now - last))
        now = time.monotonic()
    return now


class ConsulRegistry:
    """The `Registry` (and `ZoneProvider`) for one Consul agent."""

    def __init__(self, config: ConsulConfig, base_dir: Path) -> None:
        self.config: RegistryConfig = config
        self.consul_config = config
        self._base_dir = base_dir
        self._client: ConsulClient | None = None
        self._backoff = Backoff(initial=config.backoff_initial, maximum=config.backoff_max)
        self._watches = 0
        self._warned = False

    @property
    def source(self) -> SourceId:
        return self.consul_config.source

    @property
    def client(self) -> ConsulClient:
        """The client of the running `run`; only its tasks use it."""
        assert self._client is not None, "ConsulRegistry.client used outside run()"
        return self._client

    def zones(self) -> Sequence[Zone]:
        return [Zone(hostname(self.consul_config.domain), ZoneFlavor.CONSUL)]

    def delay(self, state: RetryCallState) -> float:
        """Seconds before retry number `state.attempt_number` of one watch (a tenacity `wait`).

        The daemon's one backoff policy (`discoveryd.session.Backoff`: doubling, equal jitter); after
        a 403, `acl_retry` with jitter; a 429's `Retry-After` is a floor.
        """
        cfg = self.consul_config
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, ConsulHTTPError) and error.status == 403:
            return cfg.acl_retry * random.uniform(1.0, 1.25)
        seconds = self._backoff.delay(state.attempt_number)
        if isinstance(error, ConsulHTTPError) and error.retry_after is not None:
            seconds = max(seconds, min(error.retry_after, cfg.backoff_max))
        return seconds

    def count_watches(self, delta: int) -> None:
        """Track blocking queries held at once; warn once when they pass what an agent allows by default."""
        self._watches += delta
        cfg = self.consul_config
        if self._watches + max(1, len(cfg.datacenters)) > _AGENT_CONNS and not cfg.max_connections and not self._warned:
            self._warned = True
            log.warning(
                "consul %s: %d blocking queries at once: a Consul agent allows %d connections per client by "
                "default (limits.http_max_conns_per_client); raise it there, or set max_connections here",
                self.config.source,
                self._watches,
                _AGENT_CONNS,
            )

    def refresh_token(self) -> None:
        """Re-read the token (after a 403: it may have been rotated); a read error keeps the old one."""
        try:
            token = read_token(self.consul_config, self._base_dir)
        except ConsulUnavailable as e:
            log.warning("consul %s: %s", self.config.source, e)
            return
        if self._client is not None:
            self._client.set_token(token)

    async def run(self, shard: ShardWriter) -> None:
        """Sync one part per datacenter with the agent until cancelled (see the module docstring).

        The root shard carries the bootstrap (token, `/v1/agent/self`): the shared session loop marks
        it failing while that fails, and it is marked synced again once the agent answered.
        """
        root_failed = False

        def describe(error: BaseException) -> str:
            nonlocal root_failed
            root_failed = True
            return str(error) or type(error).__name__

        async def session(state: SessionState) -> None:
            nonlocal root_failed
            await self._session(shard, state, root_failed)
            root_failed = False

        await run_sessions(
            shard, session, backoff=self._backoff, retry_on=(ConsulError,), describe=describe, what="consul", logger=log
        )

    async def _session(self, shard: ShardWriter, state: SessionState, root_failed: bool) -> None:
        """Find the agent's datacenter, then watch every configured one until cancelled (or a bootstrap error)."""
        cfg = self.consul_config
        client = ConsulClient(cfg, self._base_dir, read_token(cfg, self._base_dir))
        try:
            local = _datacenter_of(await client.agent_self())
            self._client = client
            if root_failed:
                shard.mark_synced()
            dcs = cfg.datacenters or [local]
            log.info("consul %s: agent in %s; watching %s", self.config.source, local, ", ".join(dcs))
            naming = Naming(
                source=shard.source,
                domain=cfg.domain,
                local_dc=local,
                tagged_address=cfg.tagged_address,
                zone_node_meta=cfg.zone_node_meta,
                namespace=cfg.namespace or "default",
                tags=tuple(cfg.tags),
            )
            state.healthy()
            self._watches = 0
            async with asyncio.TaskGroup() as tg:
                for dc in dcs:
                    tg.create_task(_Datacenter(self, dc, shard.part(dc), naming).run(), name=f"consul:{dc}")
        finally:
            self._client = None
            await client.close()


def _datacenter_of(reply: Reply) -> str:
    config = reply.data.get("Config") if isinstance(reply.data, dict) else None
    dc = config.get("Datacenter") if isinstance(config, dict) else None
    if not isinstance(dc, str) or not dc:
        raise ConsulUnavailable("/v1/agent/self: no Config.Datacenter in the answer")
    return dc.lower()
