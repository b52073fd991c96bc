"""The endpoint index: registry shards in, immutable versioned snapshots out.

Data flow: each adapter writes its own shard through a `Shard` (the
`ShardWriter` of `discoveryd.registry`), and may open named parts of it
(`shard.part("dc2")`). Every part is a shard of its own here, keyed by
`ShardKey(source, part)`; the root writer is the part `""`. Every write (or
every part's `batch()`) re-merges only the hostnames it touched and publishes
a new `Snapshot`: a version number that only grows, the merged services, the
hostnames changed since the previous version, and each registry's status
(with its parts').

The merged map and the conflicts map are persistent maps (`immutables.Map`, a
HAMT): a version that changes k hostnames costs O(k log n), never a copy of
the whole map, and every published snapshot keeps its own view for free.

Servers depend only on `SnapshotSource` (read the current snapshot, wait for a
newer one, ask what changed between two versions): the cache/server seam of
go-control-plane. They never see shards.

Merge rule, the only one in the daemon. Shards are ranked by the registry's
position in the config, then the root part before named parts, then part
name. A hostname reported by several shards gets:
- the union of their endpoints, in rank order (each endpoint keeps its `source`);
- its VIPs (`addresses`) from the highest-ranked shard that has any: a
  ServiceEntry without addresses does not hide a Kubernetes ClusterIP, and a
  lower-ranked registry never adds VIPs to a higher-ranked one's. Every shard's
  own addresses stay visible in the hostname's `Conflict.addresses` (and in
  /debug/endpointz); DNS answers and xDS use the merged `addresses` only;
- every other attribute from the highest-ranked shard.
Such a hostname is recorded as a `Conflict` in the snapshot.

Traffic policy (`discoveryd.policy.HostPolicy`, a host's DestinationRule and
VirtualService) is held per shard next to the services, keyed by the host it
applies to, and combined per host by the same ranking: the rules and routes
of every shard are kept (`policy.combine`), the highest-ranked shard's first,
and each client namespace picks among them (`HostPolicy.select`), as Istio
picks among the rules of all its config sources; between rules that tie, the
higher-ranked shard's wins. It applies to the host whatever
shard provides the service (a DestinationRule from files shapes a Kubernetes
service). `Snapshot.policies` has the combinations; a host whose policy
changed is in `Snapshot.changed` like a host whose service changed, so the
servers rebuild it. Policies are not saved in the state directory: after a
warm restart they return with their registry's first sync.

A shard whose registry fails keeps its content and is marked stale; its data
is removed only by its own adapter (the registry said so), by `close_part`
(the adapter stopped watching that part) or by `drop()` (the registry was
removed from the config, with all its parts).

Batches are per part and staged: writes made inside `with shard.batch():` are
recorded, not applied, until the block exits cleanly; then they are applied at
once as one version. An exception inside applies nothing; an adapter awaiting
inside holds nothing of the index, so other shards keep publishing.

Everything here runs on the event loop thread; nothing blocks or awaits
except `wait()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

import immutables

from discoveryd import gcpause
from discoveryd.model import Endpoint, Hostname, Problem, Service, SourceId
from discoveryd.policy import HostPolicy, combine

_HISTORY = 4096
"""How many versions' changed-sets are kept for `changed_between`."""

ROOT = ""
"""The name of a registry's root part (the writer `Index.writer` returns)."""


class ShardKey(NamedTuple):
    """One shard of the index: a registry's root (`part == ""`) or one of its named parts."""

    source: SourceId
    part: str


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """The state of one part, or (in `Snapshot.shards`) of a whole registry.

    A registry's status aggregates the parts that count for it (every named
    part it opened, and the root if it was written to or marked, or if no part
    was opened): counts and problems are summed over them, `synced`/`ready`
    hold when they hold for every counted part, `stale`/`failed` when for any.
    `parts` has each counted part's own status by name.
    """

    source: SourceId
    part: str = ROOT
    services: int = 0
    endpoints: int = 0
    synced: bool = False
    """Has completed at least one full sync."""
    failed: bool = False
    """Has reported at least one failure."""
    stale: bool = False
    """The registry is failing now; the content is the last known."""
    last_sync: float | None = None
    """Wall-clock time of the last `mark_synced` (the oldest one over a registry's parts)."""
    last_error: str | None = None
    last_error_time: float | None = None
    problems: tuple[Problem, ...] = ()
    errors_total: int = 0
    """Failures reported since start (sync errors plus input problems set)."""
    parts: Mapping[str, ShardStatus] = field(default_factory=dict)
    """On a registry's status: its counted parts by name (`""` the root) when it uses named parts.

    Empty on a part's own status, and on a registry whose only counted part is
    its root (the registry's status is then the root's: one object per version).
    """
    restored: bool = False
    """The content was loaded from the state directory and has not been replaced by a sync yet."""
    timed_out: bool = False
    """On a registry's status: it did not get ready within `ready_timeout` and no longer blocks readiness."""
    resume_point: str | None = None
    """A part's: where its adapter read its content up to (see `ShardWriter.set_resume_point`)."""

    @property
    def ready(self) -> bool:
        """A part: has synced, or was restored from the state directory (a failure alone is not ready).

        A registry: every counted part is ready, or it timed out (`ready_timeout`).
        """
        if self.timed_out:
            return True
        if self.parts:
            return all(p.ready for p in self.parts.values())
        return self.synced or self.restored


