"""Validated objects of every file → one model `Service` per host.

`build(objects)` takes the ServiceEntries and WorkloadEntries of all files in
precedence order (files sorted by path, then document order) and returns the
services of the shard plus the problems found *between* objects, each paired
with the file it should be reported against.

Rules:
- One `Service` per host of each ServiceEntry (hostname lower-cased).
- Endpoints: the entry's inline `endpoints`; or, with a `workloadSelector`,
  every WorkloadEntry of the same namespace whose labels include the
  selector's; or, for resolution DNS / DNS_ROUND_ROBIN with neither, one
  endpoint per host whose address is the host itself (Istio resolves the host).
- The same host in several ServiceEntries of one namespace (as Istio allows):
  the first entry gives the attributes, the endpoints of all are merged. If the
  later entry disagrees on ports, addresses, resolution or location, that is
  reported against it.
- The same host in another namespace: the index holds one service per
  hostname, so the later declaration is ignored and reported.
- The same kind/namespace/name declared twice: the later object is ignored
  and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from adapters.files.validate import Host, Object, ServiceEntry, WorkloadEntry, labels_match
from discoveryd.model import Endpoint, Hostname, Problem, Resolution, Service

_COMPARED = ("ports", "addresses", "resolution", "location")


@dataclass(frozen=True, slots=True)
class FileProblem:
    file: str
    problem: Problem


def build(objects: Sequence[Object]) -> tuple[dict[Hostname, Service], list[FileProblem]]:
    problems: list[FileProblem] = []
    entries: list[ServiceEntry] = []
    workloads: dict[str, list[WorkloadEntry]] = {}
    declared: dict[tuple[str, str, str], Object] = {}
    for obj in objects:
        key = (obj.ref.kind, obj.ref.namespace, obj.ref.name)
        earlier = declared.setdefault(key, obj)
        if earlier is not obj:
            message = (
                f"{obj.ref.kind} {obj.ref.namespace}/{obj.ref.name} is already defined at {earlier.ref.where}; ignored"
            )
            problems.append(FileProblem(obj.ref.file, Problem(obj.ref.where, message, "metadata.name")))
        elif isinstance(obj, ServiceEntry):
            entries.append(obj)
        else:
            workloads.setdefault(obj.ref.namespace, []).append(obj)

    services: dict[Hostname, Service] = {}
    owners: dict[Hostname, ServiceEntry] = {}
    for entry in entries:
        if entry.selector is not None:
            selected = workloads.get(entry.ref.namespace, ())
            endpoints = tuple(w.endpoint for w in selected if labels_match(entry.selector, w.endpoint.labels))
        else:
            endpoints = entry.template.endpoints
        for host in entry.hosts:
            service = replace(entry.template, hostname=host.name, endpoints=endpoints or _resolved(entry, host))
            owner = owners.get(host.name)
            if owner is None:
                services[host.name] = service
                owners[host.name] = entry
                continue
            first = services[host.name]
            if first.namespace != service.namespace:
                message = (
                    f"host {host.name} is already declared in namespace {first.namespace} by {owner.ref.kind} "
                    f"{owner.ref.name} ({owner.ref.where}); one host belongs to one namespace, this one is ignored"
                )
                problems.append(FileProblem(entry.ref.file, Problem(host.where, message, host.field)))
                continue
            differ = [a for a in _COMPARED if getattr(first, a) != getattr(service, a)]
            if differ:
                message = (
                    f"host {host.name} is also declared by {owner.ref.kind} {owner.ref.namespace}/{owner.ref.name} "
                    f"({owner.ref.where}) with different {', '.join(differ)}; its attributes are used "
                    "and the endpoints of both are merged"
                )
                problems.append(FileProblem(entry.ref.file, Problem(host.where, message, host.field)))
            added = tuple(ep for ep in service.endpoints if ep not in first.endpoints)
            if added:
                services[host.name] = first.with_endpoints(first.endpoints + added)
    return services, problems


def _resolved(entry: ServiceEntry, host: Host) -> tuple[Endpoint, ...]:
    """Without endpoints or selector, a DNS-resolution host is its own endpoint (Envoy resolves it)."""
    if entry.selector is None and entry.template.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        return (Endpoint(address=host.name),)
    return ()
