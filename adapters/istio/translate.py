"""Validated Istio objects → one model `Service` per host, rebuilt per namespace as objects change.

`Translation` is fed by scope — a file, or whatever unit the caller reads at
once (`update(scope, objects)`, `remove(scope)`); `build()` then rebuilds only
the namespaces whose objects changed (compared by identity: a caller that
reuses unchanged objects, as `yamlread`'s chunk cache does, makes an edit
cost one namespace) and returns the hostnames whose service changed, so the
caller writes only those to its shard.

Precedence: scopes in sorted order, then the order of objects in a scope.

Rules (Istio's):
- One `Service` per host of each ServiceEntry (hostname lower-cased).
- Endpoints: the entry's inline `endpoints`; or, with a `workloadSelector`,
  every workload of the same namespace (WorkloadEntry, or Pod through
  `objects.pod_workload`) whose labels include the selector's; or, for
  resolution DNS / DNS_ROUND_ROBIN with neither, one endpoint per host whose
  address is the host itself (Istio resolves the host).
- The same host in several ServiceEntries of one namespace (as Istio allows):
  the first entry gives the attributes, the endpoints of all are merged. If
  the later entry disagrees on ports, addresses, resolution or location, that
  is reported against it.
- The same host in another namespace: the index holds one service per
  hostname, so the declaration that comes later is ignored and reported.
- The same kind/namespace/name declared twice: the later object is ignored
  and reported.

Cost: `build()` is O(objects of the changed namespaces + hosts they
declare); nothing is proportional to all objects unless all changed.
Not thread-safe: owned by one task (or one thread) at a time.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from adapters.istio.objects import Host, Object, ServiceEntry, WorkloadEntry, labels_match
from discoveryd.model import Endpoint, Hostname, Problem, Resolution, Service

_COMPARED = ("ports", "addresses", "resolution", "location")

Order = tuple[str, int]
"""(scope, position in the scope): lower comes first."""


@dataclass(frozen=True, slots=True)
class ScopedProblem:
    """A problem between objects, and the scope (file) it is reported against."""

    scope: str
    problem: Problem


@dataclass(slots=True)
class _Namespace:
    """The services one namespace declares, before hosts are settled across namespaces."""

    services: dict[Hostname, Service] = field(default_factory=dict)
    first: dict[Hostname, tuple[Order, ServiceEntry]] = field(default_factory=dict)
    declarers: dict[Hostname, list[tuple[str, ServiceEntry, Host]]] = field(default_factory=dict)
    problems: list[ScopedProblem] = field(default_factory=list)
    memo: dict[int, tuple[ServiceEntry, tuple[Service, ...]]] = field(default_factory=dict)
    """Per entry without selector (by id, the entry kept alive here): its per-host services."""


class Translation:
    """The services of a set of Istio objects, kept up to date incrementally (see the module docstring)."""

    def __init__(self) -> None:
        self._scopes: dict[str, tuple[Object, ...]] = {}
        self._by_ns: dict[str, dict[str, tuple[tuple[int, Object], ...]]] = {}
        self._dirty: set[str] = set()
        self._ns: dict[str, _Namespace] = {}
        self._claims: dict[Hostname, dict[str, Order]] = {}
        self._services: dict[Hostname, Service] = {}
        self._cross: dict[Hostname, list[ScopedProblem]] = {}

    @property
    def services(self) -> Mapping[Hostname, Service]:
        """The services as of the last `build()` (a live view: do not keep it across builds)."""
        return self._services

    def update(self, scope: str, objects: Sequence[Object]) -> None:
        """Make `scope` declare exactly `objects`, in this order. Takes effect on the next `build()`."""
        old = self._scopes.get(scope, ())
        if len(old) == len(objects) and all(a is b for a, b in zip(old, objects, strict=True)):
            return
        if objects:
            self._scopes[scope] = tuple(objects)
        else:
            self._scopes.pop(scope, None)
        before = _group(old)
        after = _group(objects)
        for ns in before.keys() | after.keys():
            was, now = before.get(ns, ()), after.get(ns, ())
            if len(was) == len(now) and all(a[1] is b[1] and a[0] == b[0] for a, b in zip(was, now, strict=True)):
                continue
            scopes = self._by_ns.setdefault(ns, {})
            if now:
                scopes[scope] = now
            else:
                scopes.pop(scope, None)
                if not scopes:
                    del self._by_ns[ns]
            self._dirty.add(ns)

    def remove(self, scope: str) -> None:
        """Forget everything `scope` declared."""
        self.update(scope, ())

    def build(self) -> set[Hostname]:
        """Rebuild the namespaces that changed; the hostnames whose service changed, appeared or went away."""
        affected: set[Hostname] = set()
        for ns in sorted(self._dirty):
            old = self._ns.pop(ns, None)
            new = self._build_namespace(ns, old) if ns in self._by_ns else None
            if new is not None:
                self._ns[ns] = new
            hosts = set(old.services) if old is not None else set()
            if new is not None:
                hosts |= new.services.keys()
            for host in hosts:
                claims = self._claims.setdefault(host, {})
                if new is not None and host in new.first:
                    claims[ns] = new.first[host][0]
                else:
                    claims.pop(ns, None)
                    if not claims:
                        del self._claims[host]
            affected |= hosts
        self._dirty.clear()
        changed: set[Hostname] = set()
        for host in affected:
            self._cross.pop(host, None)
            before = self._services.get(host)
            found = self._claims.get(host)
            if not found:
                if before is not None:
                    del self._services[host]
                    changed.add(host)
                continue
            winner = min(found, key=found.__getitem__)
            service = self._ns[winner].services[host]
            if before is None or (service is not before and service != before):
                changed.add(host)
            self._services[host] = service
            if len(found) > 1:
                self._cross[host] = self._conflicts(host, winner, found)
        return changed

    def problems(self) -> dict[str, list[Problem]]:
        """The problems between objects, by scope (only scopes that have some)."""
        out: dict[str, list[Problem]] = {}
        for found in (*(ns.problems for ns in self._ns.values()), *self._cross.values()):
            for sp in found:
                out.setdefault(sp.scope, []).append(sp.problem)
        return out

    def _conflicts(self, host: Hostname, winner: str, claims: Mapping[str, Order]) -> list[ScopedProblem]:
        owner = self._ns[winner].first[host][1]
        out: list[ScopedProblem] = []
        for ns in sorted(claims, key=claims.__getitem__):
            if ns == winner:
                continue
            for scope, entry, decl in self._ns[ns].declarers[host]:
                message = (
                    f"host {host} is already declared in namespace {winner} by {owner.ref.kind} "
                    f"{owner.ref.name} ({owner.ref.where}); one host belongs to one namespace, this one is ignored"
                )
                locator = entry.ref.locator
                out.append(ScopedProblem(scope, Problem(locator.where(decl.path), message, locator.field(decl.path))))
        return out

    def _build_namespace(self, ns: str, old: _Namespace | None) -> _Namespace:
        result = _Namespace()
        items = sorted(
            ((scope, pos, obj) for scope, objs in self._by_ns[ns].items() for pos, obj in objs),
            key=lambda item: (item[0], item[1]),
        )
        declared: dict[tuple[str, str], Object] = {}
        entries: list[tuple[Order, str, ServiceEntry]] = []
        workloads: list[WorkloadEntry] = []
        for scope, pos, obj in items:
            earlier = declared.setdefault((obj.ref.kind, obj.ref.name), obj)
            if earlier is not obj:
                message = f"{obj.ref.kind} {ns}/{obj.ref.name} is already defined at {earlier.ref.where}; ignored"
                result.problems.append(ScopedProblem(scope, Problem(obj.ref.where, message, "metadata.name")))
            elif isinstance(obj, ServiceEntry):
                entries.append(((scope, pos), scope, obj))
            else:
                workloads.append(obj)

        memo = old.memo if old is not None else {}
        for order, scope, entry in entries:
            if entry.selector is None:
                kept = memo.get(id(entry))
                per_host = kept[1] if kept is not None and kept[0] is entry else _per_host(entry, ())
                result.memo[id(entry)] = (entry, per_host)
            else:
                selector = entry.selector
                selected = tuple(w.endpoint for w in workloads if labels_match(selector, w.endpoint.labels))
                per_host = _per_host(entry, selected)
            for host, service in zip(entry.hosts, per_host, strict=True):
                result.declarers.setdefault(host.name, []).append((scope, entry, host))
                first = result.services.get(host.name)
                if first is None:
                    result.services[host.name] = service
                    result.first[host.name] = (order, entry)
                    continue
                owner = result.first[host.name][1]
                differ = [a for a in _COMPARED if getattr(first, a) != getattr(service, a)]
                if differ:
                    message = (
                        f"host {host.name} is also declared by {owner.ref.kind} {owner.ref.namespace}/"
                        f"{owner.ref.name} ({owner.ref.where}) with different {', '.join(differ)}; its attributes "
                        "are used and the endpoints of both are merged"
                    )
                    locator = entry.ref.locator
                    problem = Problem(locator.where(host.path), message, locator.field(host.path))
                    result.problems.append(ScopedProblem(scope, problem))
                added = tuple(ep for ep in service.endpoints if ep not in first.endpoints)
                if added:
                    result.services[host.name] = first.with_endpoints(first.endpoints + added)
        return result


def translate(objects: Iterable[tuple[str, Object]]) -> tuple[dict[Hostname, Service], dict[str, list[Problem]]]:
    """All at once: (scope, object) pairs in any order → services and problems by scope."""
    grouped: dict[str, list[Object]] = {}
    for scope, obj in objects:
        grouped.setdefault(scope, []).append(obj)
    translation = Translation()
    for scope, objs in grouped.items():
        translation.update(scope, objs)
    translation.build()
    return dict(translation.services), translation.problems()


def _group(objects: Sequence[Object]) -> dict[str, tuple[tuple[int, Object], ...]]:
    out: dict[str, list[tuple[int, Object]]] = {}
    for pos, obj in enumerate(objects):
        out.setdefault(obj.ref.namespace, []).append((pos, obj))
    return {ns: tuple(items) for ns, items in out.items()}


def _per_host(entry: ServiceEntry, selected: tuple[Endpoint, ...]) -> tuple[Service, ...]:
    template = entry.template
    endpoints = selected if entry.selector is not None else template.endpoints
    values = list(_service_values(template))
    out: list[Service] = []
    for host in entry.hosts:
        values[_HOSTNAME] = host.name
        values[_ENDPOINTS] = endpoints or _resolved(entry, host)
        out.append(Service(*values))
    return tuple(out)


_SERVICE_FIELDS = tuple(f.name for f in fields(Service))
_service_values = operator.attrgetter(*_SERVICE_FIELDS)
"""Every field of a `Service`, in the order of its constructor's arguments (`dataclasses.replace` without its
per-call look-ups of the fields: a 20k-entry file makes 40k services)."""
_HOSTNAME = _SERVICE_FIELDS.index("hostname")
_ENDPOINTS = _SERVICE_FIELDS.index("endpoints")
assert all(f.init for f in fields(Service)), "every field of Service is a constructor argument"


def _resolved(entry: ServiceEntry, host: Host) -> tuple[Endpoint, ...]:
    """Without endpoints or selector, a DNS-resolution host is its own endpoint (Envoy resolves it)."""
    if entry.selector is None and entry.template.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        return (Endpoint(address=host.name),)
    return ()
