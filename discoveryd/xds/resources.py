"""xDS resources, built from index snapshots in this one place.

Data flow: the push loop (`discoveryd.xds.server`) hands each new `Snapshot`
and the hostnames changed since the previous one to `Builder.update`, which
returns a new immutable `View`: for every type URL, resource name → `Resource`
(a version and the serialized `google.protobuf.Any`). Only the changed
hostnames are rebuilt; every other `Resource` object is carried over, so the
bytes of one resource version are built once and shared by every connection.
The tables are persistent maps (`immutables`): a new view shares every
unchanged entry with the previous one, so a push costs O(changed), not
O(resources).
A rebuilt resource whose bytes did not change keeps its old object and is not
reported as changed, so clients see no push for it.

Each view also records who may see the resources of services with an exportTo
(`View.audiences`, restricted names only) and memoizes, per (type, scope), the
body of a wildcard state-of-the-world response, shared by the clients of that
scope (`View.sotw_body`).

A resource's version is a hash of its bytes (serialization is deterministic),
so it means the same thing in every replica and across restarts: a delta
client reconnecting anywhere with `initial_resource_versions` is resent
exactly what differs.

What one `Service` becomes, per port (UDP ports and numbers outside 1-65535 are skipped):

- Cluster `outbound|<port>||<hostname>`:
  - STATIC: type EDS over ADS; its ClusterLoadAssignment of the same name.
  - DNS: STRICT_DNS with the endpoints inline (the hostname itself when the
    service lists no endpoints).
  - DNS_ROUND_ROBIN: LOGICAL_DNS with its one endpoint inline; with several
    endpoints STRICT_DNS instead, since LOGICAL_DNS takes exactly one host.
  - NONE: ORIGINAL_DST with the CLUSTER_PROVIDED policy, Istio's passthrough
    cluster: traffic goes to the address the client dialled. No endpoints.
  HTTP2/GRPC/GRPC-WEB ports get HTTP/2 upstream protocol options.
- ClusterLoadAssignment (STATIC only): endpoints grouped by locality, each
  locality weighted by the sum of its endpoint weights (gRPC ignores localities
  without a weight), endpoint weight, health status, and metadata naming the
  source registry under the filter key `discoveryd`. Endpoints whose address is
  neither an IP nor `unix://`, or whose port is not 1-65535, cannot be served
  and are left out (Envoy would reject the whole resource).
- Listener and RouteConfiguration `<hostname>:<port>` for proxyless gRPC
  clients: an API listener whose HttpConnectionManager fetches that route
  configuration over ADS (router filter last), routing everything to the
  cluster. Not built for NONE services and wildcard hosts, which a gRPC client
  cannot dial.

Traffic policy (`Snapshot.policies[hostname]`, see `discoveryd.policy`) is
built with the service, in `discoveryd.xds.policy`:
- DestinationRule: each subset adds, per port, a cluster
  `outbound|<port>|<subset>|<hostname>` (and for STATIC its assignment of
  the same name) holding only the endpoints whose labels match the subset's;
  the effective trafficPolicy of each cluster (top level, its port level, the
  subset's, the subset's port level) sets its load balancer, outlier
  detection, circuit breakers, protocol options and upstream TLS. An active
  localityLbSetting also records the assignment's locality plan in
  `View.localized` (a namespace's own assignment, from a rule that only
  that namespace sees, in `View.localized_over`); connections serve a
  located client its variant
  (`View.localize`, built once per key in a bounded `VariantCache`, see
  `discoveryd.xds.locality`).
- VirtualService: its http routes replace the catch-all route of
  `<hostname>:<port>`, in order, each match an Envoy route; destinations
  name `outbound|<port>|<subset>|<host>` clusters, weighted when several.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType

import immutables
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from discoveryd import gcpause
from discoveryd.config import LbPolicy
from discoveryd.index import Snapshot
from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, Resolution, Service
from discoveryd.policy import (
    DestinationRule,
    HostPolicy,
    HostTree,
    Subset,
    TrafficPolicy,
    combine,
    is_wildcard,
    wildcard_keys,
)
from discoveryd.xds import policy as traffic
from discoveryd.xds.locality import Client, Key, Plan, plan_for

log = logging.getLogger(__name__)

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
"""Every type served, in push order: CDS before EDS, LDS before RDS."""

SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}

FULL_STATE = frozenset({CLUSTER, LISTENER})
"""Types whose state-of-the-world responses carry every subscribed resource (absent means deleted)."""

METADATA_KEY = "discoveryd"
"""The filter_metadata key under which clusters and endpoints name their source registry."""

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)
_LB = {
    LbPolicy.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbPolicy.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    LbPolicy.RANDOM: cluster_pb2.Cluster.RANDOM,
}
_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
    Health.DRAINING: health_check_pb2.DRAINING,
    Health.UNKNOWN: health_check_pb2.UNKNOWN,
}


def cluster_name(host: str, port: int) -> str:
    return traffic.cluster_name(host, port)


def listener_name(host: str, port: int) -> str:
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Resource:
    """One version of one resource; `body` is a serialized `google.protobuf.Any`."""

    name: str
    version: str
    """A hash of `body`."""
    body: bytes


Audience = frozenset[str]
"""The client namespaces that may see a resource (exportTo resolved); absent from `View.audiences`: everyone."""


def audience(service: Service) -> Audience | None:
    """Who sees `service` (Istio's exportTo): None for everyone (no exportTo, or `*`), else the namespaces.

    `.` is the service's own namespace, `~` nobody, any other entry a namespace by name.
    """
    if not service.export_to or "*" in service.export_to:
        return None
    out = {service.namespace if e == "." else e for e in service.export_to if e != "~"}
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class View:
    """Every resource served for one snapshot version; shared by all connections.

    Immutable but for `_bodies`, a memo the connections fill (event loop only).
    """

    version: int
    resources: Mapping[str, immutables.Map[str, Resource]]
    """type URL → resource name → resource (persistent maps: a new view shares all unchanged entries)."""
    by_host: immutables.Map[Hostname, tuple[tuple[str, str], ...]]
    """hostname → the (type URL, name) pairs built from it."""
    audiences: immutables.Map[str, Audience] = field(default_factory=immutables.Map)
    """Resource name → the namespaces that may see it, for restricted resources only (the rest: everyone).
    A cluster and its assignment, a listener and its route share a name and a service, so one map serves
    every type."""
    granted: immutables.Map[str, int] = field(default_factory=immutables.Map)
    """Namespace → how many names in `audiences` it may see; a client in a namespace not in here sees only
    unrestricted resources."""
    localized: immutables.Map[str, Plan] = field(default_factory=immutables.Map)
    """Assignment name → its locality plan, for the assignments whose cluster has an active localityLbSetting."""
    variants: VariantCache | None = field(default=None, compare=False, repr=False)
    grpc_ignored: immutables.Map[tuple[str, str], tuple[Hostname, traffic.Ignored]] = field(
        default_factory=immutables.Map
    )
    """(type URL, name) → the host and the Istio fields the resource carries that proxyless gRPC does not
    honour (clusters and route configurations shaped by a policy; `discoveryd.xds.unsupported` reports them
    to the gRPC clients sent them)."""
    overrides: immutables.Map[str, immutables.Map[tuple[str, str], Resource | None]] = field(
        default_factory=immutables.Map
    )
    """Client namespace → (type URL, name) → what clients of that namespace see instead of the resource
    in `resources` (None: nothing), for the hosts whose DestinationRule/VirtualService selection differs
    there (the rules' exportTo, a rule in the client's namespace). Only resources that differ are kept (an
    assignment also when only its locality plan differs: then the entry is the shared resource itself)."""
    variant_keys: immutables.Map[Hostname, tuple[tuple[str, str, str], ...]] = field(default_factory=immutables.Map)
    """hostname → the (namespace, type URL, name) entries of `overrides` built from it."""
    localized_over: immutables.Map[str, immutables.Map[str, Plan]] = field(default_factory=immutables.Map)
    """Client namespace → assignment name → the locality plan of that namespace's own assignment (an entry
    of `overrides`), where its effective localityLbSetting is active. Built and bounded like `localized`."""
    grpc_ignored_over: immutables.Map[str, immutables.Map[tuple[str, str], tuple[Hostname, traffic.Ignored]]] = field(
        default_factory=immutables.Map
    )
    """Client namespace → `grpc_ignored` of that namespace's own variants (`overrides`), where they differ."""
    _bodies: dict[tuple[str, str | None], bytes] = field(default_factory=dict, compare=False, repr=False)
    _counts: dict[tuple[str, str | None], int] = field(default_factory=dict, compare=False, repr=False)

    def visible(self, name: str, namespace: str | None) -> bool:
        """Whether a client in `namespace` (None: unknown) may see resource `name` (of `resources`)."""
        allowed = self.audiences.get(name)
        return allowed is None or (namespace is not None and namespace in allowed)

    def get(self, type_url: str, name: str, namespace: str | None) -> Resource | None:
        """The resource `name` as a client in `namespace` sees it: its namespace's variant if there is one,
        else the shared one if its service is exported there; None when it does not exist for that client."""
        if namespace is not None and self.overrides:
            over = self.overrides.get(namespace)
            if over is not None:
                key = (type_url, name)
                if key in over:
                    return over[key]
        r = self.resources[type_url].get(name)
        if r is None or not self.visible(name, namespace):
            return None
        return r

    def ignored(self, type_url: str, name: str, namespace: str | None) -> tuple[Hostname, traffic.Ignored] | None:
        """The host and the fields gRPC does not honour of resource `name` as a client in `namespace` gets it
        (its namespace's variant, else the shared resource); None: none."""
        if namespace is not None and self.overrides:
            over = self.overrides.get(namespace)
            if over is not None and (type_url, name) in over:
                own = self.grpc_ignored_over.get(namespace)
                return own.get((type_url, name)) if own is not None else None
        return self.grpc_ignored.get((type_url, name))

    def names(self, type_url: str, namespace: str | None) -> set[str]:
        """Every name of `type_url` that may exist for a client in `namespace` (a superset: check with `get`)."""
        out = set(self.resources[type_url].keys())
        over = self.overrides.get(namespace) if namespace is not None else None
        if over is not None:
            out.update(n for t, n in over if t == type_url)
        return out

    def _seen(self, type_url: str, scope: str | None) -> Iterator[Resource]:
        """The resources of `type_url` a client of `scope` sees (see `scope`), in table order then variants."""
        table = self.resources[type_url]
        audiences = self.audiences
        over = self.overrides.get(scope) if scope is not None else None
        for r in table.values():
            if over is not None and (type_url, r.name) in over:
                mine = over[(type_url, r.name)]
                if mine is not None:
                    yield mine
                continue
            allowed = audiences.get(r.name)
            if allowed is None or (scope is not None and scope in allowed):
                yield r
        if over is not None:
            for (t, n), mine in over.items():
                if t == type_url and mine is not None and n not in table:
                    yield mine

    @property
    def located(self) -> bool:
        """Whether any assignment has locality variants (shared or of a namespace)."""
        return bool(self.localized) or bool(self.localized_over)

    def has_variants(self, name: str, namespace: str | None) -> bool:
        """Whether assignment `name` may have locality variants for a client in `namespace`."""
        if name in self.localized:
            return True
        plans = self.localized_over.get(namespace) if namespace is not None else None
        return plans is not None and name in plans

    def localize(self, r: Resource, client: Client | None, namespace: str | None = None) -> Resource:
        """The assignment `r` (as `get` gave it to a client in `namespace`) as `client` is to see it: its
        locality variant, or `r` itself.

        A namespace's own assignment (`overrides`) follows that namespace's plan (`localized_over`), the
        shared one the shared plan (`localized`); variants of both are built once per (plan, client key)
        in the same bounded cache."""
        if client is None or self.variants is None:
            return r
        plan: Plan | None = None
        over = self.overrides.get(namespace) if namespace is not None and self.overrides else None
        if namespace is not None and over is not None and (ENDPOINT, r.name) in over:
            if over[(ENDPOINT, r.name)] is not r:
                return r
            plans = self.localized_over.get(namespace)
            plan = plans.get(r.name) if plans is not None else None
        elif self.resources[ENDPOINT].get(r.name) is r:
            plan = self.localized.get(r.name)
        if plan is None:
            return r
        key = plan.key(client)
        if key is None:
            return r
        return self.variants.get(r, plan, key)

    def scope(self, namespace: str | None) -> str | None:
        """The cache key of what `namespace` sees: clients of namespaces that no exportTo names and that have
        no variant of their own (`overrides`) share one (None)."""
        return namespace if namespace in self.granted or namespace in self.overrides else None

    def sotw_body(self, type_url: str, namespace: str | None) -> bytes:
        """Every resource of `type_url` a client in `namespace` sees, as repeated `resources` fields of a
        DiscoveryResponse (the bytes after its header). Built once per (type, scope) and view, then shared
        by every wildcard state-of-the-world client of that scope."""
        key = (type_url, self.scope(namespace))
        body = self._bodies.get(key)
        if body is None:
            parts: list[bytes] = []
            for r in self._seen(type_url, key[1]):
                parts += (b"\x12", _varint(len(r.body)), r.body)
            body = self._bodies[key] = b"".join(parts)
        return body

    def visible_count(self, type_url: str, namespace: str | None) -> int:
        """How many resources of `type_url` a client in `namespace` sees (memoized per scope, like the bodies)."""
        key = (type_url, self.scope(namespace))
        count = self._counts.get(key)
        if count is None:
            if key[1] in self.overrides:
                count = self._counts[key] = sum(1 for _ in self._seen(type_url, key[1]))
                return count
            table = self.resources[type_url]
            hidden = sum(1 for n in self.audiences if n in table and not self.visible(n, key[1]))
            count = self._counts[key] = len(table) - hidden
        return count

    def cached_scopes(self, type_url: str) -> list[str | None]:
        """The scopes whose `sotw_body` of `type_url` has been built (for tests and /debug)."""
        return [scope for t, scope in self._bodies if t == type_url]


