"""The `istio` part of a Kubernetes registry: Istio's networking CRDs (and Pods as workloads).

Data flow: reflectors (see `api.Reflector`) of serviceentries,
workloadentries, destinationrules and virtualservices
(`networking.istio.io/<istio_version>`), and of Pods when `pods` is on, feed
`IstioView`. Each object is read with the shared Istio library
(`adapters.istio.read_object` and `adapters.istio.policy.read_policy_object`,
the same validation as files), located as `<Kind> <namespace>/<name>` plus
the field path, and handed under a scope of its own to one `Translation`
(ServiceEntries, WorkloadEntries, Pods) or one `PolicySet` (DestinationRules,
VirtualServices). The coalescer's flush runs `Translation.build()` (only
namespaces whose objects changed are rebuilt) and `PolicySet.build()`, and
writes the changed hostnames and the changed hosts' traffic policies
(`PolicyWriter.set_policy`) to the part in one staged batch.

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

from adapters.istio import ObjectLocator, Pod, ServiceEntry, Translation, WorkloadEntry, pod_workload, read_object
from adapters.istio.objects import Object
from adapters.istio.policy import PolicyObject, PolicySet, read_policy_object
from adapters.kubernetes.api import Obj
from adapters.kubernetes.mapping import meta_key
from adapters.toolkit.sync import replace_all
from discoveryd.model import Hostname, Problem
from discoveryd.registry import PolicyWriter, ShardWriter

log = logging.getLogger("discoveryd.adapters.kubernetes")

ISTIO_PART = "istio"
KINDS = {
    "serviceentries": "ServiceEntry",
    "workloadentries": "WorkloadEntry",
    "destinationrules": "DestinationRule",
    "virtualservices": "VirtualService",
    "pods": "Pod",
}
POLICY_PLURALS = ("destinationrules", "virtualservices")
"""Kinds that feed the `PolicySet`, not the `Translation`."""
_POLICY_SCOPES = tuple(KINDS[p] + " " for p in POLICY_PLURALS)
"""How the scopes of `POLICY_PLURALS` objects begin (`<Kind> ns/name`)."""


class IstioView:
    """The Istio objects of one cluster and the part they are published to."""

    def __init__(
        self, shard: ShardWriter, api_version: str = "networking.istio.io/v1", domain: str = "cluster.local"
    ) -> None:
        self._shard = shard
        self._api_version = api_version
        """What a list item without `apiVersion` is taken to be (the version the reflectors read)."""
        self._domain = domain
        """The cluster domain: a rule's short host `<name>` is `<name>.<namespace>.svc.<domain>`."""
        self._translation = Translation()
        self._policies = PolicySet()
        self._policy_dirty = False
        self._objects: dict[str, tuple[str, Object | PolicyObject | None]] = {}
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
        found: Object | PolicyObject | None
        problems: list[Problem]
        locator = ObjectLocator(KINDS[plural], ns, name)
        if plural == "pods":
            pod = Pod.from_json(obj)
            found, problems = (pod_workload(pod) if pod is not None else None), []
        elif plural in POLICY_PLURALS:
            # List items of a CRD carry their kind; be lenient with a server that leaves it out.
            typed = {"kind": KINDS[plural], "apiVersion": self._api_version} | obj
            found, problems = read_policy_object(typed, locator, ns or "default", self._domain)
        else:
            found, problems = read_object(obj, locator, ns or "default")
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
        if plural in POLICY_PLURALS:
            # Istio's precedence among rules: the oldest first (creationTimestamp, RFC 3339, sorts as text).
            created = str((obj.get("metadata") or {}).get("creationTimestamp") or "")
            self._policies.update(scope, [found] if found is not None else [], created)
            self._policy_dirty = True
        else:
            self._translation.update(scope, [found] if isinstance(found, ServiceEntry | WorkloadEntry) else [])
            self._dirty = True

    def _drop(self, scope: str) -> None:
        if scope in self._invalid:
            self._invalid.discard(scope)
            self._shard.set_problems(scope, ())
        if self._objects.pop(scope, None) is not None:
            if scope.startswith(_POLICY_SCOPES):
                self._policies.remove(scope)
                self._policy_dirty = True
            else:
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
        now = {**self._translation.problems(), **self._policies.problems()}
        for scope in self._reported.keys() - now.keys():
            if scope not in self._invalid:
                self._shard.set_problems(scope, ())
        for scope, problems in now.items():
            if self._reported.get(scope) != problems and scope not in self._invalid:
                self._shard.set_problems(scope, problems)
        self._reported = now

    async def flush(self) -> None:
        """Publish what changed as one index version (the coalescer's task calls this).

        The first publication replaces the part in steps that yield to the loop when the writer offers it
        (`SteppedWriter`); the batch still applies it, the rules and the problems as one version.
        """
        if not self.expected or not self.expected <= self.listed:
            return
        shard = self._shard
        back = self.stale and self.expected <= self.watching
        if not self.published:
            self._translation.build()
            self.stale, self._dirty = False, False  # objects changed from here on are flushed next time
            with shard.batch():
                built = list(self._translation.services.values())  # as built: events meanwhile build anew
                await replace_all(shard, built)
                self._write_policies()
                self._report()
                if not self.stale:  # a session that failed meanwhile marked the part failing: it stays so
                    shard.mark_synced()
            self.published = True
            return
        if not self._dirty and not self._policy_dirty and not back:
            return
        changed: set[Hostname] = self._translation.build() if self._dirty else set()
        self._dirty = False
        services = self._translation.services
        with shard.batch():
            for host in changed:
                svc = services.get(host)
                if svc is None:
                    shard.delete(host)
                else:
                    shard.upsert(svc)
            self._write_policies()
            self._report()
            if back:
                shard.mark_synced()
                self.stale = False

    def _write_policies(self) -> None:
        """The traffic policy of every host whose DestinationRules/VirtualServices changed (inside the batch)."""
        if not self._policy_dirty:
            return
        self._policy_dirty = False
        changed = self._policies.build()
        shard = self._shard
        if not isinstance(shard, PolicyWriter):
            return
        policies = self._policies.policies
        for host in sorted(changed):
            shard.set_policy(host, policies.get(host))
