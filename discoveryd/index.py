"""The endpoint index: registry shards in, immutable versioned snapshots out.

Data flow: each adapter writes its own shard through a `Shard` (the
`ShardWriter` of `discoveryd.registry`). Every write (or every `batch()`)
re-merges only the hostnames it touched and publishes a new `Snapshot`: a
version number that only grows, the merged services, the hostnames changed
since the previous version, and each shard's status.

Servers depend only on `SnapshotSource` (read the current snapshot, wait for a
newer one, ask what changed between two versions): the cache/server seam of
go-control-plane. They never see shards.

Merge rule, the only one in the daemon: a hostname reported by several
registries gets the union of their endpoints (each endpoint keeps its
`source`), and every other attribute from the registry listed first in the
config. Such a hostname is recorded as a `Conflict` in the snapshot.

A shard whose registry fails keeps its content and is marked stale; its data
is removed only by its own adapter (the registry said so) or by `drop()`
(the registry was removed from the config).

Everything here runs on the event loop thread; nothing blocks or awaits
except `wait()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from discoveryd.model import Endpoint, Hostname, Problem, Service, SourceId

_HISTORY = 4096
"""How many versions' changed-sets are kept for `changed_between`."""


@dataclass(frozen=True, slots=True)
class ShardStatus:
    source: SourceId
    services: int = 0
    endpoints: int = 0
    synced: bool = False
    """Has completed at least one full sync."""
    failed: bool = False
    """Has reported at least one failure."""
    stale: bool = False
    """The registry is failing now; the content is the last known."""
    last_sync: float | None = None
    """Wall-clock time of the last `mark_synced`."""
    last_error: str | None = None
    last_error_time: float | None = None
    problems: tuple[Problem, ...] = ()
    errors_total: int = 0
    """Failures reported since start (sync errors plus input problems set)."""

    @property
    def ready(self) -> bool:
        return self.synced or self.failed