class VariantCache:
    """Client variants of locality-aware assignments (see `discoveryd.xds.locality`), least recently used
    first out. Keyed by (name, plan digest, client key): a changed assignment or setting has a new digest,
    and its old variants age out. Shared by the views of one builder; event loop thread only."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.builds = 0
        """Variants built so far (a metric for tests and the bench)."""
        self._lru: OrderedDict[tuple[str, str, Key], Resource] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def held_bytes(self) -> int:
        """The bytes of the variants held (those that are the shared resource itself count too)."""
        return sum(len(r.body) for r in self._lru.values())

    def get(self, base: Resource, plan: Plan, key: Key) -> Resource:
        slot = (base.name, plan.digest, key)
        found = self._lru.get(slot)
        if found is not None:
            self._lru.move_to_end(slot)
            return found
        body = _pack(ENDPOINT, plan.build(key))
        self.builds += 1
        found = base if body == base.body else Resource(base.name, _version(body), body)
        self._lru[slot] = found
        if len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return found

    def resize(self, capacity: int) -> None:
        """Hold at most `capacity` variants from now on (the least recently used go first)."""
        self.capacity = capacity
        while len(self._lru) > capacity:
            self._lru.popitem(last=False)


_NO_OVERRIDES: immutables.Map[tuple[str, str], Resource | None] = immutables.Map()
_NO_PLANS: immutables.Map[str, Plan] = immutables.Map()
_NO_IGNORED: immutables.Map[tuple[str, str], tuple[Hostname, traffic.Ignored]] = immutables.Map()


def _digest(plan: Plan | None) -> str | None:
    return plan.digest if plan is not None else None


EMPTY_VIEW = View(0, MappingProxyType({t: immutables.Map() for t in TYPES}), immutables.Map())

Prebuilt = Sequence[tuple[str, str, bytes]]
"""One hostname's resources as (type URL, name, serialized `Any`), in build order."""