@dataclass(frozen=True, slots=True)
class Conflict:
    """A hostname reported by more than one shard (registries, or parts of one)."""

    hostname: Hostname
    winner: SourceId
    sources: tuple[SourceId, ...]
    """The distinct registries reporting the hostname, in rank order."""
    shards: tuple[ShardKey, ...] = ()
    """Every shard reporting the hostname, in rank order."""
    addresses: tuple[tuple[ShardKey, tuple[str, ...]], ...] = ()
    """Each shard's own VIPs, in rank order (the merged service has the first non-empty ones)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, consistent view of every registry.

    An unchanged hostname keeps the very same `Service` object from version to
    version, so `a.services.get(h) is b.services.get(h)` is a valid (and
    cheap) "unchanged" test.
    """

    version: int = 0
    services: Mapping[Hostname, Service] = field(default_factory=immutables.Map)
    changed: frozenset[Hostname] = frozenset()
    """Hostnames whose merged service differs from the previous version."""
    shards: Mapping[SourceId, ShardStatus] = field(default_factory=dict)
    """Each registry's status (aggregated over its parts, see `ShardStatus`)."""
    conflicts: Mapping[Hostname, Conflict] = field(default_factory=immutables.Map)
    created: float = field(default_factory=time.monotonic)
    """`time.monotonic()` when published; convergence is measured from it."""
    policies: Mapping[Hostname, HostPolicy] = field(default_factory=immutables.Map)
    """Each host's traffic policy (every shard's rules, the highest-ranked first), whether or not a service
    has the host."""

    @property
    def ready(self) -> bool:
        """Every registry has synced or was restored, or stopped blocking after `ready_timeout`.

        The one readiness rule: /readyz, systemd READY=1, xDS state-of-the-world
        and DNS answers for a registry's zones all follow it.
        """
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
    """Hostnames whose service or traffic policy differs between two snapshots, by identity
    (O(services + policies)): what `changed_between` would say, without the history."""
    a, b = old.services, new.services
    changed = {h for h, s in b.items() if a.get(h) is not s}
    changed.update(h for h in a if h not in b)
    pa, pb = old.policies, new.policies
    if pa is not pb:
        changed.update(h for h, p in pb.items() if pa.get(h) is not p)
        changed.update(h for h in pa if h not in pb)
    return frozenset(changed)