@dataclass(frozen=True, slots=True)
class Conflict:
    """A hostname reported by more than one registry."""

    hostname: Hostname
    winner: SourceId
    sources: tuple[SourceId, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, consistent view of every registry.

    An unchanged hostname keeps the very same `Service` object from version to
    version, so `a.services.get(h) is b.services.get(h)` is a valid (and
    cheap) "unchanged" test.
    """

    version: int = 0
    services: Mapping[Hostname, Service] = field(default_factory=dict)
    changed: frozenset[Hostname] = frozenset()
    """Hostnames whose merged service differs from the previous version."""
    shards: Mapping[SourceId, ShardStatus] = field(default_factory=dict)
    conflicts: Mapping[Hostname, Conflict] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    """`time.monotonic()` when published; convergence is measured from it."""

    @property
    def ready(self) -> bool:
        """Every registry has synced once or failed once."""
        return all(s.ready for s in self.shards.values())

    def endpoint_count(self) -> int:
        return sum(len(s.endpoints) for s in self.services.values())


class SnapshotSource(Protocol):
    """The read-only face of the index that servers depend on."""

    @property
    def snapshot(self) -> Snapshot: ...

    async def wait(self, after_version: int) -> Snapshot:
        """The first snapshot with a version greater than `after_version`."""

    def changed_between(self, old_version: int, new_version: int) -> frozenset[Hostname] | None:
        """Hostnames changed in (old, new], or None when that history is gone."""


def diff(old: Snapshot, new: Snapshot) -> frozenset[Hostname]:
    """Hostnames that differ between two snapshots, by identity (O(services))."""
    a, b = old.services, new.services
    changed = {h for h, s in b.items() if a.get(h) is not s}
    changed.update(h for h in a if h not in b)
    return frozenset(changed)


class Index:
    """Owner of all shards; publishes snapshots. See the module docstring."""

    def __init__(self, order: Sequence[SourceId] = ()) -> None:
        self._order: dict[SourceId, int] = {s: i for i, s in enumerate(order)}
        self._shards: dict[SourceId, _ShardState] = {}
        self._merged: dict[Hostname, Service] = {}
        self._conflicts: dict[Hostname, Conflict] = {}
        self._dirty: set[Hostname] = set()
        self._status_dirty = False
        self._batch_depth = 0
        self._snapshot = Snapshot()
        self._event = asyncio.Event()
        self._history: deque[tuple[int, frozenset[Hostname]]] = deque(maxlen=_HISTORY)

    # -- read side (SnapshotSource) -------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def wait(self, after_version: int) -> Snapshot:
        while self._snapshot.version <= after_version:
            await self._event.wait()
        return self._snapshot

    def changed_between(self, old_version: int, new_version: int) -> frozenset[Hostname] | None:
        if old_version >= new_version:
            return frozenset()
        history = self._history
        if not history or history[0][0] > old_version + 1:
            return None
        # Versions in the history are consecutive: index by offset, from the recent end.
        first = history[0][0]
        out: set[Hostname] = set()
        for i in range(old_version + 1 - first, min(new_version + 1 - first, len(history))):
            out |= history[i][1]
        return frozenset(out)

    # -- write side -------------------------------------------------------------------

    def writer(self, source: SourceId) -> Shard:
        """The shard writer for `source`, created empty (and not ready) if new."""
        if source not in self._shards:
            self._shards[source] = _ShardState(source)
            self._status_dirty = True
            self._publish()
        return Shard(self, self._shards[source])

    def drop(self, source: SourceId) -> None:
        """Forget a registry that is no longer configured, with all its data."""
        state = self._shards.pop(source, None)
        if state is None:
            return
        self._dirty.update(state.services)
        self._status_dirty = True
        self._publish()

    def set_order(self, order: Sequence[SourceId]) -> None:
        """Registry precedence changed (config reload): re-merge every shared hostname."""
        new = {s: i for i, s in enumerate(order)}
        if new == self._order:
            return
        self._order = new
        self._dirty.update(self._conflicts)
        self._publish()

    @contextmanager
    def batch(self) -> Iterator[None]:
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            self._publish()

    # -- internals --------------------------------------------------------------------

    def _rank(self, source: SourceId) -> tuple[int, str]:
        return (self._order.get(source, len(self._order)), source)

    def _merge(self, host: Hostname) -> Service | None:
        found = [(st.source, st.services[host]) for st in self._shards.values() if host in st.services]
        if not found:
            self._conflicts.pop(host, None)
            return None
        if len(found) == 1:
            self._conflicts.pop(host, None)
            return found[0][1]
        found.sort(key=lambda pair: self._rank(pair[0]))
        winner = found[0][1]
        sources = tuple(src for src, _ in found)
        self._conflicts[host] = Conflict(host, sources[0], sources)
        endpoints = tuple(ep for _, svc in found for ep in svc.endpoints)
        merged = winner.with_endpoints(endpoints)
        previous = self._merged.get(host)
        return previous if previous == merged else merged

    def _publish(self) -> None:
        if self._batch_depth:
            return
        changed: set[Hostname] = set()
        for host in self._dirty:
            merged = self._merge(host)
            previous = self._merged.get(host)
            if merged is None:
                if previous is not None:
                    del self._merged[host]
                    changed.add(host)
            elif merged is not previous:
                self._merged[host] = merged
                changed.add(host)
        self._dirty.clear()
        if not changed and not self._status_dirty:
            return
        self._status_dirty = False
        version = self._snapshot.version + 1
        frozen_changed = frozenset(changed)
        self._snapshot = Snapshot(
            version=version,
            services=MappingProxyType(dict(self._merged)) if changed else self._snapshot.services,
            changed=frozen_changed,
            shards=MappingProxyType({s: st.status() for s, st in self._shards.items()}),
            conflicts=MappingProxyType(dict(self._conflicts)),
        )
        self._history.append((version, frozen_changed))
        event, self._event = self._event, asyncio.Event()
        event.set()


@dataclass(slots=True)
class _ShardState:
    """Mutable per-registry state, owned by the Index, written through `Shard`.

    `endpoints` is kept as a running count and `status()` is cached until the
    next write, so publishing a version costs nothing per unchanged shard.
    """

    source: SourceId
    services: dict[Hostname, Service] = field(default_factory=dict)
    endpoints: int = 0
    synced: bool = False
    failed: bool = False
    stale: bool = False
    last_sync: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    problems: dict[str, tuple[Problem, ...]] = field(default_factory=dict)
    errors_total: int = 0
    _status: ShardStatus | None = None

    def touch(self) -> None:
        self._status = None

    def status(self) -> ShardStatus:
        if self._status is None:
            self._status = ShardStatus(
                source=self.source,
                services=len(self.services),
                endpoints=self.endpoints,
                synced=self.synced,
                failed=self.failed,
                stale=self.stale,
                last_sync=self.last_sync,
                last_error=self.last_error,
                last_error_time=self.last_error_time,
                problems=tuple(p for ps in self.problems.values() for p in ps),
                errors_total=self.errors_total,
            )
        return self._status


class Shard:
    """The `ShardWriter` handed to one adapter. See `discoveryd.registry.ShardWriter`."""

    __slots__ = ("_index", "_state")

    def __init__(self, index: Index, state: _ShardState) -> None:
        self._index = index
        self._state = state

    @property
    def source(self) -> SourceId:
        return self._state.source

    @property
    def part_name(self) -> str:
        return ""

    def part(self, name: str) -> Shard:
        raise NotImplementedError("named parts are not implemented yet")

    def close_part(self, name: str) -> None:
        raise NotImplementedError("named parts are not implemented yet")

    def _stamp(self, service: Service) -> Service:
        """Set `source` on the service and each endpoint that lacks it (free when the adapter set it)."""
        src = self._state.source
        if service.source != src:
            service = dataclasses.replace(service, source=src)
        if any(ep.source != src for ep in service.endpoints):
            service = service.with_endpoints(tuple(_stamp_endpoint(ep, src) for ep in service.endpoints))
        return service

    def _changed(self) -> None:
        self._state.touch()
        self._index._status_dirty = True
        self._index._publish()

    def replace(self, services: Iterable[Service]) -> None:
        st = self._state
        new = {s.hostname: self._stamp(s) for s in services}
        old = st.services
        touched = {h for h in old if h not in new}
        touched.update(h for h, s in new.items() if old.get(h) != s)
        if not touched:
            return
        # Keep identical objects so unchanged hostnames stay unchanged.
        st.services = {h: (old[h] if h in old and old[h] == s else s) for h, s in new.items()}
        st.endpoints = sum(len(s.endpoints) for s in st.services.values())
        self._index._dirty |= touched
        self._changed()

    def upsert(self, service: Service) -> None:
        st = self._state
        service = self._stamp(service)
        previous = st.services.get(service.hostname)
        if previous == service:
            return
        st.services[service.hostname] = service
        st.endpoints += len(service.endpoints) - (len(previous.endpoints) if previous else 0)
        self._index._dirty.add(service.hostname)
        self._changed()

    def delete(self, hostname: Hostname) -> None:
        st = self._state
        previous = st.services.pop(hostname, None)
        if previous is None:
            return
        st.endpoints -= len(previous.endpoints)
        self._index._dirty.add(hostname)
        self._changed()

    def mark_synced(self) -> None:
        st = self._state
        if st.synced and not st.stale:
            return
        st.synced, st.stale, st.last_sync = True, False, time.time()
        self._changed()

    def mark_failing(self, error: str) -> None:
        st = self._state
        st.failed, st.stale = True, True
        st.last_error, st.last_error_time = error, time.time()
        st.errors_total += 1
        self._changed()

    def set_problems(self, scope: str, problems: Sequence[Problem]) -> None:
        st = self._state
        new = tuple(problems)
        if st.problems.get(scope, ()) == new:
            return
        if new:
            st.problems[scope] = new
            st.errors_total += len(new)
        else:
            st.problems.pop(scope, None)
        self._changed()

    def batch(self) -> AbstractContextManager[None]:
        return self._index.batch()


def _stamp_endpoint(ep: Endpoint, source: SourceId) -> Endpoint:
    if ep.source == source:
        return ep
    # Positional construction: several times cheaper than dataclasses.replace on this hot path.
    return Endpoint(
        ep.address,
        ep.ports,
        ep.labels,
        ep.locality,
        ep.weight,
        ep.health,
        ep.network,
        ep.service_account,
        ep.hostname,
        ep.priority,
        source,
        ep.tags,
        ep.node_name,
        ep.target_ref,
    )