Changes = Mapping[str, frozenset[str]]
"""type URL → names added, changed or removed by an update."""


@dataclass(frozen=True, slots=True)
class BuildOptions:
    connect_timeout: float = 10.0
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    locality_variants: int = 4096
    """How many client variants of locality-aware assignments are kept at least (least recently used out);
    the cache grows to `VARIANTS_PER_PLAN` per located assignment when there are more of those."""
    root_namespace: str = "istio-system"
    """Istio's mesh root namespace: its DestinationRules apply after the client's and the service's own."""


VARIANTS_PER_PLAN = 8
"""Variants the cache keeps room for per located assignment. A plan has one key per distinct endpoint
locality (and failover region, distribute entry, label value prefix) a client can match, whatever clients
send, so this bounds memory by the configuration; a cache smaller than the variants in use would miss on
every lookup once clients of several localities take turns (LRU under a cyclic scan)."""


BUILD_STEP = 0.002
"""Seconds of building between two yields to the event loop (`Builder.update_in_steps`)."""


def _run(steps: Generator[None, None, tuple[View, Changes]], seconds: float) -> tuple[View, Changes] | None:
    """Advances `steps` for about `seconds` (wall; checked after each step): its result, or None if unfinished."""
    started = time.perf_counter()
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: tuple[View, Changes] = done.value
            return result
        if time.perf_counter() - started >= seconds:
            return None