class Index:
    """Owner of all shards; publishes snapshots. See the module docstring."""

    def __init__(self, order: Sequence[SourceId] = ()) -> None:
        self._order: dict[SourceId, int] = {s: i for i, s in enumerate(order)}
        self._parts: dict[ShardKey, _PartState] = {}
        self._registries: dict[SourceId, dict[str, _PartState]] = {}
        self._statuses: dict[SourceId, ShardStatus] = {}
        self._merged: immutables.Map[Hostname, Service] = immutables.Map()
        self._conflicts: immutables.Map[Hostname, Conflict] = immutables.Map()
        self._dirty: set[Hostname] = set()
        self._policies: immutables.Map[Hostname, HostPolicy] = immutables.Map()
        self._policy_dirty: set[Hostname] = set()
        self._status_dirty: set[SourceId] = set()
        self._shards_gone = False
        self._hold = 0
        self._forced: set[Hostname] = set()
        """Hosts whose merged entries a stepwise replace set directly: changed in the next version."""
        self._watchers: list[set[Hostname]] = []
        """Of each stepwise replace in progress: the hosts re-merged by versions published meanwhile."""
        self._timed_out: set[SourceId] = set()
        self._state_dirty = False
        """A resume point changed without a new version (the state saver reads and clears it)."""
        self._snapshot = Snapshot()
        self._event = asyncio.Event()
        self._waiting = 0
        """Tasks inside `wait()`: a version wakes them (a new event) only when there are any."""
        self._history: deque[tuple[int, frozenset[Hostname]]] = deque(maxlen=_HISTORY)

    # -- read side (SnapshotSource) -------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def wait(self, after_version: int) -> Snapshot:
        while self._snapshot.version <= after_version:
            self._waiting += 1
            try:
                await self._event.wait()
            finally:
                self._waiting -= 1
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
        """The root writer for `source`, its shard created empty (and not ready) if new."""
        return Shard(self, self._open(source, ROOT))

    def drop(self, source: SourceId) -> None:
        """Forget a registry that is no longer configured, with all its parts and data."""
        parts = self._registries.pop(source, None)
        if parts is None:
            return
        for state in parts.values():
            self._detach(state)
        self._statuses.pop(source, None)
        self._status_dirty.discard(source)
        self._timed_out.discard(source)
        self._shards_gone = True
        self._publish()

    @property
    def order(self) -> tuple[SourceId, ...]:
        """The registries in precedence order, as the current merges use it (`set_order`)."""
        return tuple(sorted(self._order, key=self._order.__getitem__))

    def forget_resume_points(self, source: SourceId) -> None:
        """The registry's adapter is restarted with another config: the resume points of its parts
        (an etcd revision of another prefix or cluster) no longer describe what it reads. Content and
        status stay as they are, until the new adapter's first sync replaces the content."""
        for st in self._registries.get(source, {}).values():
            if st.resume_point is not None:
                st.resume_point, st.resumed = None, False
                st.touch()
                self._status_dirty.add(source)
                self._state_dirty = True
        self._publish()

    def set_order(self, order: Sequence[SourceId]) -> None:
        """Registry precedence changed (config reload): re-merge every shared hostname."""
        new = {s: i for i, s in enumerate(order)}
        if new == self._order:
            return
        self._order = new
        self._dirty.update(self._conflicts.keys())
        self._policy_dirty.update(self._policies.keys())  # policies are few: re-rank them all
        self._publish()

    def set_timed_out(self, source: SourceId, timed_out: bool) -> None:
        """Mark a registry that did not get ready within `ready_timeout`: it stops blocking readiness.

        Called by the supervisor's deadline task; cleared when the registry is
        restarted. Shown as `timed_out` in its status.
        """
        if (source in self._timed_out) == timed_out or source not in self._registries:
            return
        if timed_out:
            self._timed_out.add(source)
        else:
            self._timed_out.discard(source)
        self._status_dirty.add(source)
        self._publish()

    def restore(
        self,
        source: SourceId,
        part: str,
        services: Iterable[Service],
        resume_point: str | None,
        policies: Iterable[tuple[Hostname, HostPolicy]] = (),
        last_sync: float | None = None,
    ) -> None:
        """Load one part's content from the state directory: served at once, stale and `restored`.

        Call before the registry's adapter starts (inside `batch()` to publish
        all parts as one version). The adapter's first `mark_synced` of the part
        drops what it has not written since; a restored part the adapter never
        opens again is dropped once every part it did open has synced.
        """
        state = self._open(source, part)
        shard = Shard(self, state)
        shard._replace({s.hostname: shard._stamp(s) for s in services})
        state.used = True
        state.restored = True
        state.restored_hosts = set(state.services)
        state.policies = dict(policies)
        state.restored_policies = set(state.policies)
        self._policy_dirty.update(state.policies)
        state.live = False
        state.stale = True
        state.resume_point = resume_point
        state.last_sync = last_sync  # how old the content is, across restarts (shown in the status)
        state.touch()
        self._status_dirty.add(source)
        self._publish()

    def capture(self) -> list[PartCapture]:
        """Every part that has synced (or was restored and not yet synced) as it is now, for the state writer.

        O(parts + services), no serialisation.

        The services are immutable values and the tuples are new: the result
        may be read from another thread while the index moves on.
        """
        self._state_dirty = False
        return [
            PartCapture(
                key.source,
                key.part,
                tuple(st.services.values()),
                st.resume_point,
                tuple(st.policies.items()),
                st.last_sync,
            )
            for key, st in self._parts.items()
            if st.synced or st.restored  # never synced: no known world, restoring it would fake readiness
        ]

    def capture_is_complete(self) -> bool:
        """Whether `capture()` leaves out no part with content (none that has not synced yet)."""
        return all(st.synced or st.restored or not (st.services or st.policies) for st in self._parts.values())

    @property
    def state_dirty(self) -> bool:
        """A resume point changed since the last `capture()` without a new version."""
        return self._state_dirty

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish every write made inside (to any shard) as one version on exit.

        For the daemon's own bulk operations; adapters use their part's staged
        `Shard.batch()`. Writes are applied as they are made: an exception
        inside publishes what was applied.
        """
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1
            self._publish()

    # -- internals --------------------------------------------------------------------

    def _open(self, source: SourceId, part: str) -> _PartState:
        parts = self._registries.get(source)
        if parts is None:
            parts = self._registries[source] = {}
        state = parts.get(part)
        if state is None:
            state = parts[part] = _PartState(ShardKey(source, part))
            self._parts[state.key] = state
            if not part:
                state.used = False
            self._status_dirty.add(source)
            self._publish()
        return state

    def _close(self, source: SourceId, part: str) -> None:
        parts = self._registries.get(source)
        state = parts.pop(part, None) if parts is not None else None
        if state is None:
            return
        self._detach(state)
        self._status_dirty.add(source)
        self._publish()

    def _retire_restored(self, source: SourceId) -> None:
        """Once every part the adapter uses has synced, drop the restored parts it never opened again."""
        parts = self._registries.get(source)
        if parts is None:
            return
        live = [st for st in parts.values() if st.live and st.used]
        if not live or not all(st.synced and not st.restored for st in live):
            return
        for name, st in list(parts.items()):
            if st.live or not st.restored:
                continue
            if name != ROOT:
                self._close(source, name)
                continue
            self._dirty.update(st.services)
            self._policy_dirty.update(st.policies)
            st.services, st.endpoints, st.policies = {}, 0, {}
            st.writes += 1
            st.restored, st.restored_hosts, st.used, st.stale = False, None, False, False
            st.restored_policies = None
            st.live = True
            st.touch()
            self._status_dirty.add(source)

    def _detach(self, state: _PartState) -> None:
        del self._parts[state.key]
        state.closed = True
        state.staged = None
        self._dirty.update(state.services)
        self._policy_dirty.update(state.policies)

    def _rank(self, key: ShardKey) -> tuple[int, str, bool, str]:
        return (self._order.get(key.source, len(self._order)), key.source, key.part != ROOT, key.part)

    def _merge(self, host: Hostname) -> tuple[Service | None, Conflict | None]:
        found = [(st.key, st.services[host]) for st in self._parts.values() if host in st.services]
        return self._merge_found(host, found)

    def _merge_with(
        self, host: Hostname, part: _PartState, content: Mapping[Hostname, Service]
    ) -> tuple[Service | None, Conflict | None]:
        """`_merge`, as if `part` held `content` (a replace not applied yet)."""
        found = []
        for st in self._parts.values():
            svc = (content if st is part else st.services).get(host)
            if svc is not None:
                found.append((st.key, svc))
        return self._merge_found(host, found)

    def _merge_found(
        self, host: Hostname, found: list[tuple[ShardKey, Service]]
    ) -> tuple[Service | None, Conflict | None]:
        """`host`'s merged service and conflict from the shards' services `found` for it."""
        if not found:
            return None, None
        if len(found) == 1:
            return found[0][1], None
        found.sort(key=lambda pair: self._rank(pair[0]))
        winner = found[0][1]
        vips = next((svc.addresses for _, svc in found if svc.addresses), ())
        endpoints = tuple(ep for _, svc in found for ep in svc.endpoints)
        merged = dataclasses.replace(winner, endpoints=endpoints, addresses=vips)
        previous = self._merged.get(host)
        if previous is not None and previous == merged:
            merged = previous
        shards = tuple(key for key, _ in found)
        conflict = Conflict(
            host,
            shards[0].source,
            tuple(dict.fromkeys(key.source for key in shards)),
            shards,
            tuple((key, svc.addresses) for key, svc in found),
        )
        return merged, conflict

    def _publish(self) -> None:
        if self._hold:
            return
        dirty = self._dirty
        if self._watchers:
            for watch in self._watchers:
                watch.update(dirty)
        if len(dirty) == 1 and not (self._status_dirty or self._policy_dirty or self._shards_gone or self._forced):
            # The hot path (one upsert that left its part's status as it was): one host, one shard.
            host = next(iter(dirty))
            merged, conflict = self._merge(host)
            if merged is not None and conflict is None and host not in self._conflicts:
                dirty.clear()
                if self._merged.get(host) is not merged:
                    self._merged = self._merged.set(host, merged)
                    self._emit(frozenset((host,)), self._snapshot.shards)
                return
        changed: set[Hostname] = set()
        conflicts_changed = False
        if len(self._dirty) == 1:
            # The common case (one upsert or delete): plain set/delete, cheaper than a mutation.
            host = self._dirty.pop()
            merged, conflict = self._merge(host)
            previous = self._merged.get(host)
            if merged is None:
                if previous is not None:
                    self._merged = self._merged.delete(host)
                    changed.add(host)
            elif merged is not previous:
                self._merged = self._merged.set(host, merged)
                changed.add(host)
            old_conflict = self._conflicts.get(host)
            if conflict != old_conflict:
                self._conflicts = (
                    self._conflicts.delete(host) if conflict is None else self._conflicts.set(host, conflict)
                )
                conflicts_changed = True
        elif self._dirty:
            merged_old, conflicts_old = self._merged, self._conflicts
            # One mutation per version; its setup costs about two plain `set`s.
            merged_map = merged_old.mutate()
            conflict_map: immutables.MapMutation[Hostname, Conflict] | None = None
            for host in self._dirty:
                merged, conflict = self._merge(host)
                previous = merged_old.get(host)
                if merged is None:
                    if previous is not None:
                        del merged_map[host]
                        changed.add(host)
                elif merged is not previous:
                    merged_map[host] = merged
                    changed.add(host)
                old_conflict = conflicts_old.get(host)
                if conflict != old_conflict:
                    if conflict_map is None:
                        conflict_map = conflicts_old.mutate()
                    if conflict is None:
                        del conflict_map[host]
                    else:
                        conflict_map[host] = conflict
                    conflicts_changed = True
            self._dirty.clear()
            if changed:
                self._merged = merged_map.finish()
            if conflict_map is not None:
                self._conflicts = conflict_map.finish()
        if self._policy_dirty:
            policies = self._policies.mutate()
            for host in self._policy_dirty:
                ranked = sorted((st.key for st in self._parts.values() if host in st.policies), key=self._rank)
                policy = combine([self._parts[key].policies[host] for key in ranked]) if ranked else None
                before = policies.get(host)
                if before is policy or (before is not None and before == policy):
                    continue  # an equal combination keeps its object: the servers see no change
                if policy is None:
                    del policies[host]
                else:
                    policies[host] = policy
                changed.add(host)
            self._policy_dirty.clear()
            self._policies = policies.finish()
        statuses_changed = self._shards_gone or bool(self._status_dirty)
        for source in self._status_dirty:
            parts = self._registries.get(source)
            if parts is not None:
                status = _aggregate(source, parts)
                if source in self._timed_out:
                    if status.ready:  # synced after all: no longer reported
                        self._timed_out.discard(source)
                    else:
                        status = dataclasses.replace(status, timed_out=True)
                self._statuses[source] = status
        self._status_dirty.clear()
        self._shards_gone = False
        if self._forced:
            changed = changed | self._forced if changed else self._forced
            self._forced = set()
            conflicts_changed = True
        if not changed and not statuses_changed and not conflicts_changed:
            return
        self._emit(
            frozenset(changed), MappingProxyType(dict(self._statuses)) if statuses_changed else self._snapshot.shards
        )

    def _emit(self, changed: frozenset[Hostname], shards: Mapping[SourceId, ShardStatus]) -> None:
        """Publish the next version: the current maps, these changed hosts and statuses."""
        version = self._snapshot.version + 1
        self._snapshot = Snapshot(  # positional: this runs once per version
            version,
            self._merged,
            changed,
            shards,
            self._conflicts,
            time.monotonic(),
            self._policies,
        )
        self._history.append((version, changed))
        if self._waiting:
            event, self._event = self._event, asyncio.Event()
            event.set()


_STEP = 0.002
"""Seconds of work a stepwise replace does between two yields to the event loop."""


class _Pace:
    """Tells a stepwise job when `_STEP` has passed since it last yielded."""

    __slots__ = ("_count", "_since")

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._count = 0

    def due(self) -> bool:
        self._count += 1
        if self._count < 64:  # the clock is read every 64 items
            return False
        self._count = 0
        return time.perf_counter() - self._since >= _STEP

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self._since = time.perf_counter()


def _same(merged: object, conflicts: object, base: tuple[object, object]) -> bool:
    """Whether the index's maps are still the very objects a stepwise replace started from (by
    identity: comparing two maps of 100k entries by content would cost a full pass)."""
    return merged is base[0] and conflicts is base[1]


def _set_merge(
    merged_map: immutables.MapMutation[Hostname, Service],
    conflict_map: immutables.MapMutation[Hostname, Conflict],
    host: Hostname,
    merged: Service | None,
    conflict: Conflict | None,
) -> None:
    """Make `host`'s entries in the two mutations `merged` and `conflict` (None: absent)."""
    if merged is None:
        merged_map.pop(host, None)
    elif merged_map.get(host) is not merged:
        merged_map[host] = merged
    if conflict is None:
        conflict_map.pop(host, None)
    elif conflict_map.get(host) != conflict:
        conflict_map[host] = conflict


