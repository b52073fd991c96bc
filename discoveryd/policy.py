"""Traffic policy values: Istio's DestinationRule and VirtualService, as the servers use them.

Data flow: an adapter reads `networking.istio.io/v1` DestinationRule and
VirtualService objects (`adapters.istio.policy` validates and translates
them), groups them per destination host into one `HostPolicy` and hands it to
its shard (`discoveryd.registry.PolicyWriter.set_policy`). The index keeps the
policies of each shard next to its services and combines them per host by the
same ranking as services (`discoveryd.index`, `combine`): every shard's rules
are kept, the highest-ranked shard's first; the policy of a host applies
whatever registry provides its service. The xDS builder reads
`Snapshot.policies[host]` together with `Snapshot.services[host]`.

Everything here is immutable. Durations are seconds (float); None means
"not set" (the client's default applies), which is not the same as 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from discoveryd.model import Hostname


class SimpleLb(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    LEAST_CONN = "LEAST_CONN"
    """Istio's deprecated name of LEAST_REQUEST."""


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """Exactly one of the hash keys is set (validated by the reader)."""

    header: str = ""
    cookie: str = ""
    cookie_path: str = ""
    cookie_ttl: float | None = None
    source_ip: bool = False
    query_parameter: str = ""
    maglev: bool = False
    """MAGLEV instead of RING_HASH."""
    table_size: int | None = None
    """Maglev table size, or the ring hash's minimum ring size."""


@dataclass(frozen=True, slots=True)
class LocalityDistribute:
    """One `distribute` entry: clients in `origin` send `weights` percent to each destination locality.

    Localities are `region/zone/subzone` prefixes, `*` standing for any value of the last part given.
    """

    origin: str
    weights: tuple[tuple[str, int], ...]
    """Destination locality → weight (percent; they sum to 100), in declared order."""


@dataclass(frozen=True, slots=True)
class LocalityLb:
    """Istio's localityLbSetting: locality-aware load balancing of one cluster.

    Per client: endpoints get EDS priorities relative to the client's locality
    (failover) or labels (failoverPriority), or locality weights (distribute).
    """

    enabled: bool | None = None
    """False turns locality load balancing off for the cluster; None and True leave it on."""
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[tuple[str, str], ...] = ()
    """(from region, to region) pairs, in declared order."""
    failover_priority: tuple[str, ...] = ()
    """Label keys, each optionally `key=value` (the value to match instead of the client's own)."""

    def active(self, outlier_detection: bool) -> bool:
        """Whether the setting changes anything: distribute always, failover only with outlier detection."""
        if self.enabled is False:
            return False
        return bool(self.distribute) or outlier_detection


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: SimpleLb | None = None
    consistent_hash: ConsistentHash | None = None
    warmup: float | None = None
    locality: LocalityLb | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time: float | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    tcp_keepalive: TcpKeepalive | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None