class Builder:
    """Turns snapshots into views. Owned by the push loop; not shared."""

    def __init__(self, options: BuildOptions) -> None:
        self._options = options
        self._timeout = duration_pb2.Duration()
        self._timeout.FromTimedelta(timedelta(seconds=options.connect_timeout))
        self.variants = VariantCache(options.locality_variants)
        self._plans: dict[str, Plan] = {}
        """Filled by `build`: the locality plans of the assignments it built."""
        self._ignored: dict[tuple[str, str], traffic.Ignored] = {}
        """Filled by `build`: what proxyless gRPC does not honour in the resources it built."""
        self._wild: dict[Hostname, HostPolicy] = {}
        """The policies of wildcard hosts (`*.example.com`, `*`) in the snapshot last built."""
        self._tree: HostTree | None = None
        """The service hostnames of that snapshot by domain, kept only while there are wildcard policies."""
        self._halfway = False
        """Whether an update started and did not finish (cancelled or failed between two steps)."""

    def update(
        self,
        old: View,
        snapshot: Snapshot,
        changed: Iterable[Hostname] | None,
        prebuilt: Mapping[Hostname, Prebuilt] | None = None,
    ) -> tuple[View, Changes]:
        """The view of `snapshot`, rebuilding only `changed` hostnames (all of them when None), in one call.

        See `_update_steps`; `update_in_steps` is the same build in steps, for the event loop.
        """
        result = _run(self._update_steps(old, snapshot, changed, prebuilt), math.inf)
        assert result is not None
        return result

    async def update_in_steps(
        self,
        old: View,
        snapshot: Snapshot,
        changed: Iterable[Hostname] | None,
        prebuilt: Mapping[Hostname, Prebuilt] | None = None,
        step: float = BUILD_STEP,
    ) -> tuple[View, Changes]:
        """`update`, yielding to the event loop whenever `step` seconds (wall) of building have passed.

        The old view stays whole and usable meanwhile (connections read it, `View.localize` fills the shared
        `VariantCache`); the new one exists only once this returns. Cancelled or failed halfway, the next
        update of this builder rebuilds every hostname (its wildcard state had moved on).

        The cyclic garbage collector is paused meanwhile (`gcpause`): the build makes no reference cycles,
        and a full collection among the objects of 100k services and their resources is 2-3 s of CPU in one step.
        """
        with gcpause.paused():
            steps = self._update_steps(old, snapshot, changed, prebuilt)
            while True:
                result = _run(steps, step)
                if result is not None:
                    return result
                await asyncio.sleep(0)

    def _update_steps(
        self,
        old: View,
        snapshot: Snapshot,
        changed: Iterable[Hostname] | None,
        prebuilt: Mapping[Hostname, Prebuilt] | None = None,
    ) -> Generator[None, None, tuple[View, Changes]]:
        """The view of `snapshot`, rebuilding only `changed` hostnames (all of them when None); yields after
        each hostname built (a point where the caller may let others run), returns (view, changes).

        O(changed): the tables are persistent maps, so an update touches only
        the entries of the changed hostnames, whatever the size of the view.
        A host whose DestinationRule/VirtualService selection differs between
        client namespaces is built once per distinct selection: the selection
        of a client without a namespace goes into the shared tables, each
        other one into `View.overrides` of its namespaces, where it differs.
        `prebuilt`: serialized resources of hostnames without a policy, known to be what `build`
        makes of their service in `snapshot` (a warm start's saved resources): taken as they are.
        """
        if self._halfway:  # the last build stopped partway: its wildcard state is of another snapshot
            changed = None
        self._halfway = True
        hosts = set(snapshot.services) | set(old.by_host) if changed is None else set(changed)
        hosts |= self._track_wildcards(snapshot, None if changed is None else hosts)
        seeded: dict[str, set[str]] = {}
        if prebuilt and not old.by_host:  # a warm start's first build: the saved resources in bulk
            old, seeded = self._seed(snapshot, prebuilt, old.version)
            hosts.difference_update(old.by_host)
            prebuilt = None
        tables = {t: old.resources[t].mutate() for t in TYPES}
        by_host = old.by_host.mutate()
        audiences = old.audiences.mutate()
        granted = old.granted.mutate()
        localized = old.localized.mutate()
        ignored = old.grpc_ignored.mutate()
        overrides = old.overrides.mutate()
        variant_keys = old.variant_keys.mutate()
        localized_over = old.localized_over.mutate()
        ignored_over = old.grpc_ignored_over.mutate()
        touched: dict[str, set[str]] = {t: set() for t in TYPES}
        for host in hosts:
            keys_before: tuple[tuple[str, str], ...] = by_host.pop(host, ())
            previous = {key: tables[key[0]].pop(key[1]) for key in keys_before if key[1] in tables[key[0]]}
            was: dict[str, Audience | None] = {}
            for _, name in keys_before:  # a cluster and its assignment share one name and one entry
                if name not in was:
                    was[name] = allowed = audiences.pop(name, None)
                    _count(granted, allowed, -1)
            plans_before = {name: localized.pop(name) for t, name in keys_before if t == ENDPOINT and name in localized}
            for key in keys_before:
                if key in ignored:
                    del ignored[key]
            service = snapshot.services.get(host)
            self._plans.clear()
            self._ignored.clear()
            policy = self._policy_for(snapshot, host)
            packed = prebuilt.get(host) if prebuilt is not None and service is not None and policy is None else None
            scoped: list[tuple[HostPolicy, list[str]]] = []
            if packed is None:
                shared, scoped = self._select(service, policy)
                built = self._build_or_skip(service, shared) if service is not None else []
                packed = [(type_url, name, _pack(type_url, message)) for type_url, name, message in built]
            for key, fields in self._ignored.items():
                ignored[key] = (host, fields)
            plans = dict(self._plans)
            for name, plan in plans.items():
                localized[name] = plan
            for name in plans_before.keys() | plans.keys():
                if _digest(plans_before.get(name)) != _digest(plans.get(name)):
                    touched[ENDPOINT].add(name)  # same shared bytes, other variants for located clients
            now = audience(service) if service is not None else None
            keys = []
            bodies: dict[tuple[str, str], bytes] = {}
            for type_url, name, body in packed:
                bodies[(type_url, name)] = body
                before = previous.pop((type_url, name), None)
                if before is not None and before.body == body:
                    tables[type_url][name] = before
                    if was.get(name) != now:  # same bytes, other audience: a change for the clients concerned
                        touched[type_url].add(name)
                else:
                    tables[type_url][name] = Resource(name, _version(body), body)
                    touched[type_url].add(name)
                if now is not None and name not in audiences:
                    audiences[name] = now
                    _count(granted, now, 1)
                keys.append((type_url, name))
            for type_url, name in previous:
                touched[type_url].add(name)
            if keys:
                by_host[host] = tuple(keys)
            # Namespaces whose rules differ: their own variants of what differs from the shared build.
            before_over: dict[tuple[str, str, str], Resource | None] = {}
            before_plans: dict[tuple[str, str], Plan] = {}
            for ns, type_url, name in variant_keys.pop(host, ()):
                held = overrides.get(ns)
                if held is not None and (type_url, name) in held:
                    before_over[(ns, type_url, name)] = held[(type_url, name)]
                    rest = held.delete((type_url, name))
                    if len(rest):
                        overrides[ns] = rest
                    else:
                        del overrides[ns]
                held_ignored = ignored_over.get(ns)
                if held_ignored is not None and (type_url, name) in held_ignored:
                    rest_ignored = held_ignored.delete((type_url, name))
                    if len(rest_ignored):
                        ignored_over[ns] = rest_ignored
                    else:
                        del ignored_over[ns]
                held_plans = localized_over.get(ns) if type_url == ENDPOINT else None
                if held_plans is not None and name in held_plans:
                    before_plans[(ns, name)] = held_plans[name]
                    rest_plans = held_plans.delete(name)
                    if len(rest_plans):
                        localized_over[ns] = rest_plans
                    else:
                        del localized_over[ns]
            now_over: dict[tuple[str, str, str], Resource | None] = {}
            now_plans: dict[tuple[str, str], Plan] = {}
            now_ignored: dict[tuple[str, str, str], traffic.Ignored] = {}
            if service is not None:
                for selection, namespaces in scoped:
                    self._plans.clear()
                    self._ignored.clear()
                    own = {(t, n): _pack(t, m) for t, n, m in self._build_or_skip(service, selection)}
                    own_plans = dict(self._plans)
                    own_ignored = dict(self._ignored)
                    for key in bodies.keys() | own.keys():
                        variant = own.get(key)
                        type_url, name = key
                        own_plan = own_plans.get(name) if type_url == ENDPOINT else None
                        same_plan = type_url != ENDPOINT or _digest(own_plan) == _digest(plans.get(name))
                        if variant == bodies.get(key) and same_plan:
                            continue
                        if variant is None:
                            mine = None
                        elif variant == bodies.get(key):  # same bytes, another locality plan
                            mine = tables[type_url][name]
                        else:
                            mine = Resource(name, _version(variant), variant)
                        own_fields = own_ignored.get(key) if mine is not None else None
                        for ns in namespaces:
                            now_over[(ns, type_url, name)] = mine
                            if own_plan is not None and mine is not None:
                                now_plans[(ns, name)] = own_plan
                            if own_fields:
                                now_ignored[(ns, type_url, name)] = own_fields
                self._plans.clear()
                self._ignored.clear()
            for (ns, type_url, name), fields in now_ignored.items():
                ignored_over[ns] = ignored_over.get(ns, _NO_IGNORED).set((type_url, name), (host, fields))
            for (ns, type_url, name), variant_r in now_over.items():
                overrides[ns] = overrides.get(ns, _NO_OVERRIDES).set((type_url, name), variant_r)
            for (ns, name), plan in now_plans.items():
                localized_over[ns] = localized_over.get(ns, _NO_PLANS).set(name, plan)
            if now_over:
                variant_keys[host] = tuple(now_over)
            for entry in before_over.keys() | now_over.keys():
                was_r, now_r = before_over.get(entry), now_over.get(entry)
                plan_key = (entry[0], entry[2])
                if (
                    (was_r.version if was_r else None) != (now_r.version if now_r else None)
                    or (entry in before_over) != (entry in now_over)
                    or _digest(before_plans.get(plan_key)) != _digest(now_plans.get(plan_key))
                ):
                    touched[entry[1]].add(entry[2])
            yield
        view = View(
            snapshot.version,
            MappingProxyType({t: tables[t].finish() for t in TYPES}),
            by_host.finish(),
            audiences.finish(),
            granted.finish(),
            localized.finish(),
            self.variants,
            ignored.finish(),
            overrides.finish(),
            variant_keys.finish(),
            localized_over.finish(),
            ignored_over.finish(),
        )
        for type_url, names in seeded.items():
            touched[type_url] |= names
        located = len(view.localized) + sum(len(plans) for plans in view.localized_over.values())
        self.variants.resize(max(self._options.locality_variants, VARIANTS_PER_PLAN * located))
        self._halfway = False
        return view, {t: frozenset(names) for t, names in touched.items() if names}

    def _seed(
        self, snapshot: Snapshot, prebuilt: Mapping[Hostname, Prebuilt], version: int
    ) -> tuple[View, dict[str, set[str]]]:
        """A view of the saved resources of the hostnames without a policy (what `update` would make
        of them from an empty view, several times faster), and their names as changed."""
        tables: dict[str, dict[str, Resource]] = {t: {} for t in TYPES}
        by_host: dict[Hostname, tuple[tuple[str, str], ...]] = {}
        audiences: dict[str, Audience] = {}
        granted: dict[str, int] = {}
        services, policies = snapshot.services, snapshot.policies
        for host, items in prebuilt.items():
            service = services.get(host)
            if service is None or host in policies or not items:
                continue
            if self._wild and any(k in self._wild for k in wildcard_keys(host)):
                continue
            now = audience(service)
            for type_url, name, body in items:
                tables[type_url][name] = Resource(name, _version(body), body)
                if now is not None and name not in audiences:
                    audiences[name] = now
                    _count(granted, now, 1)
            by_host[host] = tuple((type_url, name) for type_url, name, _ in items)
        view = View(
            version,
            MappingProxyType({t: immutables.Map(tables[t]) for t in TYPES}),
            immutables.Map(by_host),
            immutables.Map(audiences),
            immutables.Map(granted),
            immutables.Map(),
            self.variants,
        )
        return view, {t: set(table) for t, table in tables.items()}

    def _track_wildcards(self, snapshot: Snapshot, changed: set[Hostname] | None) -> set[Hostname]:
        """Bring the wildcard policies and the hostname tree up to `snapshot` (`changed`: the hostnames that
        changed since the last one, None: any); the hosts a changed wildcard policy applies to, to rebuild.

        O(changed) but for a wildcard policy's change, which costs the hosts it matches (found through the
        tree, not by scanning every name); the tree is built when the first wildcard policy appears."""
        if changed is None:
            self._wild = {h: p for h, p in snapshot.policies.items() if is_wildcard(h)}
            self._tree = HostTree(snapshot.services) if self._wild else None
            return set()
        moved: list[Hostname] = []
        for host in changed:
            if is_wildcard(host):
                now = snapshot.policies.get(host)
                if now is not self._wild.get(host):
                    moved.append(host)
                    if now is None:
                        del self._wild[host]
                    else:
                        self._wild[host] = now
        if self._tree is not None:
            services = snapshot.services
            for host in changed:
                if host in services:
                    self._tree.add(host)
                else:
                    self._tree.discard(host)
        elif self._wild:
            self._tree = HostTree(snapshot.services)
        extra: set[Hostname] = set()
        if self._tree is not None:
            for host in moved:
                extra.update(self._tree.matching(host))
        if not self._wild:
            self._tree = None
        return extra

    def _policy_for(self, snapshot: Snapshot, host: Hostname) -> HostPolicy | None:
        """The policy of `host`: its own, with those of the wildcard hosts that match it (most specific
        first, `policy.combine`). O(labels of the name)."""
        policy = snapshot.policies.get(host)
        if not self._wild:
            return policy
        found = [p for k in wildcard_keys(host) if (p := self._wild.get(k)) is not None]
        if not found:
            return policy
        return combine([policy, *found] if policy is not None else found, by_specificity=True)

    def _select(
        self, service: Service | None, policy: HostPolicy | None
    ) -> tuple[HostPolicy | None, list[tuple[HostPolicy, list[str]]]]:
        """The policy a client without a namespace sees (the shared build), and each other selection with the
        client namespaces that see it (`HostPolicy.select`); namespaces the service is not exported to are
        left out (they see none of it)."""
        if service is None or policy is None:
            return policy, []
        root = self._options.root_namespace
        shared = policy.select(None, service.namespace, root)
        allowed = audience(service)
        scoped: list[tuple[HostPolicy, list[str]]] = []
        for ns in sorted(policy.namespaces()):
            if allowed is not None and ns not in allowed:
                continue
            mine = policy.select(ns, service.namespace, root)
            if mine == shared:
                continue
            for selection, namespaces in scoped:
                if selection == mine:
                    namespaces.append(ns)
                    break
            else:
                scoped.append((mine, [ns]))
        return shared, scoped

    def _build_or_skip(self, service: Service, policy: HostPolicy | None = None) -> list[tuple[str, str, Message]]:
        """`build`, or nothing when the service holds values no resource can carry (logged, not raised)."""
        try:
            return self.build(service, policy)
        except (ValueError, TypeError) as e:
            self._plans.clear()
            self._ignored.clear()
            log.error("xds: %s (from %s) cannot be served: %s", service.hostname, service.source, e)
            return []

    def build(self, service: Service, policy: HostPolicy | None = None) -> list[tuple[str, str, Message]]:
        """The (type URL, name, message) resources of one service, shaped by its traffic policy if any."""
        out: list[tuple[str, str, Message]] = []
        rule = policy.destination_rule if policy is not None else None
        routes = policy.virtual_service if policy is not None else None
        for port in service.ports:
            if port.protocol.is_udp or not _valid_port(port.number):
                continue
            cluster = self._cluster(service, port)
            if cluster is None:
                continue
            effective = rule.effective(port.number) if rule is not None else None
            if effective is not None:
                traffic.apply(cluster, effective, port)
                self._note(CLUSTER, cluster.name, traffic.grpc_ignored_by_cluster(effective))
            out.append((CLUSTER, cluster.name, cluster))
            if cluster.type == cluster_pb2.Cluster.EDS:
                out.append((ENDPOINT, cluster.name, self._assignment(cluster.name, service, port, None, effective)))
            if rule is not None:
                out += self._subsets(service, port, rule)
            if service.resolution is not Resolution.NONE and not service.is_wildcard:
                name = listener_name(service.hostname, port.number)
                faults = routes is not None and any(r.fault is not None for r in routes.http)
                out.append((LISTENER, name, _listener(name, faults)))
                if routes is not None:
                    out.append((ROUTE, name, traffic.route_configuration(name, service.hostname, port, routes, rule)))
                    self._note(ROUTE, name, traffic.grpc_ignored_by_routes(routes))
                else:
                    out.append((ROUTE, name, _route(name, service.hostname, cluster.name, rule, port)))
        return out

    def _note(self, type_url: str, name: str, fields: traffic.Ignored) -> None:
        if fields:
            self._ignored[(type_url, name)] = fields

    def _subsets(self, service: Service, port: Port, rule: DestinationRule) -> list[tuple[str, str, Message]]:
        out: list[tuple[str, str, Message]] = []
        for subset in rule.subsets:
            sub = self._cluster(service, port, subset)
            if sub is None:
                continue
            effective = rule.effective(port.number, subset)
            traffic.apply(sub, effective, port)
            self._note(CLUSTER, sub.name, traffic.grpc_ignored_by_cluster(effective))
            out.append((CLUSTER, sub.name, sub))
            if sub.type == cluster_pb2.Cluster.EDS:
                out.append((ENDPOINT, sub.name, self._assignment(sub.name, service, port, subset, effective)))
        return out

    def _assignment(
        self, name: str, service: Service, port: Port, subset: Subset | None, policy: TrafficPolicy | None
    ) -> endpoint_pb2.ClusterLoadAssignment:
        """The shared assignment; with an active localityLbSetting, its locality plan is kept in `_plans`."""
        lb = policy.load_balancer if policy is not None else None
        setting = lb.locality if lb is not None else None
        if setting is None or policy is None:
            return _assignment(name, service, port, subset)
        members: list[list[Endpoint]] = []
        cla = _assignment(name, service, port, subset, members)
        plan = plan_for(cla, members, setting, policy.outlier_detection is not None)
        if plan is not None:
            self._plans[name] = plan
        return cla

    def _cluster(self, service: Service, port: Port, subset: Subset | None = None) -> cluster_pb2.Cluster | None:
        name = traffic.cluster_name(service.hostname, port.number, subset.name if subset else "")
        c = cluster_pb2.Cluster(name=name, lb_policy=_LB[self._options.lb_policy])
        c.connect_timeout.CopyFrom(self._timeout)
        c.metadata.filter_metadata[METADATA_KEY].CopyFrom(_source_metadata(service.source))
        resolution = service.resolution
        if resolution is Resolution.STATIC:
            c.type = cluster_pb2.Cluster.EDS
            c.eds_cluster_config.eds_config.CopyFrom(_ADS)
            c.eds_cluster_config.service_name = name
        elif resolution is Resolution.NONE:
            c.type = cluster_pb2.Cluster.ORIGINAL_DST
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        else:
            targets: list[tuple[str, int, Endpoint | None]] = [
                (ep.address, ep.port_for(port), ep)
                for ep in service.endpoints
                if not ep.address.startswith("unix://")
                and _valid_port(ep.port_for(port))
                and (subset is None or traffic.selects(subset, ep))
            ]
            if not targets and subset is None:
                if service.is_wildcard:
                    log.debug("%s: DNS resolution of a wildcard host without endpoints: no cluster", name)
                    return None
                targets = [(service.hostname, port.target_port or port.number, None)]
            # A subset selecting no endpoint keeps a cluster without hosts, as Istio builds it.
            logical = resolution is Resolution.DNS_ROUND_ROBIN and len(targets) == 1
            c.type = cluster_pb2.Cluster.LOGICAL_DNS if logical else cluster_pb2.Cluster.STRICT_DNS
            c.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
            c.load_assignment.cluster_name = name
            group = c.load_assignment.endpoints.add()
            for address, number, ep in targets:
                lb = group.lb_endpoints.add()
                lb.endpoint.address.socket_address.address = address
                lb.endpoint.address.socket_address.port_value = number
                if ep is not None:
                    _fill_endpoint(lb, ep)
        if port.protocol.is_http2:
            options = http_protocol_options_pb2.HttpProtocolOptions()
            options.explicit_http_config.http2_protocol_options.CopyFrom(protocol_pb2.Http2ProtocolOptions())
            c.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(options)
        return c