def _aggregate(source: SourceId, parts: Mapping[str, _PartState]) -> ShardStatus:
    """A registry's status from its parts' (see `ShardStatus`)."""
    counted = [st for name, st in parts.items() if name != ROOT or st.used]
    if not counted:
        counted = [parts[ROOT]] if ROOT in parts else []
    if len(counted) == 1 and counted[0].key.part == ROOT:
        return counted[0].status()  # only the root counts: its status is the registry's (`parts` empty)
    statuses = [st.status() for st in counted]
    syncs = [s.last_sync for s in statuses]
    errors = [s for s in statuses if s.last_error_time is not None]
    last_error = max(errors, key=lambda s: s.last_error_time or 0.0) if errors else None
    return ShardStatus(
        source=source,
        services=sum(s.services for s in statuses),
        endpoints=sum(s.endpoints for s in statuses),
        synced=all(s.synced for s in statuses),
        failed=any(s.failed for s in statuses),
        stale=any(s.stale for s in statuses),
        last_sync=None if any(t is None for t in syncs) else min(t for t in syncs if t is not None),
        last_error=last_error.last_error if last_error else None,
        last_error_time=last_error.last_error_time if last_error else None,
        problems=tuple(p for s in statuses for p in s.problems),
        errors_total=sum(s.errors_total for s in statuses),
        parts=MappingProxyType({s.part: s for s in sorted(statuses, key=lambda s: s.part)}),
        restored=any(s.restored for s in statuses),
    )


