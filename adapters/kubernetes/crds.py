"""The `istio` part of a Kubernetes registry: ServiceEntry and WorkloadEntry CRDs (and Pods as workloads).

Data flow: reflectors (see `api.Reflector`) of serviceentries and
workloadentries (`networking.istio.io/<istio_version>`), and of Pods when
`pods` is on, feed `IstioView`. Each object is read with the shared Istio
library (`adapters.istio.read_object`, the same validation as ServiceEntry
files), located as `<Kind> <namespace>/<name>` plus the field path, and handed
to one `Translation` under a scope of its own; the coalescer's flush runs
`Translation.build()` (only namespaces whose objects changed are rebuilt) and
writes the changed hostnames to the part in one staged batch.

An object that does not validate is skipped and reported (`set_problems`
under its scope); its last valid version, if any, keeps being served, and
the report clears when it is fixed or deleted. Nothing an object contains
stops a watch.

Owned by the registry's task; every method runs on the event loop, never
concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from adapters.istio import ObjectLocator, Pod, Translation, pod_workload, read_object
from adapters.istio.objects import Object
from adapters.kubernetes.api import Obj
from adapters.kubernetes.mapping import meta_key
from discoveryd.model import Hostname, Problem
from discoveryd.registry import ShardWriter

log = logging.getLogger("discoveryd.adapters.kubernetes")

ISTIO_PART = "istio"
KINDS = {"serviceentries": "ServiceEntry", "workloadentries": "WorkloadEntry", "pods": "Pod"}


class IstioView:
    """The Istio objects of one cluster and the part they are published to."""

    def __init__(self, shard: ShardWriter) -> None:
        self._shard = shard
        self._translation = Translation()
        self._objects: dict[str, tuple[str, Object | None]] = {}
        """Scope (`<Kind> ns/name`) → (resourceVersion, the last valid object or None)."""
        self._invalid: set[str] = set()
        self._reported: dict[str, list[Problem]] = {}
        """Problems between objects (Translation's), by scope, as last reported."""
        self.listed: set[str] = set()
        self.watching: set[str] = set()
        self.expected: set[str] = set()
        self.published = False
        self.stale = False
        self.poke: Callable[[], None] = lambda: None
        self._dirty = False

    # -- Stores, one per kind (and namespace scope) -------------------------------------------

    def _scope(self, plural: str, obj: Obj) -> str:
        ns, name = meta_key(obj)
        return f"{KINDS[plural]} {ns}/{name}"

    def _put(self, plural: str, obj: Obj) -> None:
        scope = self._scope(plural, obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        current = self._objects.get(scope)
        if current is not None and rv and current[0] == rv:
            return
        ns, name = meta_key(obj)
        found: Object | None
        problems: list[Problem]
        if plural == "pods":
            pod = Pod.from_json(obj)
            found, problems = (pod_workload(pod) if pod is not None else None), []
        else:
            found, problems = read_object(obj, ObjectLocator(KINDS[plural], ns, name), ns or "default")
        if problems:
            log.warning("%s skipped: %s", scope, "; ".join(str(p) for p in problems))
            self._invalid.add(scope)
            self._shard.set_problems(scope, problems)
            kept = current[1] if current is not None else None
            self._objects[scope] = (rv, kept)  # the last valid version stays served
            return
        if scope in self._invalid:
            self._invalid.discard(scope)
            self._shard.set_problems(scope, ())
        self._objects[scope] = (rv, found)
        self._translation.update(scope, [found] if found is not None else [])
        self._dirty = True

    def _drop(self, scope: str) -> None:
        if scope in self._invalid:
            self._invalid.discard(scope)
            self._shard.set_problems(scope, ())
        if self._objects.pop(scope, None) is not None:
            self._translation.remove(scope)
            self._dirty = True

    def replace(self, plural: str, namespace: str | None, items: list[Obj]) -> None:
        seen = set()
        for obj in items:
            seen.add(self._scope(plural, obj))
            self._put(plural, obj)
        prefix = KINDS[plural] + " "
        for scope in [s for s in self._objects if s.startswith(prefix) and s not in seen]:
            if namespace is None or scope[len(prefix) :].split("/", 1)[0] == namespace:
                self._drop(scope)
        self.poke()

    def apply(self, plural: str, events: list[tuple[str, Obj]]) -> None:
        for kind, obj in events:
            if kind == "DELETED":
                self._drop(self._scope(plural, obj))
            else:
                self._put(plural, obj)
        self.poke()

    # -- publication ------------------------------------------------------------------------------

    def _report(self) -> None:
        now = self._translation.problems()
        for scope in self._reported.keys() - now.keys():
            if scope not in self._invalid:
                self._shard.set_problems(scope, ())
        for scope, problems in now.items():
            if self._reported.get(scope) != problems and scope not in self._invalid:
                self._shard.set_problems(scope, problems)
        self._reported = now

    def flush(self) -> None:
        """Publish what changed as one index version (the coalescer's task calls this)."""
        if not self.expected or not self.expected <= self.listed:
            return
        shard = self._shard
        back = self.stale and self.expected <= self.watching
        if not self.published:
            self._translation.build()
            with shard.batch():
                shard.replace(self._translation.services.values())
                self._report()
                shard.mark_synced()
            self.published, self.stale, self._dirty = True, False, False
            return
        if not self._dirty and not back:
            return
        self._dirty = False
        changed: set[Hostname] = self._translation.build()
        services = self._translation.services
        with shard.batch():
            for host in changed:
                svc = services.get(host)
                if svc is None:
                    shard.delete(host)
                else:
                    shard.upsert(svc)
            self._report()
            if back:
                shard.mark_synced()
                self.stale = False