def _assignment(
    name: str,
    service: Service,
    port: Port,
    subset: Subset | None = None,
    members: list[list[Endpoint]] | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    """`members`, when given, receives the endpoints of each locality group, in order."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    groups: dict[Locality, list[Endpoint]] = {}
    for ep in service.endpoints:
        if subset is not None and not traffic.selects(subset, ep):
            continue
        if ep.address.startswith("unix://") or (ep.is_ip and _valid_port(ep.port_for(port))):
            groups.setdefault(ep.locality, []).append(ep)
    for locality, endpoints in groups.items():
        group = cla.endpoints.add()
        group.locality.CopyFrom(
            base_pb2.Locality(region=locality.region, zone=locality.zone, sub_zone=locality.subzone)
        )
        group.load_balancing_weight.value = sum(max(1, ep.weight) for ep in endpoints)
        if members is not None:
            members.append(endpoints)
        for ep in endpoints:
            lb = group.lb_endpoints.add()
            if ep.is_ip:
                lb.endpoint.address.socket_address.address = ep.address
                lb.endpoint.address.socket_address.port_value = ep.port_for(port)
            else:
                lb.endpoint.address.pipe.path = ep.address.removeprefix("unix://")
            _fill_endpoint(lb, ep)
    return cla


def _fill_endpoint(lb: endpoint_components_pb2.LbEndpoint, ep: Endpoint) -> None:
    lb.health_status = _HEALTH[ep.health]
    lb.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=max(1, ep.weight)))
    if ep.hostname:
        lb.endpoint.hostname = ep.hostname
    lb.metadata.filter_metadata[METADATA_KEY].CopyFrom(_source_metadata(ep.source))


def _valid_port(number: int) -> bool:
    return 0 < number < 65536


def _listener(name: str, faults: bool = False) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    manager.rds.config_source.CopyFrom(_ADS)
    manager.rds.route_config_name = name
    if faults:
        traffic.add_fault_filter(manager)
    router = manager.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    listener = listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener())
    listener.api_listener.api_listener.Pack(manager)
    return listener


def _route(
    name: str, host: str, cluster: str, rule: DestinationRule | None = None, port: Port | None = None
) -> route_pb2.RouteConfiguration:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=""),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )
    if rule is not None and port is not None:
        traffic.add_hash_policy(route.route, rule.effective(port.number))
    vhost = route_components_pb2.VirtualHost(name=name, domains=[name, host], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


@functools.lru_cache(maxsize=1024)
def _source_metadata(source: str) -> struct_pb2.Struct:
    """The `discoveryd` metadata of a cluster or endpoint, one per registry (callers copy it, never change it)."""
    return _struct({"source": source})


def _struct(fields: Mapping[str, str]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


def _version(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def _pack(type_url: str, message: Message) -> bytes:
    value = message.SerializeToString(deterministic=True)
    packed: bytes = any_pb2.Any(type_url=type_url, value=value).SerializeToString(deterministic=True)
    return packed


def _count(granted: immutables.MapMutation[str, int] | dict[str, int], allowed: Audience | None, delta: int) -> None:
    """Add `delta` to the number of restricted names each namespace of `allowed` may see."""
    for ns in allowed or ():
        left = granted.get(ns, 0) + delta
        if left:
            granted[ns] = left
        else:
            del granted[ns]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