@dataclass(frozen=True, slots=True)
class PartCapture:
    """One part's content at a point in time, for the state directory (see `Index.capture`)."""

    source: SourceId
    part: str
    services: tuple[Service, ...]
    resume_point: str | None
    policies: tuple[tuple[Hostname, HostPolicy], ...] = ()
    last_sync: float | None = None
    """Wall-clock time of the content's last sync (in this run or, for restored content, an earlier one)."""


_Op = Callable[[], None]


@dataclass(slots=True, eq=False)
class _PartState:
    """Mutable per-part state, owned by the Index, written through `Shard`.

    `endpoints` is kept as a running count and `status()` is cached until the
    next write, so publishing a version costs nothing per unchanged shard.
    `staged` holds the writes of an open `batch()` (None outside one).
    """

    key: ShardKey
    services: dict[Hostname, Service] = field(default_factory=dict)
    policies: dict[Hostname, HostPolicy] = field(default_factory=dict)
    endpoints: int = 0
    synced: bool = False
    failed: bool = False
    stale: bool = False
    last_sync: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    problems: dict[str, tuple[Problem, ...]] = field(default_factory=dict)
    errors_total: int = 0
    resume_point: str | None = None
    """Opaque to the index: where the adapter read this part's content up to (saved with the state)."""
    restored: bool = False
    """Content loaded from the state directory, not yet replaced by a sync of this run."""
    restored_hosts: set[Hostname] | None = None
    """While restored: the hostnames not written by the adapter since (dropped on its first sync)."""
    restored_policies: set[Hostname] | None = None
    """While restored: the hosts whose restored policy the adapter has not set since (dropped likewise)."""
    resumed: bool = False
    """The adapter read the restored resume point: its first sync keeps the restored content."""
    live: bool = True
    """Opened or written by the adapter in this run (restored parts start not live)."""
    used: bool = True
    """For the root part: written to or marked (it then counts for the registry's readiness)."""
    closed: bool = False
    staged: list[_Op] | None = None
    writes: int = 0
    """Counts changes of `services` (a stepwise replace checks that nothing wrote the part meanwhile)."""
    _status: ShardStatus | None = None

    def touch(self) -> None:
        self._status = None

    def status(self) -> ShardStatus:
        if self._status is None:
            self._status = self.status_with({})
        return self._status

    def status_with(self, parts: Mapping[str, ShardStatus]) -> ShardStatus:
        # Positional: this runs on every write that changes the shard.
        return ShardStatus(
            self.key.source,
            self.key.part,
            len(self.services),
            self.endpoints,
            self.synced,
            self.failed,
            self.stale,
            self.last_sync,
            self.last_error,
            self.last_error_time,
            tuple(p for ps in self.problems.values() for p in ps) if self.problems else (),
            self.errors_total,
            parts,
            self.restored,
            False,
            self.resume_point,
        )


