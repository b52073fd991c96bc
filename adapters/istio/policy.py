"""Istio DestinationRule / VirtualService objects → `discoveryd.policy` values, validated like Istio.

Data flow:

  YAML file text ──read_yaml_all──> ServiceEntry/WorkloadEntry objects (objects.read_object)
                                  + DestinationRule/VirtualService (read_policy_object)
  policy objects by scope (a file) ──PolicySet.update/remove; build()──> HostPolicy per host,
      the hosts whose policy changed, problems by scope

Host names: a name without a dot is a short name, resolved in the object's
namespace as Istio does (`<name>.<namespace>.svc.<domain>`, the domain of
the registry that read the object: its `domain` key, `cluster.local` by
default); anything else is taken as written (lower case, no trailing dot).

Rules (Istio's `ValidateDestinationRule` / `ValidateVirtualService`, plus
unknown fields and wrong types as the API server would reject them):
subset names are DNS labels, unique in their rule; a consistentHash names
exactly one key; percentages are 0-100; durations are Istio's (`1s`,
`100ms`, `1m`, `1h`) and positive; every HTTP route has a destination;
with several destinations their weights sum to 100; a rewrite sets uri or
uriRegexRewrite (not both; the regex RE2, with its substitution) or
authority; header operations name no pseudo-header (`:authority` and `host`
only in request set/add, where they rewrite the authority, once per route)
and no `host` elsewhere, names are HTTP tokens, values hold no control
character and a `%` only as `%%` or around an Envoy command; localityLbSetting
as Istio's `ValidateLocalityLbSetting` (distribute and failover exclusive,
weights 1-100 summing to 100 per source, well-formed non-overlapping
localities, failover between two different regions). A problem names
its file:line and the dotted field path; an object with problems is not used.

`PolicySet.build()` merges the DestinationRules of one host declared in the
same namespace with the same exportTo, as Istio does (scope order, then
order in the scope): the
later ones' subsets are appended, a subset name already defined is ignored
with a warning naming both rules; the first rule's trafficPolicy applies (a
later one's only when the first has none; otherwise it is warned about).
It also reports, as warnings on the referring object's scope, what Istio's
analyzer warns about: a route naming a subset that no DestinationRule of
that host (in this set) defines, locality failover at a level without
outlierDetection (never applied), and a second VirtualService for a host
in a namespace where another one (earlier in scope order) already holds it
— the first one wins, the later one is ignored. Rules of different
namespaces (or exportTo) are all kept, in scope order, in the host's
`HostPolicy`; which one a client sees is chosen per client namespace when
resources are built (`HostPolicy.select`, Istio's lookup and exportTo).

Pure and synchronous, like the rest of `adapters.istio`: one caller at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.istio.locate import FieldPath, Locator
from adapters.istio.objects import API_VERSIONS, Object, _Checker, _describe, read_object
from adapters.istio.yamlread import FAST_LOADER, ChunkCache, Document, LoaderClass, read_documents
from adapters.toolkit.names import is_dns1123_label
from discoveryd.model import Hostname, Problem, Severity, hostname
from discoveryd.policy import (
    ClientTls,
    ConnectionPool,
    ConsistentHash,
    DestinationRule,
    Fault,
    HeaderOperations,
    Headers,
    HostPolicy,
    HttpMatch,
    HttpRoute,
    LoadBalancer,
    LocalityDistribute,
    LocalityLb,
    MatchKind,
    OutlierDetection,
    Retries,
    Rewrite,
    RouteDestination,
    SimpleLb,
    StringMatch,
    Subset,
    TcpKeepalive,
    TlsMode,
    TrafficPolicy,
    VirtualService,
    wildcard_keys,
)

DESTINATION_RULE = "DestinationRule"
VIRTUAL_SERVICE = "VirtualService"
DEFAULT_DOMAIN = "cluster.local"

PolicyObject = DestinationRule | VirtualService
AnyObject = Object | DestinationRule | VirtualService

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_INT32 = 2**31 - 1

_DR_FIELDS = ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector")
_TP_FIELDS = (
    "loadBalancer",
    "connectionPool",
    "outlierDetection",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
)
_LB_FIELDS = ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup")
_LOCALITY_FIELDS = ("enabled", "distribute", "failover", "failoverPriority")
_TOPOLOGY_LOCALITY = frozenset(
    {"topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone"}
)
"""failoverPriority labels that name a locality level: not allowed next to `failover` (Istio's rule)."""
_HASH_FIELDS = (
    "httpHeaderName",
    "httpCookie",
    "useSourceIp",
    "httpQueryParameterName",
    "ringHash",
    "maglev",
    "minimumRingSize",
)
_OD_FIELDS = (
    "consecutiveErrors",
    "consecutive5xxErrors",
    "consecutiveGatewayErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
    "splitExternalLocalOriginErrors",
    "consecutiveLocalOriginFailures",
)
_TLS_FIELDS = (
    "mode",
    "clientCertificate",
    "privateKey",
    "caCertificates",
    "credentialName",
    "subjectAltNames",
    "sni",
    "insecureSkipVerify",
    "caCrl",
)
_VS_FIELDS = ("hosts", "gateways", "http", "tls", "tcp", "exportTo")
_ROUTE_FIELDS = (
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "corsPolicy",
    "headers",
)
_MATCH_FIELDS = (
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
    "statPrefix",
)


def resolve_host(name: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> Hostname:
    """Istio's resolution of a rule's host: a short name (no dot) is `<name>.<namespace>.svc.<domain>`."""
    if "." not in name and name != "*":
        return hostname(f"{name}.{namespace}.svc.{domain}")
    return hostname(name)


def read_policy_object(
    data: Mapping[str, Any], locator: Locator, default_namespace: str, domain: str = DEFAULT_DOMAIN
) -> tuple[PolicyObject | None, list[Problem]]:
    """One DestinationRule / VirtualService document → its value, or its problems; other kinds: (None, []).

    Short host names resolve under `domain` (the registry's cluster domain)."""
    kind = data.get("kind")
    if kind not in (DESTINATION_RULE, VIRTUAL_SERVICE):
        return None, []
    check = _PolicyChecker(data, locator, domain)
    if data.get("apiVersion") not in API_VERSIONS:
        check.fail(("apiVersion",), f"unsupported apiVersion {data.get('apiVersion')!r} for {kind}")
        return None, check.problems
    check.mapping(data, (), ("apiVersion", "kind", "metadata", "spec", "status"))
    ref, _ = check.metadata(str(kind), default_namespace)
    spec = check.mapping(data.get("spec"), ("spec",)) or {}
    if ref is None:
        return None, check.problems
    where = ref.where
    obj: PolicyObject | None
    if kind == DESTINATION_RULE:
        obj = check.destination_rule(ref.namespace, ref.name, spec, where)
    else:
        obj = check.virtual_service(ref.namespace, ref.name, spec, where)
    if check.problems:
        return None, check.problems
    return obj, []


def read_yaml_all(
    file: str,
    text: str,
    default_namespace: str,
    *,
    cache: ChunkCache | None = None,
    loader: LoaderClass = FAST_LOADER,
    domain: str = DEFAULT_DOMAIN,
) -> tuple[list[AnyObject], list[Problem]]:
    """`objects.read_yaml_objects`, with DestinationRules and VirtualServices too (short hosts under
    `domain`). Blocking."""

    def validate(documents: list[Document]) -> tuple[list[AnyObject], list[Problem]]:
        out: list[AnyObject] = []
        problems: list[Problem] = []
        for doc in documents:
            obj, found = read_object(doc.data, doc.locator, default_namespace)
            if obj is None and not found:
                policy, found = read_policy_object(doc.data, doc.locator, default_namespace, domain)
                if policy is not None:
                    out.append(policy)
            elif obj is not None:
                out.append(obj)
            problems.extend(found)
        return out, problems

    results, problems = read_documents(file, text, loader=loader, cache=cache, derive=validate)
    if problems:
        return [], problems
    return [obj for _, objects in results for obj in objects], []


_NOT_SERVED = frozenset(
    {
        ("spec", "workloadSelector"),
        ("trafficPolicy", "tunnel"),
        ("trafficPolicy", "proxyProtocol"),
        ("portLevelSettings", "tunnel"),
        ("portLevelSettings", "proxyProtocol"),
        ("loadBalancer", "warmup"),
        ("outlierDetection", "splitExternalLocalOriginErrors"),
        ("outlierDetection", "consecutiveLocalOriginFailures"),
        ("tcp", "maxConnectionDuration"),
        ("tcp", "idleTimeout"),
        ("http", "h2UpgradePolicy"),
        ("http", "useClientProtocol"),
        ("http", "maxConcurrentStreams"),
        ("tls", "insecureSkipVerify"),
        ("tls", "caCrl"),
        ("httpCookie", "attributes"),
        ("retries", "retryRemoteLocalities"),
        ("retries", "retryIgnorePreviousHosts"),
        ("delay", "percent"),
    }
)
"""(parent field, field): valid in Istio's API but not served yet; reported, never silently dropped."""


class _PolicyChecker(_Checker):
    def __init__(self, data: Mapping[str, Any], locator: Locator, domain: str = DEFAULT_DOMAIN) -> None:
        super().__init__(data, locator)
        self.domain = domain

    def mapping(self, value: Any, path: FieldPath, fields: Sequence[str] | None = None) -> dict[str, Any] | None:
        found = super().mapping(value, path, fields)
        if found is not None and fields is not None:
            parent = next((p for p in reversed(path) if isinstance(p, str)), "")
            for key in found:
                if (parent, key) in _NOT_SERVED and found[key] is not None:
                    self.fail((*path, key), "valid in Istio, not served by discoveryd yet")
        return found

    def duration(self, value: Any, path: FieldPath) -> float | None:
        if value is None:
            return None
        m = _DURATION.match(value) if isinstance(value, str) else None
        if m is None:
            self.fail(path, f"must be a duration such as 1s or 100ms, not {_describe(value)}")
            return None
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds < 0.001:
            self.fail(path, "must be at least 1ms")
            return None
        return seconds

    def percent(self, value: Any, path: FieldPath) -> float | None:
        if isinstance(value, dict):  # Istio's Percent message: {value: 12.5}
            self.mapping(value, path, ("value",))
            value = value.get("value")
            path = (*path, "value")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number, not {_describe(value)}")
            return None
        if not 0 <= value <= 100:
            self.fail(path, f"must be between 0 and 100, not {value}")
            return None
        return float(value)

    def boolean(self, value: Any, path: FieldPath) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {_describe(value)}")
            return False
        return value

    def rule_export_to(self, value: Any, path: FieldPath, namespace: str) -> tuple[str, ...]:
        """A DestinationRule's or VirtualService's exportTo, as Istio validates it: `.`, `*` or namespace
        names, no duplicate (`.` is the own namespace), `*` alone; `~` is for ServiceEntries only."""
        entries = self.export_to(value, path)
        for i, entry in enumerate(entries):
            if entry == "~":
                self.fail((*path, i), "'~' (no namespace) is allowed for ServiceEntries only")
        if "." in entries and namespace in entries:
            self.fail(path, f"duplicate entries: '.' and the object's own namespace {namespace!r}")
        return tuple(entries)

    def host(self, value: Any, path: FieldPath, namespace: str) -> Hostname | None:
        name = self.string(value, path)
        if not name:
            if value is None:
                self.fail(path, "a host is required")
            return None
        if "*" in name and name != "*" and not (name.startswith("*.") and len(name) > 2 and "*" not in name[2:]):
            self.fail(path, f"invalid host {name!r}: a wildcard must be the whole first label ('*.example.com' or '*')")
            return None
        return resolve_host(name, namespace, self.domain)

    # -- DestinationRule ---------------------------------------------------------------------

    def destination_rule(self, namespace: str, name: str, spec: dict[str, Any], where: str) -> DestinationRule | None:
        sp: FieldPath = ("spec",)
        self.mapping(spec, sp, _DR_FIELDS)
        host = self.host(spec.get("host"), (*sp, "host"), namespace)
        export_to = self.rule_export_to(spec.get("exportTo"), (*sp, "exportTo"), namespace)
        policy = self.traffic_policy(spec.get("trafficPolicy"), (*sp, "trafficPolicy"), ports=True)
        subsets: list[Subset] = []
        seen: set[str] = set()
        for i, raw in enumerate(self.items(spec.get("subsets"), (*sp, "subsets"), self.mapping)):
            path: FieldPath = (*sp, "subsets", i)
            self.mapping(raw, path, ("name", "labels", "trafficPolicy"))
            sname = self.string(raw.get("name"), (*path, "name"))
            if not sname:
                self.fail((*path, "name"), "a subset needs a name")
                continue
            if not is_dns1123_label(sname):
                self.fail((*path, "name"), f"invalid subset name {sname!r}: lower-case letters, digits and '-'")
            if sname in seen:
                self.fail((*path, "name"), f"duplicate subset {sname!r}")
            seen.add(sname)
            labels = self.labels(raw.get("labels"), (*path, "labels"))
            sub_policy = self.traffic_policy(raw.get("trafficPolicy"), (*path, "trafficPolicy"), ports=True)
            subsets.append(Subset(sname, labels, sub_policy))
        if host is None or self.problems:
            return None
        return DestinationRule(host, namespace, name, policy, tuple(subsets), where, export_to)

    def traffic_policy(self, value: Any, path: FieldPath, *, ports: bool) -> TrafficPolicy | None:
        raw = self.mapping(
            value, path, _TP_FIELDS if ports else tuple(f for f in _TP_FIELDS if f != "portLevelSettings")
        )
        if raw is None:
            return None
        port_level: list[tuple[int, TrafficPolicy]] = []
        if ports:
            numbers: set[int] = set()
            for i, item in enumerate(
                self.items(raw.get("portLevelSettings"), (*path, "portLevelSettings"), self.mapping)
            ):
                ipath: FieldPath = (*path, "portLevelSettings", i)
                port = self.mapping(item.get("port"), (*ipath, "port"), ("number",))
                number = self.port_number(port.get("number") if port else None, (*ipath, "port", "number"))
                if number is None:
                    if port is None or port.get("number") is None:
                        self.fail((*ipath, "port"), "port.number is required")
                    continue
                if number in numbers:
                    self.fail((*ipath, "port", "number"), f"duplicate port {number}")
                numbers.add(number)
                settings = {k: v for k, v in item.items() if k != "port"}
                got = self.traffic_policy(settings, ipath, ports=False)
                if got is not None:
                    port_level.append((number, got))
        return TrafficPolicy(
            self.load_balancer(raw.get("loadBalancer"), (*path, "loadBalancer")),
            self.connection_pool(raw.get("connectionPool"), (*path, "connectionPool")),
            self.outlier_detection(raw.get("outlierDetection"), (*path, "outlierDetection")),
            self.tls(raw.get("tls"), (*path, "tls")),
            tuple(port_level),
        )

    def load_balancer(self, value: Any, path: FieldPath) -> LoadBalancer | None:
        raw = self.mapping(value, path, _LB_FIELDS)
        if raw is None:
            return None
        simple = (
            self.enum(raw.get("simple"), (*path, "simple"), SimpleLb, SimpleLb.UNSPECIFIED) if "simple" in raw else None
        )
        hashed = self.consistent_hash(raw.get("consistentHash"), (*path, "consistentHash"))
        if simple is not None and hashed is not None:
            self.fail(path, "only one of simple or consistentHash can be set")
        locality = self.locality_lb(raw.get("localityLbSetting"), (*path, "localityLbSetting"))
        warmup = self.duration(raw.get("warmupDurationSecs"), (*path, "warmupDurationSecs"))
        return LoadBalancer(simple, hashed, warmup, locality)

    def locality_lb(self, value: Any, path: FieldPath) -> LocalityLb | None:
        """Istio's localityLbSetting, with the rules of its `ValidateLocalityLbSetting`."""
        raw = self.mapping(value, path, _LOCALITY_FIELDS)
        if raw is None:
            return None
        enabled = self.boolean(raw.get("enabled"), (*path, "enabled")) if raw.get("enabled") is not None else None
        distribute: list[LocalityDistribute] = []
        origins: list[tuple[str, FieldPath]] = []
        for i, item in enumerate(self.items(raw.get("distribute"), (*path, "distribute"), self.mapping)):
            ipath: FieldPath = (*path, "distribute", i)
            self.mapping(item, ipath, ("from", "to"))
            origin = self.string(item.get("from"), (*ipath, "from"))
            if not origin:
                self.fail((*ipath, "from"), "a source locality is required")
                continue
            origins.append((origin, (*ipath, "from")))
            to = self.mapping(item.get("to"), (*ipath, "to")) or {}
            weights: list[tuple[str, int]] = []
            targets: list[tuple[str, FieldPath]] = []
            for dest, weight in to.items():
                wpath: FieldPath = (*ipath, "to", str(dest))
                got = self.integer(weight, wpath, 1, 100)
                if got is None:
                    if weight is None:
                        self.fail(wpath, "a locality weight must be between 1 and 100")
                    continue
                weights.append((str(dest), got))
                targets.append((str(dest), wpath))
            if not to:
                self.fail((*ipath, "to"), "at least one destination locality is required")
            elif len(weights) == len(to) and sum(w for _, w in weights) != 100:
                self.fail((*ipath, "to"), f"the locality weights must sum to 100, not {sum(w for _, w in weights)}")
            self.localities(targets)
            distribute.append(LocalityDistribute(origin, tuple(weights)))
        self.localities(origins)
        failover: list[tuple[str, str]] = []
        for i, item in enumerate(self.items(raw.get("failover"), (*path, "failover"), self.mapping)):
            ipath = (*path, "failover", i)
            self.mapping(item, ipath, ("from", "to"))
            ends = [self.string(item.get(k), (*ipath, k)) or "" for k in ("from", "to")]
            for k, region in zip(("from", "to"), ends, strict=True):
                if not region:
                    self.fail((*ipath, k), "a region is required")
                elif "/" in region:
                    self.fail((*ipath, k), f"failover names a region only, not {region!r}")
                elif "*" in region:
                    self.fail((*ipath, k), f"a failover region cannot contain the '*' wildcard: {region!r}")
            if ends[0] and ends[0] == ends[1]:
                self.fail(ipath, f"failover from and to must be different regions, both are {ends[0]!r}")
            failover.append((ends[0], ends[1]))
        priority = tuple(self.items(raw.get("failoverPriority"), (*path, "failoverPriority"), self.string))
        for i, key in enumerate(priority):
            if not key or key.startswith("="):
                self.fail((*path, "failoverPriority", i), "a label key is required")
        if distribute and failover:
            self.fail(path, "distribute and failover cannot be set together")
        if failover:
            for i, key in enumerate(priority):
                if key.partition("=")[0] in _TOPOLOGY_LOCALITY:
                    self.fail(
                        (*path, "failoverPriority", i),
                        f"{key!r} cannot be used together with failover (failover already orders by locality)",
                    )
        return LocalityLb(enabled, tuple(distribute), tuple(failover), priority)

    def localities(self, found: Sequence[tuple[str, FieldPath]]) -> None:
        """Istio's rules for the localities of one list: `region[/zone[/subzone]]`, no empty part, at most
        one `*` and only at the end, and none overlapping an earlier one (`us` covers `us/zone1`)."""
        seen: dict[str, dict[str, set[str]]] = {}
        for text, path in found:
            if text.count("*") > 1 or ("*" in text and not text.endswith("*")):
                self.fail(path, f"locality {text!r}: at most one '*' wildcard, and only at the end")
                continue
            parts = text.split("/", 2)
            if any(not p for p in parts):
                self.fail(path, f"locality {text!r} has an empty region, zone or subzone")
                continue
            region, zone, subzone = (*parts, "", "")[:3]
            zones = seen.get(region)
            overlap = "*" in seen
            if len(parts) == 1:
                overlap = overlap or zones is not None
                seen[region] = {"*": {"*"}}
            elif zones is None:
                seen[region] = {zone: {"*" if len(parts) == 2 else subzone}}
            elif len(parts) == 2:
                overlap = overlap or "*" in zones or zone in zones
                zones[zone] = {"*"}
            else:
                subzones = zones.get(zone)
                overlap = overlap or "*" in zones or (subzones is not None and ("*" in subzones or subzone in subzones))
                zones.setdefault(zone, set()).add(subzone)
            if overlap:
                self.fail(path, f"locality {text!r} overlaps one given before it")

    def consistent_hash(self, value: Any, path: FieldPath) -> ConsistentHash | None:
        raw = self.mapping(value, path, _HASH_FIELDS)
        if raw is None:
            return None
        keys = [k for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName") if raw.get(k)]
        if len(keys) != 1:
            self.fail(
                path, "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName must be set"
            )
        cookie = self.mapping(raw.get("httpCookie"), (*path, "httpCookie"), ("name", "path", "ttl", "attributes")) or {}
        cookie_name = self.string(cookie.get("name"), (*path, "httpCookie", "name")) or ""
        if raw.get("httpCookie") is not None and not cookie_name:
            self.fail((*path, "httpCookie", "name"), "a cookie name is required")
        maglev = self.mapping(raw.get("maglev"), (*path, "maglev"), ("tableSize",))
        ring = self.mapping(raw.get("ringHash"), (*path, "ringHash"), ("minimumRingSize",))
        if maglev is not None and ring is not None:
            self.fail(path, "only one of ringHash or maglev can be set")
        size = None
        if maglev is not None:
            size = self.integer(maglev.get("tableSize"), (*path, "maglev", "tableSize"), 1, 5000011)
            if size is not None and not _is_prime(size):
                self.fail((*path, "maglev", "tableSize"), f"must be a prime number (Envoy's rule), not {size}")
        elif ring is not None:
            size = self.integer(ring.get("minimumRingSize"), (*path, "ringHash", "minimumRingSize"), 1, 2**23)
        else:
            size = self.integer(raw.get("minimumRingSize"), (*path, "minimumRingSize"), 1, 2**23)
        return ConsistentHash(
            header=self.string(raw.get("httpHeaderName"), (*path, "httpHeaderName")) or "",
            cookie=cookie_name,
            cookie_path=self.string(cookie.get("path"), (*path, "httpCookie", "path")) or "",
            cookie_ttl=self.duration(cookie.get("ttl"), (*path, "httpCookie", "ttl")),
            source_ip=self.boolean(raw.get("useSourceIp"), (*path, "useSourceIp")),
            query_parameter=self.string(raw.get("httpQueryParameterName"), (*path, "httpQueryParameterName")) or "",
            maglev=maglev is not None,
            table_size=size,
        )

    def outlier_detection(self, value: Any, path: FieldPath) -> OutlierDetection | None:
        raw = self.mapping(value, path, _OD_FIELDS)
        if raw is None:
            return None
        if raw.get("consecutiveErrors") is not None:
            self.fail((*path, "consecutiveErrors"), "removed from Istio's API; use consecutive5xxErrors")

        def count(key: str) -> int | None:
            v = raw.get(key)
            if isinstance(v, dict):  # UInt32Value written as {value: n}
                v = v.get("value")
            return self.integer(v, (*path, key), 0, _MAX_INT32)

        def pct(key: str) -> int | None:
            return self.integer(raw.get(key), (*path, key), 0, 100)

        interval = self.duration(raw.get("interval"), (*path, "interval"))
        base = self.duration(raw.get("baseEjectionTime"), (*path, "baseEjectionTime"))
        return OutlierDetection(
            count("consecutive5xxErrors"),
            count("consecutiveGatewayErrors"),
            interval,
            base,
            pct("maxEjectionPercent"),
            pct("minHealthPercent"),
        )

    def connection_pool(self, value: Any, path: FieldPath) -> ConnectionPool | None:
        raw = self.mapping(value, path, ("tcp", "http"))
        if raw is None:
            return None
        tcp = (
            self.mapping(
                raw.get("tcp"),
                (*path, "tcp"),
                ("maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout"),
            )
            or {}
        )
        http = (
            self.mapping(
                raw.get("http"),
                (*path, "http"),
                (
                    "http1MaxPendingRequests",
                    "http2MaxRequests",
                    "maxRequestsPerConnection",
                    "maxRetries",
                    "idleTimeout",
                    "h2UpgradePolicy",
                    "useClientProtocol",
                    "maxConcurrentStreams",
                ),
            )
            or {}
        )
        tp: FieldPath = (*path, "tcp")
        hp: FieldPath = (*path, "http")
        keep = self.mapping(tcp.get("tcpKeepalive"), (*tp, "tcpKeepalive"), ("probes", "time", "interval"))
        keepalive = None
        if keep is not None:
            keepalive = TcpKeepalive(
                self.integer(keep.get("probes"), (*tp, "tcpKeepalive", "probes"), 0, _MAX_INT32),
                self.duration(keep.get("time"), (*tp, "tcpKeepalive", "time")),
                self.duration(keep.get("interval"), (*tp, "tcpKeepalive", "interval")),
            )
        return ConnectionPool(
            max_connections=self.integer(tcp.get("maxConnections"), (*tp, "maxConnections"), 0, _MAX_INT32),
            connect_timeout=self.duration(tcp.get("connectTimeout"), (*tp, "connectTimeout")),
            tcp_keepalive=keepalive,
            http1_max_pending_requests=self.integer(
                http.get("http1MaxPendingRequests"), (*hp, "http1MaxPendingRequests"), 0, _MAX_INT32
            ),
            http2_max_requests=self.integer(http.get("http2MaxRequests"), (*hp, "http2MaxRequests"), 0, _MAX_INT32),
            max_requests_per_connection=self.integer(
                http.get("maxRequestsPerConnection"), (*hp, "maxRequestsPerConnection"), 0, _MAX_INT32
            ),
            max_retries=self.integer(http.get("maxRetries"), (*hp, "maxRetries"), 0, _MAX_INT32),
            idle_timeout=self.duration(http.get("idleTimeout"), (*hp, "idleTimeout")),
        )

    def tls(self, value: Any, path: FieldPath) -> ClientTls | None:
        raw = self.mapping(value, path, _TLS_FIELDS)
        if raw is None:
            return None
        mode = self.enum(raw.get("mode"), (*path, "mode"), TlsMode, TlsMode.DISABLE)
        cert = self.string(raw.get("clientCertificate"), (*path, "clientCertificate")) or ""
        key = self.string(raw.get("privateKey"), (*path, "privateKey")) or ""
        if mode is TlsMode.MUTUAL and raw.get("credentialName") is None and (not cert or not key):
            self.fail(path, "MUTUAL needs clientCertificate and privateKey (or credentialName)")
        if raw.get("credentialName") is not None:
            self.fail(
                (*path, "credentialName"), "credentialName (a Kubernetes Secret) is not supported; use file paths"
            )
        if mode is TlsMode.ISTIO_MUTUAL:
            self.fail((*path, "mode"), "ISTIO_MUTUAL needs Istio's certificates; use SIMPLE or MUTUAL with file paths")
        return ClientTls(
            mode,
            cert,
            key,
            self.string(raw.get("caCertificates"), (*path, "caCertificates")) or "",
            self.string(raw.get("sni"), (*path, "sni")) or "",
            tuple(self.items(raw.get("subjectAltNames"), (*path, "subjectAltNames"), self.string)),
        )

    # -- VirtualService ----------------------------------------------------------------------

    def virtual_service(self, namespace: str, name: str, spec: dict[str, Any], where: str) -> VirtualService | None:
        sp: FieldPath = ("spec",)
        self.mapping(spec, sp, _VS_FIELDS)
        export_to = self.rule_export_to(spec.get("exportTo"), (*sp, "exportTo"), namespace)
        if spec.get("gateways") not in (None, [], ["mesh"]):
            self.fail((*sp, "gateways"), "only the mesh (no gateways) is served")
        raw_hosts = spec.get("hosts")
        if not raw_hosts:
            self.fail((*sp, "hosts"), "at least one host is required")
        hosts: list[Hostname] = []
        for i, h in enumerate(self.items(raw_hosts, (*sp, "hosts"), self.string)):
            got = self.host(h, (*sp, "hosts", i), namespace)
            if got is not None:
                hosts.append(got)
        for key in ("tls", "tcp"):
            if spec.get(key):
                self.fail((*sp, key), f"{key} routes are not served yet (only http)")
        routes = [
            r
            for i, raw in enumerate(self.items(spec.get("http"), (*sp, "http"), self.mapping))
            if (r := self.http_route(raw, (*sp, "http", i), namespace)) is not None
        ]
        if self.problems:
            return None
        return VirtualService(tuple(hosts), namespace, name, tuple(routes), where, export_to)

    def http_route(self, raw: dict[str, Any], path: FieldPath, namespace: str) -> HttpRoute | None:
        self.mapping(raw, path, _ROUTE_FIELDS)
        for key in ("redirect", "directResponse", "delegate", "mirror", "mirrors", "corsPolicy"):
            if raw.get(key) is not None:
                self.fail((*path, key), "not supported yet")
        matches = [
            m
            for i, item in enumerate(self.items(raw.get("match"), (*path, "match"), self.mapping))
            if (m := self.http_match(item, (*path, "match", i))) is not None
        ]
        destinations: list[RouteDestination] = []
        for i, item in enumerate(self.items(raw.get("route"), (*path, "route"), self.mapping)):
            ipath: FieldPath = (*path, "route", i)
            self.mapping(item, ipath, ("destination", "weight", "headers"))
            dest = self.mapping(item.get("destination"), (*ipath, "destination"), ("host", "subset", "port")) or {}
            dpath: FieldPath = (*ipath, "destination")
            host = self.host(dest.get("host"), (*dpath, "host"), namespace)
            subset = self.string(dest.get("subset"), (*dpath, "subset")) or ""
            port = self.mapping(dest.get("port"), (*dpath, "port"), ("number",))
            number = self.port_number(port.get("number"), (*dpath, "port", "number")) if port else None
            weight = self.integer(item.get("weight"), (*ipath, "weight"), 0, _MAX_INT32)
            headers = self.headers(item.get("headers"), (*ipath, "headers"))
            if host is not None:
                destinations.append(RouteDestination(host, subset, number, weight or 0, headers))
        if raw.get("route") is None:
            self.fail(path, "an http route needs a route (redirect, directResponse and delegate are not supported)")
        elif len(destinations) > 1 and sum(d.weight for d in destinations) != 100:
            total = sum(d.weight for d in destinations)
            self.fail((*path, "route"), f"the weights of the destinations must sum to 100, not {total}")
        retries = None
        rr = self.mapping(
            raw.get("retries"),
            (*path, "retries"),
            ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts"),
        )
        if rr is not None:
            attempts = self.integer(rr.get("attempts"), (*path, "retries", "attempts"), 0, _MAX_INT32)
            retry_on = self.string(rr.get("retryOn"), (*path, "retries", "retryOn")) or ""
            retries = Retries(
                attempts or 0, self.duration(rr.get("perTryTimeout"), (*path, "retries", "perTryTimeout")), retry_on
            )
        rewrite = self.rewrite(raw.get("rewrite"), (*path, "rewrite"))
        headers = self.headers(raw.get("headers"), (*path, "headers"))
        if rewrite is not None and rewrite.authority and headers is not None and headers.authority:
            self.fail(
                (*path, "headers", "request"),
                f"the authority is already rewritten to {rewrite.authority!r} (rewrite.authority); "
                "it cannot be set twice",
            )
        return HttpRoute(
            name=self.string(raw.get("name"), (*path, "name")) or "",
            matches=tuple(matches),
            destinations=tuple(destinations),
            timeout=self.duration(raw.get("timeout"), (*path, "timeout")),
            retries=retries,
            fault=self.fault(raw.get("fault"), (*path, "fault")),
            rewrite=rewrite,
            headers=headers,
        )

    def rewrite(self, value: Any, path: FieldPath) -> Rewrite | None:
        """Istio's HTTPRewrite: uri or uriRegexRewrite (not both), authority; at least one of them."""
        raw = self.mapping(value, path, ("uri", "uriRegexRewrite", "authority"))
        if raw is None:
            return None
        uri = self.string(raw.get("uri"), (*path, "uri")) or ""
        authority = self.string(raw.get("authority"), (*path, "authority")) or ""
        self.header_value(uri, (*path, "uri"))
        self.header_value(authority, (*path, "authority"))
        regex: tuple[str, str] | None = None
        rpath: FieldPath = (*path, "uriRegexRewrite")
        rr = self.mapping(raw.get("uriRegexRewrite"), rpath, ("match", "rewrite"))
        if rr is not None:
            match = self.string(rr.get("match"), (*rpath, "match")) or ""
            substitution = self.string(rr.get("rewrite"), (*rpath, "rewrite")) or ""
            if not match or not substitution:
                self.fail(rpath, "uriRegexRewrite needs both match and rewrite")
            elif self.regex(match, (*rpath, "match")):
                regex = (match, substitution)
            if uri:
                self.fail(path, "only one of uri or uriRegexRewrite can be set")
        if not uri and rr is None and not authority:
            self.fail(path, "a rewrite needs uri, uriRegexRewrite or authority")
        return Rewrite(uri, regex, authority)

    def headers(self, value: Any, path: FieldPath) -> Headers | None:
        """Istio's Headers (request/response set, add, remove), with its header name rules.

        `:authority` or `host` in request set/add is the authority (a host rewrite, as Istio translates
        it); any other pseudo-header is a problem, and so is `host` anywhere else."""
        raw = self.mapping(value, path, ("request", "response"))
        if raw is None:
            return None
        request, set_authority, add_authority = self.header_operations(
            raw.get("request"), (*path, "request"), request=True
        )
        response, _, _ = self.header_operations(raw.get("response"), (*path, "response"), request=False)
        if set_authority and add_authority:
            self.fail((*path, "request"), "the authority header cannot be set multiple times (set and add)")
        return Headers(request, response, set_authority or add_authority)

    def header_operations(self, value: Any, path: FieldPath, *, request: bool) -> tuple[HeaderOperations, str, str]:
        """One direction's set/add/remove, and the authority found in set and in add (request only)."""
        raw = self.mapping(value, path, ("set", "add", "remove"))
        if raw is None:
            return HeaderOperations(), "", ""
        authority = {"set": "", "add": ""}
        found: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
        for op in ("set", "add"):
            for name, text in (self.mapping(raw.get(op), (*path, op)) or {}).items():
                npath: FieldPath = (*path, op, str(name))
                if not isinstance(name, str) or not self.header_name(name, npath, authority_ok=request):
                    continue
                got = self.string(text, npath)
                if got is None or not self.header_value(got, npath):
                    continue
                if _is_authority(name):
                    if authority[op]:
                        self.fail(npath, "the authority header cannot be set multiple times")
                    authority[op] = got
                else:
                    found[op].append((name, got))
        removed = [
            name
            for i, name in enumerate(self.items(raw.get("remove"), (*path, "remove"), self.string))
            if self.header_name(name, (*path, "remove", i), authority_ok=False)
        ]
        ops = HeaderOperations(tuple(found["set"]), tuple(found["add"]), tuple(removed))
        return ops, authority["set"], authority["add"]

    def header_name(self, name: str, path: FieldPath, *, authority_ok: bool) -> bool:
        if not name:
            self.fail(path, "a header name cannot be empty")
            return False
        if authority_ok and _is_authority(name):
            return True
        if name.lower() == "host":
            self.fail(path, "the Host header cannot be changed here (use rewrite.authority)")
            return False
        if name.startswith(":"):
            self.fail(path, f"invalid header {name!r}: pseudo-headers (':' prefix) cannot be changed")
            return False
        if not _TOKEN.fullmatch(name):
            self.fail(path, f"invalid header name {name!r}: letters, digits and !#$%&'*+-.^_`|~ only")
            return False
        return True

    def header_value(self, value: str, path: FieldPath) -> bool:
        """Istio's header value rule: no control characters but tab; '%' only as '%%' or around a %COMMAND%."""
        if _CONTROL.search(value):
            self.fail(path, "control characters are not allowed in a header value")
            return False
        if "%" in _ENVOY_COMMAND.sub("", value.replace("%%", "")):
            self.fail(path, "a '%' in a header value must be written '%%' (or name a command, %HOSTNAME%)")
            return False
        return True

    def regex(self, text: str, path: FieldPath) -> bool:
        """Whether `text` is a regular expression Envoy and gRPC accept (RE2); a problem if not."""
        try:
            re.compile(text)
        except re.error as e:
            self.fail(path, f"invalid regular expression: {e}")
            return False
        unsupported = _not_re2(text)
        if unsupported is not None:
            self.fail(path, f"not RE2 ({unsupported}): Envoy and gRPC reject it")
            return False
        return True

    def string_match(self, value: Any, path: FieldPath) -> StringMatch | None:
        raw = self.mapping(value, path, ("exact", "prefix", "regex"))
        if raw is None:
            return None
        if len(raw) != 1:
            self.fail(path, "exactly one of exact, prefix or regex must be set")
            return None
        kind, text = next(iter(raw.items()))
        s = self.string(text, (*path, kind))
        if s is None:
            return None
        if kind == "regex" and not self.regex(s, (*path, kind)):
            return None
        return StringMatch(MatchKind(kind), s)

    def http_match(self, raw: dict[str, Any], path: FieldPath) -> HttpMatch | None:
        self.mapping(raw, path, _MATCH_FIELDS)
        for key in _MATCH_FIELDS:
            if key not in ("name", "uri", "method", "headers") and raw.get(key) is not None:
                self.fail((*path, key), "not supported yet")
        headers: list[tuple[str, StringMatch]] = []
        hraw = self.mapping(raw.get("headers"), (*path, "headers")) or {}
        for name, value in hraw.items():
            if not isinstance(name, str) or name != name.lower():
                self.fail((*path, "headers", str(name)), "header names must be lower case")
                continue
            m = self.string_match(value, (*path, "headers", name))
            if m is not None:
                headers.append((name, m))
        return HttpMatch(
            self.string_match(raw.get("uri"), (*path, "uri")),
            self.string_match(raw.get("method"), (*path, "method")),
            tuple(headers),
        )

    def fault(self, value: Any, path: FieldPath) -> Fault | None:
        raw = self.mapping(value, path, ("delay", "abort"))
        if raw is None:
            return None
        delay = self.mapping(raw.get("delay"), (*path, "delay"), ("fixedDelay", "percentage", "percent"))
        abort = self.mapping(raw.get("abort"), (*path, "abort"), ("httpStatus", "grpcStatus", "percentage"))
        fixed = None
        delay_pct = 100.0
        if delay is not None:
            fixed = self.duration(delay.get("fixedDelay"), (*path, "delay", "fixedDelay"))
            if fixed is None:
                self.fail((*path, "delay", "fixedDelay"), "a fixedDelay is required")
            got = self.percent(delay.get("percentage"), (*path, "delay", "percentage"))
            delay_pct = 100.0 if got is None else got
        status = grpc_status = None
        abort_pct = 100.0
        if abort is not None:
            status = self.integer(abort.get("httpStatus"), (*path, "abort", "httpStatus"), 200, 599)
            grpc_status = _GRPC_CODES.get(str(abort.get("grpcStatus"))) if abort.get("grpcStatus") is not None else None
            if abort.get("grpcStatus") is not None and grpc_status is None:
                self.fail((*path, "abort", "grpcStatus"), f"unknown gRPC status {abort.get('grpcStatus')!r}")
            if (status is None) == (grpc_status is None):
                self.fail((*path, "abort"), "exactly one of httpStatus or grpcStatus must be set")
            got = self.percent(abort.get("percentage"), (*path, "abort", "percentage"))
            abort_pct = 100.0 if got is None else got
        return Fault(fixed, delay_pct, status, grpc_status, abort_pct)


_ESCAPE = re.compile(r"\\.", re.S)
_CLASS = re.compile(r"\[\^?\]?[^\]]*\]")
_NOT_RE2_SYNTAX = re.compile(r"\(\?(?:<?[=!]|>|\(|P=)|[*+?}]\+")
"""Lookaround, named backreferences, atomic groups, conditionals, possessive quantifiers (outside escapes
and classes)."""


def _not_re2(text: str) -> str | None:
    """What of `text` Python's `re` accepts and RE2 (Envoy, gRPC, Istio's validation) rejects, or None."""
    escapes = _ESCAPE.findall(text)  # left to right: `\\1` is an escaped backslash, then 1
    if any(e[1] in "123456789" for e in escapes):
        return "a backreference"
    if "\\Z" in escapes:
        return "\\Z: RE2 writes it \\z"
    if _NOT_RE2_SYNTAX.search(_CLASS.sub("", _ESCAPE.sub("", text))):
        return "lookaround, a named backreference, an atomic group, a conditional or a possessive quantifier"
    return None


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP header name (RFC 9110 token)."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENVOY_COMMAND = re.compile(r"%[A-Z][A-Z0-9_]*(\([^)%]*\))?(:[0-9]+)?%")
"""An Envoy header formatter command (`%HOSTNAME%`, `%REQ(x-id)%`, `%START_TIME:3%`)."""


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


_GRPC_CODES = {
    name: code
    for code, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


def _merge_rules(
    first: DestinationRule, later: DestinationRule, origins: dict[str, DestinationRule], problems: list[Problem]
) -> DestinationRule:
    """Istio's merge of two DestinationRules for one host in one namespace (neither with a workloadSelector).

    The later rule's subsets are appended, but for a name already defined (ignored, warned naming both
    rules); the first rule's trafficPolicy stays, the later one's applying only when the first has none.
    `origins` (subset name → the rule declaring it) is updated."""
    subsets = list(first.subsets)
    for i, subset in enumerate(later.subsets):
        earlier = origins.get(subset.name)
        if earlier is not None:
            problems.append(
                Problem(
                    later.where,
                    f"subset {subset.name!r} of {first.host} is already defined by DestinationRule "
                    f"{earlier.namespace}/{earlier.name} at {earlier.where}; this one is ignored",
                    f"spec.subsets[{i}].name",
                    Severity.WARNING,
                )
            )
            continue
        origins[subset.name] = later
        subsets.append(subset)
    policy = first.traffic_policy
    if policy is None:
        policy = later.traffic_policy
    elif later.traffic_policy is not None:
        problems.append(
            Problem(
                later.where,
                f"{first.host}: the trafficPolicy of DestinationRule {first.namespace}/{first.name} at "
                f"{first.where} applies; this one's is ignored (its subsets are merged)",
                "spec.trafficPolicy",
                Severity.WARNING,
            )
        )
    return dataclasses.replace(first, traffic_policy=policy, subsets=tuple(subsets))


@dataclass(frozen=True, slots=True)
class _Claim:
    scope: str
    obj: PolicyObject


class PolicySet:
    """The DestinationRules and VirtualServices of several scopes (files), merged per host.

    `build()` recomputes the per-host policies from every scope (policy objects
    are few next to services; O(policy objects)) and returns the hosts whose
    `HostPolicy` changed. Scopes are taken in order of their `order` key, then
    name: files give none (path order); Kubernetes objects their
    creationTimestamp, so that the oldest rule comes first, as in Istio.
    """

    def __init__(self) -> None:
        self._scopes: dict[str, tuple[PolicyObject, ...]] = {}
        self._order: dict[str, str] = {}
        self._policies: dict[Hostname, HostPolicy] = {}
        self._problems: dict[str, list[Problem]] = {}

    @property
    def policies(self) -> Mapping[Hostname, HostPolicy]:
        return self._policies

    def update(self, scope: str, objects: Sequence[object], order: str = "") -> None:
        """Make `scope` declare exactly the policy objects among `objects` (others are ignored); `order`
        ranks the scope before its name (an RFC 3339 creation time sorts as it should)."""
        found = tuple(o for o in objects if isinstance(o, DestinationRule | VirtualService))
        if found:
            self._scopes[scope] = found
            self._order[scope] = order
        else:
            self.remove(scope)

    def remove(self, scope: str) -> None:
        self._scopes.pop(scope, None)
        self._order.pop(scope, None)

    def problems(self) -> dict[str, list[Problem]]:
        return self._problems

    def build(self) -> set[Hostname]:
        rules: dict[tuple[Hostname, str, tuple[str, ...]], _Claim] = {}
        """(host, namespace, exportTo) → the rule: rules of one host and namespace merge when their exportTo
        is the same (Istio's merge); others stay apart, each selected per client namespace."""
        services: dict[tuple[Hostname, str], _Claim] = {}
        problems: dict[str, list[Problem]] = {}
        origins: dict[tuple[Hostname, str, tuple[str, ...]], dict[str, DestinationRule]] = {}
        """rule key → subset name → the rule that declared it (for the duplicate warning)."""
        for scope in sorted(self._scopes, key=lambda s: (self._order.get(s, ""), s)):
            for obj in self._scopes[scope]:
                if isinstance(obj, DestinationRule):
                    key = (obj.host, obj.namespace, tuple(sorted(obj.export_to)))
                    first = rules.get(key)
                    if first is None:
                        rules[key] = _Claim(scope, obj)
                        origins[key] = {s.name: obj for s in obj.subsets}
                    else:
                        assert isinstance(first.obj, DestinationRule)
                        merged = _merge_rules(first.obj, obj, origins[key], problems.setdefault(scope, []))
                        rules[key] = _Claim(first.scope, merged)
                    continue
                for host in obj.hosts:
                    claim = services.get((host, obj.namespace))
                    if claim is None:
                        services[(host, obj.namespace)] = _Claim(scope, obj)
                        continue
                    problems.setdefault(scope, []).append(
                        Problem(
                            obj.where,
                            f"{host}: another {VIRTUAL_SERVICE} of this namespace ({claim.obj.namespace}/"
                            f"{claim.obj.name} at {claim.obj.where}) already applies to this host; this one is "
                            "ignored for it",
                        )
                    )
        by_host: dict[Hostname, list[DestinationRule]] = {}
        for (host, _, _), claim in rules.items():
            assert isinstance(claim.obj, DestinationRule)
            by_host.setdefault(host, []).append(claim.obj)
        routes_by_host: dict[Hostname, list[VirtualService]] = {}
        for (host, _), claim in services.items():
            vs = claim.obj
            assert isinstance(vs, VirtualService)
            routes_by_host.setdefault(host, []).append(vs)
            for i, route in enumerate(vs.http):
                for j, dest in enumerate(route.destinations):
                    if not dest.subset:
                        continue
                    candidates = [dr for k in (dest.host, *wildcard_keys(dest.host)) for dr in by_host.get(k, ())]
                    if not any(dr.subset(dest.subset) is not None for dr in candidates):
                        problems.setdefault(claim.scope, []).append(
                            Problem(
                                vs.where,
                                f"subset {dest.subset!r} of {dest.host} is not defined by "
                                "any DestinationRule (requests routed to it fail)",
                                f"spec.http[{i}].route[{j}].destination.subset",
                                Severity.WARNING,
                            )
                        )
        for claim in rules.values():
            assert isinstance(claim.obj, DestinationRule)
            found = _failover_without_outlier_detection(claim.obj)
            if found:
                problems.setdefault(claim.scope, []).extend(found)
        for scope, found in list(problems.items()):
            if not found:
                del problems[scope]
        new: dict[Hostname, HostPolicy] = {}
        for host in by_host.keys() | routes_by_host.keys():
            drs, vss = by_host.get(host, []), routes_by_host.get(host, [])
            policy = HostPolicy(drs[0] if drs else None, vss[0] if vss else None, tuple(drs[1:]), tuple(vss[1:]))
            old = self._policies.get(host)
            new[host] = old if old == policy else policy
        changed = {h for h in new.keys() | self._policies.keys() if self._policies.get(h) is not new.get(h)}
        self._policies = new
        self._problems = problems
        return changed


def _failover_without_outlier_detection(rule: DestinationRule) -> list[Problem]:
    """Istio's warning: locality failover at a level that sets no outlierDetection never fails over
    (an endpoint is only left for a lower priority once it is ejected or unhealthy)."""
    levels: list[tuple[str, TrafficPolicy | None]] = [("spec.trafficPolicy", rule.traffic_policy)]
    for i, subset in enumerate(rule.subsets):
        levels.append((f"spec.subsets[{i}].trafficPolicy", subset.traffic_policy))
    out: list[Problem] = []
    for path, policy in levels:
        if policy is None:
            continue
        settings = [(path, policy)] + [
            (f"{path}.portLevelSettings[{i}]", level) for i, (_, level) in enumerate(policy.port_level)
        ]
        for where, level in settings:
            lb = level.load_balancer
            locality = lb.locality if lb is not None else None
            if locality is None or not (locality.failover or locality.failover_priority):
                continue
            if level.outlier_detection is None and locality.enabled is not False:
                out.append(
                    Problem(
                        rule.where,
                        "locality failover is applied only to clusters with outlierDetection, and this level sets none",
                        f"{where}.loadBalancer.localityLbSetting",
                        Severity.WARNING,
                    )
                )
    return out