class TlsMode(StrEnum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


@dataclass(frozen=True, slots=True)
class ClientTls:
    mode: TlsMode = TlsMode.DISABLE
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One level of settings; a None field inherits from the level above (see `effective`)."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTls | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()
    """portLevelSettings: port number → its settings (without port_level of their own)."""

    def for_port(self, port: int) -> TrafficPolicy:
        """This level with its portLevelSettings for `port` laid over it."""
        for number, settings in self.port_level:
            if number == port:
                return _overlay(self, settings)
        return self


def _overlay(base: TrafficPolicy, top: TrafficPolicy) -> TrafficPolicy:
    return TrafficPolicy(
        top.load_balancer if top.load_balancer is not None else base.load_balancer,
        top.connection_pool if top.connection_pool is not None else base.connection_pool,
        top.outlier_detection if top.outlier_detection is not None else base.outlier_detection,
        top.tls if top.tls is not None else base.tls,
    )


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    host: Hostname
    """Resolved: a short name is `<name>.<namespace>.svc.<domain>` as Istio resolves it."""
    namespace: str
    name: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    where: str = field(default="", compare=False)
    """Where the object is declared (file:line), for messages."""
    export_to: tuple[str, ...] = ()
    """Istio's exportTo: `.` (own namespace), `*` (all), `~` (none) or namespace names; empty: all."""

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None

    def effective(self, port: int, subset: Subset | None = None) -> TrafficPolicy:
        """The settings of one cluster: top level, its port level, the subset's, the subset's port level."""
        policy = (self.traffic_policy or TrafficPolicy()).for_port(port)
        if subset is not None and subset.traffic_policy is not None:
            policy = _overlay(policy, subset.traffic_policy.for_port(port))
        return TrafficPolicy(policy.load_balancer, policy.connection_pool, policy.outlier_detection, policy.tls)


class MatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """All conditions must hold (one entry of an HTTP route's `match` list; the entries are ORed)."""

    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    """Istio's `Headers.HeaderOperations` for one direction. Names keep the case written (HTTP/2 lowers them)."""

    set: tuple[tuple[str, str], ...] = ()
    """Replace the header's values (added when absent)."""
    add: tuple[tuple[str, str], ...] = ()
    """Append a value (added when absent)."""
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    """Header manipulation of a route or a route destination.

    The reader keeps pseudo-headers and `host` out of `request.set/add`: an
    `:authority` or `host` value there is `authority` (a host rewrite, as
    Istio translates it)."""

    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()
    authority: str = ""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Istio's HTTPRewrite: at most one of `uri` and `uri_regex`; `authority` independently."""

    uri: str = ""
    """Replaces the matched prefix (a prefix match), or the whole path (an exact or regex match)."""
    uri_regex: tuple[str, str] | None = None
    """(RE2 pattern, substitution with \\1-style groups): Envoy's regex_rewrite."""
    authority: str = ""
    """The Host/:authority sent upstream."""


@dataclass(frozen=True, slots=True)
class RouteDestination:
    host: Hostname
    subset: str = ""
    port: int | None = None
    """None: the port the client dialled (the route configuration's port)."""
    weight: int = 0
    """0 with a single destination: all traffic."""
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    """An HTTP status to answer with."""
    abort_grpc_status: int | None = None
    """A gRPC status code to answer with (proxyless gRPC honours both)."""
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()
    """Empty: matches every request."""
    destinations: tuple[RouteDestination, ...] = ()
    timeout: float | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    rewrite: Rewrite | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    hosts: tuple[Hostname, ...]
    namespace: str
    name: str
    http: tuple[HttpRoute, ...] = ()
    where: str = field(default="", compare=False)
    export_to: tuple[str, ...] = ()
    """Istio's exportTo, as for `DestinationRule.export_to`."""


def _public(export_to: tuple[str, ...]) -> bool:
    return not export_to or "*" in export_to


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """What applies to traffic for one host: its DestinationRule and its VirtualService, either may be absent.

    As the index carries it, a host's policy may hold several of each, from
    different namespaces and with their own exportTo: `destination_rule` and
    `virtual_service` are the first in precedence order (the most specific
    host they were written for, then the source's rank, see `combine`; then
    Istio's creation, then name order: here the reader's scope order),
    `other_rules`/`other_routes`
    the rest. What one client sees is `select(...)`: a plain policy of at
    most one of each (a plain policy's own two, exported to everyone and in
    the service's namespace, are seen by every client).
    """

    destination_rule: DestinationRule | None = None
    virtual_service: VirtualService | None = None
    other_rules: tuple[DestinationRule, ...] = ()
    other_routes: tuple[VirtualService, ...] = ()
    route_ranks: tuple[int, ...] = ()
    """How specific the host each of `routes` applies by is (0: the host itself, 1: the most specific
    wildcard that matches it, ...; see `combine`); empty: all 0."""

    @property
    def rules(self) -> tuple[DestinationRule, ...]:
        """Every DestinationRule, in precedence order."""
        first = (self.destination_rule,) if self.destination_rule is not None else ()
        return first + self.other_rules

    @property
    def routes(self) -> tuple[VirtualService, ...]:
        """Every VirtualService, in precedence order."""
        first = (self.virtual_service,) if self.virtual_service is not None else ()
        return first + self.other_routes

    def namespaces(self) -> set[str]:
        """The client namespaces whose selection may differ from a client without a namespace: the rules'
        own namespaces and every namespace named in an exportTo. Any other namespace sees `select(None)`."""
        out: set[str] = set()
        objects: list[DestinationRule | VirtualService] = [*self.rules, *self.routes]
        for obj in objects:
            out.add(obj.namespace)
            out.update(e for e in obj.export_to if e not in (".", "*", "~"))
        return out

    def select(self, namespace: str | None, service_namespace: str, root_namespace: str) -> HostPolicy:
        """The DestinationRule and VirtualService a client in `namespace` (None: unknown) sees, as Istio picks
        them for a service of `service_namespace`.

        DestinationRule: first one of the client's own namespace that is visible there (exportTo empty,
        `*`, `.` or naming it; in the root namespace only those private to it), else the first of the
        service's namespace, then of `root_namespace`, that is exported to the client (exportTo empty,
        `*`, or naming its namespace; one exported only to its own namespace does not count). A client
        without a namespace sees only rules exported to everyone.

        VirtualService: the first one private to the client's namespace (`.` or its own name), else the
        first exported to it by name from another namespace, else the first public one (exportTo empty
        or `*`); `~` hides it from everyone.
        """
        return HostPolicy(
            _pick_rule(self.rules, namespace, service_namespace, root_namespace),
            _pick_route(self.routes, self.route_ranks, namespace),
        )


def combine(parts: Sequence[HostPolicy], by_specificity: bool = False) -> HostPolicy | None:
    """One policy holding the rules and routes of `parts`, in their order (`select` picks the first that
    applies, so an earlier part wins a tie).

    `by_specificity`: the parts are a host's own policy and those of the wildcards that match it, most
    specific first (`wildcard_keys`); a DestinationRule is then picked per namespace as before, the most
    specific first within each namespace (Istio: the client's namespace, then the service's, then the root
    namespace, each by most specific host), and a VirtualService by most specific host first, then as
    before (Envoy matches the most specific domain of the route configuration). Otherwise the parts are
    of one host (several sources) and keep their routes' ranks."""
    if len(parts) == 1:
        return parts[0]
    rules: list[DestinationRule] = []
    routes: list[VirtualService] = []
    ranks: list[int] = []
    for i, part in enumerate(parts):
        rules += part.rules
        mine = part.routes
        routes += mine
        if by_specificity:
            ranks += [i] * len(mine)
        else:
            ranks += part.route_ranks or [0] * len(mine)
    if not rules and not routes:
        return None
    return HostPolicy(
        rules[0] if rules else None,
        routes[0] if routes else None,
        tuple(rules[1:]),
        tuple(routes[1:]),
        tuple(ranks) if any(ranks) else (),
    )


def wildcard_keys(host: Hostname) -> list[Hostname]:
    """The wildcard rule hosts that match `host`, most specific first: `a.b.c` → `*.b.c`, `*.c`, `*` (a
    wildcard host `*.b.c` → `*.c`, `*`: the wildcards it is a subset of). O(labels of the name)."""
    out: list[Hostname] = []
    rest: str = host
    while True:
        _, dot, rest = rest.partition(".")
        if not dot:
            break
        out.append(Hostname("*." + rest))
    if out and is_wildcard(host):
        del out[0]  # `*.b.c` itself
    if host != "*":
        out.append(Hostname("*"))
    return out


def is_wildcard(host: str) -> bool:
    """A rule host that stands for several names (`*` or `*.<domain>`)."""
    return host.startswith("*")


class HostTree:
    """Service hostnames by their parent domains, to find the names a wildcard rule host matches in
    O(matches) (plus the domains on the way), not O(names).

    `_hosts`: domain → the names right under it (`a.b.c` under `b.c`; a one-label name under "");
    `_subdomains`: domain → its child domains that hold names, down any depth ("" is the root).
    One set entry per name, and one per domain that holds names."""

    __slots__ = ("_hosts", "_subdomains")

    def __init__(self, names: Iterable[Hostname] = ()) -> None:
        self._hosts: dict[str, set[Hostname]] = {}
        self._subdomains: dict[str, set[str]] = {}
        for name in names:
            self.add(name)

    def __len__(self) -> int:
        return sum(len(names) for names in self._hosts.values())

    def add(self, name: Hostname) -> None:
        parent = name.partition(".")[2]
        names = self._hosts.get(parent)
        if names is None:
            names = self._hosts[parent] = set()
            self._link(parent)
        names.add(name)

    def discard(self, name: Hostname) -> None:
        parent = name.partition(".")[2]
        names = self._hosts.get(parent)
        if names is None or name not in names:
            return
        names.discard(name)
        if not names:
            del self._hosts[parent]
            self._unlink(parent)

    def matching(self, rule_host: Hostname) -> list[Hostname]:
        """The names a wildcard `rule_host` (`*.<domain>` or `*`) matches: every name under the domain, at
        any depth (wildcard names under it too, which are subsets of it)."""
        domain = "" if rule_host == "*" else rule_host.removeprefix("*.")
        out: list[Hostname] = []
        todo = [domain]
        while todo:
            d = todo.pop()
            out += self._hosts.get(d, ())
            todo += self._subdomains.get(d, ())
        return out

    def _link(self, domain: str) -> None:
        """Record `domain` under its parents, up to the first already known."""
        while domain:
            parent = domain.partition(".")[2]
            children = self._subdomains.get(parent)
            if children is None:
                self._subdomains[parent] = {domain}
            elif domain in children:
                return
            else:
                children.add(domain)
                return
            domain = parent

    def _unlink(self, domain: str) -> None:
        """Forget `domain` and the parents it leaves empty (no names, no child domains)."""
        while domain and domain not in self._hosts and domain not in self._subdomains:
            parent = domain.partition(".")[2]
            children = self._subdomains.get(parent)
            if children is None:
                return
            children.discard(domain)
            if children:
                return
            del self._subdomains[parent]
            domain = parent


def _local(rule: DestinationRule) -> bool:
    """Visible in its own namespace (Istio's namespace-local rules)."""
    e = rule.export_to
    return _public(e) or "." in e or rule.namespace in e


def _private(rule: DestinationRule) -> bool:
    """Exported only to its own namespace."""
    e = rule.export_to
    return len(e) == 1 and e[0] in (".", rule.namespace)


def _pick_rule(
    rules: tuple[DestinationRule, ...], namespace: str | None, service_namespace: str, root_namespace: str
) -> DestinationRule | None:
    if not rules:
        return None
    if namespace is not None:
        own = _private if namespace == root_namespace else _local
        for rule in rules:
            if rule.namespace == namespace and own(rule):
                return rule
    for owner in (service_namespace, root_namespace):
        for rule in rules:
            if (
                rule.namespace == owner
                and not _private(rule)
                and (_public(rule.export_to) or (namespace is not None and namespace in rule.export_to))
            ):
                return rule
    return None


def _pick_route(
    routes: tuple[VirtualService, ...], ranks: tuple[int, ...], namespace: str | None
) -> VirtualService | None:
    best: tuple[int, int, int] | None = None
    for i, route in enumerate(routes):
        e = route.export_to
        if _public(e):
            tier = 2
        elif "~" in e or namespace is None:
            continue
        elif route.namespace == namespace and ("." in e or namespace in e):
            tier = 0
        elif namespace in e:
            tier = 1
        else:
            continue
        here = (ranks[i] if ranks else 0, tier, i)
        if best is None or here < best:
            best = here
    return routes[best[2]] if best is not None else None