class Shard:
    """The `ShardWriter` handed to one adapter (or for one part). See `discoveryd.registry.ShardWriter`.

    Calls come from the adapter's task on the event loop thread. A writer of a
    part that was closed, or of a registry that was dropped, raises on write.
    """

    __slots__ = ("_index", "_state")

    def __init__(self, index: Index, state: _PartState) -> None:
        self._index = index
        self._state = state

    @property
    def source(self) -> SourceId:
        return self._state.key.source

    @property
    def part_name(self) -> str:
        return self._state.key.part

    def part(self, name: str) -> Shard:
        if not isinstance(name, str):
            raise TypeError(f"a part name is a string, not {type(name).__name__}")
        self._check_open()
        state = self._index._open(self.source, name)
        state.live = True
        return Shard(self._index, state)

    def close_part(self, name: str) -> None:
        if name == ROOT:
            raise ValueError("the root part of a registry cannot be closed; drop the registry instead")
        self._check_open()
        self._index._close(self.source, name)

    # -- writes: applied now, or staged by an open batch --------------------------------

    def replace(self, services: Iterable[Service]) -> None:
        new = {s.hostname: self._stamp(s) for s in services}
        self._write(lambda: self._replace(new))

    async def replace_in_steps(self, services: Iterable[Service]) -> None:
        """`replace()` for large contents, without holding the event loop: see `SteppedWriter`.

        1. Stamp and diff against the part as it is, in steps (unchanged hostnames keep their objects).
        2. Merge the touched hostnames as they will be, in steps, into mutations of the current maps;
           hostnames other shards re-merge meanwhile are noted (a watch).
        3. At once (now, or on the exit of the open batch): catch up with those, swap in the new maps.
        If the part's own content changed in between, step 3 is a plain `replace()` of the same content.

        The cyclic garbage collector is paused meanwhile, as in the DNS server's sync: the work makes no
        reference cycles, and a full collection among 100k new services is one step of 0.1-0.2 s.
        """
        with gcpause.paused():
            await self._replace_in_steps(services)

    async def _replace_in_steps(self, services: Iterable[Service]) -> None:
        self._check_open()
        st, index, pace = self._state, self._index, _Pace()
        writes, old = st.writes, st.services
        new: dict[Hostname, Service] = {}
        for svc in services:
            svc = self._stamp(svc)
            new[svc.hostname] = svc
            if pace.due():
                await pace.pause()
        touched: list[Hostname] = []
        endpoints = 0
        for host, svc in new.items():
            previous = old.get(host)
            if previous is not None and (previous is svc or previous == svc):
                new[host] = previous
            else:
                touched.append(host)
            endpoints += len(new[host].endpoints)
            if pace.due():
                await pace.pause()
        if st.writes == writes and not st.closed:
            for host in list(old):
                if host not in new:
                    touched.append(host)
                if pace.due():
                    await pace.pause()
        if st.writes != writes or st.closed or not touched:
            self._write(lambda: self._replace(new))  # written meanwhile, or nothing to change
            return
        watch: set[Hostname] = set()
        index._watchers.append(watch)
        order = index._order  # `set_order` puts a new dict: the merges made so far would rank otherwise
        try:
            merged_map, conflict_map = index._merged.mutate(), index._conflicts.mutate()
            changed: set[Hostname] = set()
            for host in touched:
                merged, conflict = index._merge_with(host, st, new)
                _set_merge(merged_map, conflict_map, host, merged, conflict)
                if merged is not index._merged.get(host):
                    changed.add(host)
                if pace.due():
                    await pace.pause()
                    if st.writes != writes or st.closed or index._order is not order:
                        break
        finally:
            index._watchers.remove(watch)
        if st.writes != writes or st.closed or index._order is not order:
            self._write(lambda: self._replace(new))
            return
        for host in watch:
            self._catch_up(host, new, merged_map, conflict_map, changed)
        base = (index._merged, index._conflicts)

        def apply() -> None:
            if st.writes != writes or index._order is not order or not _same(index._merged, index._conflicts, base):
                self._replace(new)  # written or published since (inside a batch): apply at once
                return
            if st.restored_hosts is not None:
                st.restored_hosts = set()  # the content is exactly `new` now
            st.services, st.endpoints = new, endpoints
            st.writes += 1
            index._merged, index._conflicts = merged_map.finish(), conflict_map.finish()
            index._forced = index._forced | changed if index._forced else changed
            self._changed()

        self._write(apply)

    def _catch_up(
        self,
        host: Hostname,
        new: dict[Hostname, Service],
        merged_map: immutables.MapMutation[Hostname, Service],
        conflict_map: immutables.MapMutation[Hostname, Conflict],
        changed: set[Hostname],
    ) -> None:
        """A stepwise replace's step 3 for a hostname another shard re-merged meanwhile."""
        index = self._index
        changed.discard(host)
        if new.get(host) is not self._state.services.get(host):  # touched by the replace too
            merged, conflict = index._merge_with(host, self._state, new)
            _set_merge(merged_map, conflict_map, host, merged, conflict)
            if merged is not index._merged.get(host):
                changed.add(host)
        else:
            _set_merge(merged_map, conflict_map, host, index._merged.get(host), index._conflicts.get(host))

    def upsert(self, service: Service) -> None:
        stamped = self._stamp(service)
        if self._state.staged is None and not self._state.closed:
            self._upsert(stamped)  # the hot path: no closure
        else:
            self._write(lambda: self._upsert(stamped))

    def delete(self, hostname: Hostname) -> None:
        self._write(lambda: self._delete(hostname))

    def set_policy(self, host: Hostname, policy: HostPolicy | None) -> None:
        self._write(lambda: self._set_policy(host, policy))

    def mark_synced(self) -> None:
        self._write(self._mark_synced)

    def mark_failing(self, error: str) -> None:
        self._write(lambda: self._mark_failing(error))

    def set_problems(self, scope: str, problems: Sequence[Problem]) -> None:
        new = tuple(problems)
        self._write(lambda: self._set_problems(scope, new))

    @property
    def resume_point(self) -> str | None:
        st = self._state
        if st.resume_point is not None and st.restored:
            st.resumed = True  # the adapter continues from the restored content: its sync keeps it
        return st.resume_point

    def set_resume_point(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a resume point is a string, not {type(value).__name__}")
        self._write(lambda: self._set_resume_point(value))

    def batch(self) -> AbstractContextManager[None]:
        return self._batch()

    @contextmanager
    def _batch(self) -> Iterator[None]:
        self._check_open()
        st = self._state
        outer = st.staged is None
        if outer:
            st.staged = []
        assert st.staged is not None
        mark = len(st.staged)
        try:
            yield
        except BaseException:
            if st.staged is not None:
                del st.staged[mark:]
            if outer:
                st.staged = None
            raise
        if not outer:
            return
        ops, st.staged = st.staged, None
        if st.closed or not ops:
            return
        index = self._index
        index._hold += 1
        try:
            for op in ops:
                op()
        finally:
            index._hold -= 1
            index._publish()

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state.closed:
            raise RuntimeError(f"shard {self.source} part {self.part_name!r} was closed or dropped")

    def _write(self, op: _Op) -> None:
        self._check_open()
        staged = self._state.staged
        if staged is not None:
            staged.append(op)
        else:
            op()

    def _stamp(self, service: Service) -> Service:
        """Set `source` on the service and each endpoint that lacks it (free when the adapter set it)."""
        src = self._state.key.source
        if service.source != src:
            service = dataclasses.replace(service, source=src)
        for ep in service.endpoints:  # a plain loop: cheaper than any() over a generator on this hot path
            if ep.source != src:
                return service.with_endpoints(tuple(stamp_endpoint(ep, src) for ep in service.endpoints))
        return service

    def _changed(self) -> None:
        st = self._state
        st.touch()
        st.used = st.live = True
        index = self._index
        index._status_dirty.add(st.key.source)
        index._publish()

    def _replace(self, new: dict[Hostname, Service]) -> None:
        st = self._state
        if st.restored_hosts is not None:
            st.restored_hosts = set()  # the content is exactly `new` now
        old = st.services
        touched = [h for h in old if h not in new]
        endpoints = 0
        for host, svc in new.items():  # one pass: equal services keep their objects (unchanged stays unchanged)
            previous = old.get(host)
            if previous is not None and (previous is svc or previous == svc):
                new[host] = svc = previous
            else:
                touched.append(host)
            endpoints += len(svc.endpoints)
        if not touched:
            if not st.used:
                self._changed()
            return
        st.services, st.endpoints = new, endpoints
        st.writes += 1
        self._index._dirty.update(touched)
        self._changed()

    def _upsert(self, service: Service) -> None:
        st = self._state
        if st.restored_hosts:
            st.restored_hosts.discard(service.hostname)
        previous = st.services.get(service.hostname)
        if previous == service:
            return
        st.services[service.hostname] = service
        st.writes += 1
        index = self._index
        index._dirty.add(service.hostname)
        if previous is not None and len(previous.endpoints) == len(service.endpoints) and st.used and st.live:
            index._publish()  # the part's status (counts, flags) is unchanged: the snapshot keeps it
            return
        st.endpoints += len(service.endpoints) - (len(previous.endpoints) if previous else 0)
        self._changed()

    def _delete(self, hostname: Hostname) -> None:
        st = self._state
        if st.restored_hosts:
            st.restored_hosts.discard(hostname)
        previous = st.services.pop(hostname, None)
        if previous is None:
            return
        st.endpoints -= len(previous.endpoints)
        st.writes += 1
        self._index._dirty.add(hostname)
        self._changed()

    def _set_policy(self, host: Hostname, policy: HostPolicy | None) -> None:
        if self._state.restored_policies:
            self._state.restored_policies.discard(host)
        policies = self._state.policies
        if policies.get(host) == policy:
            return
        if policy is None:
            del policies[host]
        else:
            policies[host] = policy
        self._index._policy_dirty.add(host)
        self._changed()

    def _mark_synced(self) -> None:
        st = self._state
        if st.synced and not st.stale and st.used and st.live:
            return
        index = self._index
        index._hold += 1
        try:
            if st.restored:
                self._end_restore()
            st.synced, st.stale, st.last_sync = True, False, time.time()
            self._changed()
            index._retire_restored(st.key.source)
        finally:
            index._hold -= 1
            index._publish()

    def _end_restore(self) -> None:
        """The first sync of a restored part: what the adapter has not written since is gone."""
        st = self._state
        for host in () if st.resumed else st.restored_hosts or ():
            previous = st.services.pop(host, None)
            if previous is not None:
                st.endpoints -= len(previous.endpoints)
                st.writes += 1
                self._index._dirty.add(host)
        for host in () if st.resumed else st.restored_policies or ():
            if st.policies.pop(host, None) is not None:
                self._index._policy_dirty.add(host)
        st.restored, st.restored_hosts, st.restored_policies, st.resumed = False, None, None, False

    def _mark_failing(self, error: str) -> None:
        st = self._state
        st.failed, st.stale = True, True
        st.last_error, st.last_error_time = error, time.time()
        st.errors_total += 1
        self._changed()

    def _set_resume_point(self, value: str) -> None:
        # No new version: the resume point is not served, only saved with the state.
        self._state.resume_point = value
        self._index._state_dirty = True

    def _set_problems(self, scope: str, new: tuple[Problem, ...]) -> None:
        st = self._state
        if st.problems.get(scope, ()) == new:
            return
        if new:
            st.problems[scope] = new
            st.errors_total += len(new)
        else:
            st.problems.pop(scope, None)
        self._changed()


def stamp_endpoint(ep: Endpoint, source: SourceId) -> Endpoint:
    """`ep` with `source` set, every other field kept (tests hold this to `dataclasses.fields(Endpoint)`)."""
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
