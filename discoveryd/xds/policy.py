"""DestinationRule and VirtualService values → Envoy cluster settings and route configurations.

Called only by `discoveryd.xds.resources.Builder.build` (the push loop's
task), for one service at a time; pure functions over protobuf messages.

Cluster settings (`apply`), from one cluster's effective `TrafficPolicy`:
- loadBalancer.simple → lb_policy; consistentHash → RING_HASH (minimum ring
  size) or MAGLEV (table size), the hash key going into the routes'
  `hash_policy` (`add_hash_policy`);
- loadBalancer.localityLbSetting, when active (distribute; or failover with
  outlier detection; not `enabled: false`) and the cluster is EDS →
  `common_lb_config.locality_weighted_lb_config`; the per-client
  priorities and weights are in the assignments (`discoveryd.xds.locality`);
- outlierDetection → outlier_detection (a consecutive count enforces 100%
  when positive, as Istio does); minHealthPercent → the panic threshold;
- connectionPool → circuit breaker thresholds (maxConnections,
  http1MaxPendingRequests, http2MaxRequests, maxRetries), connect_timeout,
  TCP keepalive, HTTP protocol options (maxRequestsPerConnection,
  idleTimeout) — kept together with the HTTP/2 option of h2 ports;
- tls SIMPLE/MUTUAL → an `envoy.transport_sockets.tls` UpstreamTlsContext
  with the files named (certificate, key, CA), SNI and SAN matchers.

Routes (`route_configuration`): every VirtualService http route becomes one
Envoy route per match entry (one catch-all when it has none), in order:
uri exact/prefix/regex, headers, method (`:method`); one destination is a
cluster, several are weighted_clusters; timeout (also as the gRPC
max_stream_duration), retries, fault (per-route fault filter config; the
listener then carries the fault filter before the router); rewrite → the
action's prefix_rewrite (the matched prefix, or the whole path of an exact
or regex match; a route without a uri match gets Istio's catch-all prefix
`/`), regex_rewrite, host_rewrite_literal; headers → request/response
headers to add (set overwrites, add appends) and to remove, on the route;
a destination's headers go on its weighted cluster, or after the route's
when it is the only destination, as Istio places them.
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from discoveryd.model import Endpoint, Hostname, Port
from discoveryd.policy import (
    ConsistentHash,
    DestinationRule,
    Fault,
    HeaderOperations,
    Headers,
    HttpMatch,
    HttpRoute,
    MatchKind,
    SimpleLb,
    StringMatch,
    Subset,
    TlsMode,
    TrafficPolicy,
    VirtualService,
)

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
FAULT_FILTER = "envoy.filters.http.fault"
TLS_SOCKET = "envoy.transport_sockets.tls"

_SIMPLE = {
    SimpleLb.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    SimpleLb.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLb.LEAST_CONN: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLb.RANDOM: cluster_pb2.Cluster.RANDOM,
}


def cluster_name(host: str, port: int, subset: str = "") -> str:
    """Istio's outbound cluster name: `outbound|<port>|<subset>|<host>` (subset empty for the service)."""
    return f"outbound|{port}|{subset}|{host}"


def selects(subset: Subset, ep: Endpoint) -> bool:
    labels = ep.labels
    return all(labels.get(k) == v for k, v in subset.labels.items())


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def apply(c: cluster_pb2.Cluster, policy: TrafficPolicy, port: Port) -> None:
    """Lay one cluster's effective traffic policy over the cluster as built for the service."""
    lb = policy.load_balancer
    if lb is not None:
        if lb.consistent_hash is not None:
            h = lb.consistent_hash
            if h.maglev:
                c.lb_policy = cluster_pb2.Cluster.MAGLEV
                if h.table_size is not None:
                    c.maglev_lb_config.table_size.value = h.table_size
            else:
                c.lb_policy = cluster_pb2.Cluster.RING_HASH
                if h.table_size is not None:
                    c.ring_hash_lb_config.minimum_ring_size.value = h.table_size
        elif lb.simple in _SIMPLE and c.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
            c.lb_policy = _SIMPLE[lb.simple]
        if lb.warmup is not None:
            if c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN:
                c.round_robin_lb_config.slow_start_config.slow_start_window.CopyFrom(_duration(lb.warmup))
            elif c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST:
                c.least_request_lb_config.slow_start_config.slow_start_window.CopyFrom(_duration(lb.warmup))
    locality = lb.locality if lb is not None else None
    if (
        locality is not None
        and locality.active(policy.outlier_detection is not None)
        and c.type == cluster_pb2.Cluster.EDS
    ):
        # Clients weigh localities by the assignment's weights (set per client by `distribute`).
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    od = policy.outlier_detection
    if od is not None:
        o = outlier_detection_pb2.OutlierDetection()
        if od.consecutive_5xx is not None:
            o.consecutive_5xx.value = od.consecutive_5xx
            o.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx > 0 else 0
        if od.consecutive_gateway_errors is not None:
            o.consecutive_gateway_failure.value = od.consecutive_gateway_errors
            o.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway_errors > 0 else 0
        if od.interval is not None:
            o.interval.CopyFrom(_duration(od.interval))
        if od.base_ejection_time is not None:
            o.base_ejection_time.CopyFrom(_duration(od.base_ejection_time))
        if od.max_ejection_percent is not None:
            o.max_ejection_percent.value = od.max_ejection_percent
        c.outlier_detection.CopyFrom(o)
        if od.min_health_percent is not None:
            c.common_lb_config.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=od.min_health_percent))
    pool = policy.connection_pool
    if pool is not None:
        t = circuit_breaker_pb2.CircuitBreakers.Thresholds()
        if pool.max_connections is not None:
            t.max_connections.value = pool.max_connections
        if pool.http1_max_pending_requests is not None:
            t.max_pending_requests.value = pool.http1_max_pending_requests
        if pool.http2_max_requests is not None:
            t.max_requests.value = pool.http2_max_requests
        if pool.max_retries is not None:
            t.max_retries.value = pool.max_retries
        if t.ListFields():
            c.circuit_breakers.thresholds.append(t)
        if pool.connect_timeout is not None:
            c.connect_timeout.CopyFrom(_duration(pool.connect_timeout))
        if pool.tcp_keepalive is not None:
            k = pool.tcp_keepalive
            keep = address_pb2.TcpKeepalive()
            if k.probes is not None:
                keep.keepalive_probes.value = k.probes
            if k.time is not None:
                keep.keepalive_time.value = max(1, int(k.time))
            if k.interval is not None:
                keep.keepalive_interval.value = max(1, int(k.interval))
            c.upstream_connection_options.tcp_keepalive.CopyFrom(keep)
        if pool.max_requests_per_connection is not None or pool.idle_timeout is not None:
            options = http_protocol_options_pb2.HttpProtocolOptions()
            if HTTP_OPTIONS in c.typed_extension_protocol_options:
                c.typed_extension_protocol_options[HTTP_OPTIONS].Unpack(options)
            else:
                options.explicit_http_config.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
            common = options.common_http_protocol_options
            if pool.max_requests_per_connection:
                common.max_requests_per_connection.value = pool.max_requests_per_connection
            if pool.idle_timeout is not None:
                common.idle_timeout.CopyFrom(_duration(pool.idle_timeout))
            c.typed_extension_protocol_options[HTTP_OPTIONS].Pack(options)
    tls = policy.tls
    if tls is not None and tls.mode in (TlsMode.SIMPLE, TlsMode.MUTUAL):
        ctx = tls_pb2.UpstreamTlsContext(sni=tls.sni)
        common = ctx.common_tls_context
        if tls.mode is TlsMode.MUTUAL:
            cert = common.tls_certificates.add()
            cert.certificate_chain.filename = tls.client_certificate
            cert.private_key.filename = tls.private_key
        if tls.ca_certificates:
            common.validation_context.trusted_ca.filename = tls.ca_certificates
        for san in tls.subject_alt_names:
            common.validation_context.match_typed_subject_alt_names.add(
                san_type=common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=san)
            )
        c.transport_socket.name = TLS_SOCKET
        c.transport_socket.typed_config.Pack(ctx)


def add_hash_policy(action: route_components_pb2.RouteAction, policy: TrafficPolicy) -> None:
    """The request hash of a consistentHash load balancer (Envoy and gRPC A42 take it from the route)."""
    lb = policy.load_balancer
    h: ConsistentHash | None = lb.consistent_hash if lb is not None else None
    if h is None:
        return
    hp = action.hash_policy.add()
    if h.header:
        hp.header.header_name = h.header
    elif h.cookie:
        hp.cookie.name = h.cookie
        hp.cookie.path = h.cookie_path
        if h.cookie_ttl is not None:
            hp.cookie.ttl.CopyFrom(_duration(h.cookie_ttl))
    elif h.source_ip:
        hp.connection_properties.source_ip = True
    elif h.query_parameter:
        hp.query_parameter.name = h.query_parameter


def add_fault_filter(manager: hcm_pb2.HttpConnectionManager) -> None:
    """The fault filter (empty: per-route configs decide), before the router that must stay last."""
    fault = manager.http_filters.add(name=FAULT_FILTER)
    fault.typed_config.Pack(fault_pb2.HTTPFault())


def route_configuration(
    name: str, host: Hostname, port: Port, service: VirtualService, rule: DestinationRule | None
) -> route_pb2.RouteConfiguration:
    """`<host>:<port>` with the VirtualService's http routes, in order (no route added after them, as Istio)."""
    vhost = route_components_pb2.VirtualHost(name=name, domains=[name, host])
    for http in service.http:
        for match in http.matches or (HttpMatch(),):
            vhost.routes.append(_route(http, match, port, rule, host))
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def _string_matcher(m: StringMatch) -> string_pb2.StringMatcher:
    if m.kind is MatchKind.EXACT:
        return string_pb2.StringMatcher(exact=m.value)
    if m.kind is MatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=m.value)
    return string_pb2.StringMatcher(safe_regex=_regex(m.value))


def _regex(value: str) -> regex_pb2.RegexMatcher:
    return regex_pb2.RegexMatcher(regex=value)


def _route(
    http: HttpRoute, match: HttpMatch, port: Port, rule: DestinationRule | None, host: Hostname
) -> route_components_pb2.Route:
    r = route_components_pb2.Route(name=http.name)
    m = r.match
    if match.uri is None and http.rewrite is not None and http.rewrite.uri:
        m.prefix = "/"  # Istio's catch-all: the uri rewrite then replaces this "/"
    elif match.uri is None or match.uri.kind is MatchKind.PREFIX:
        m.prefix = match.uri.value if match.uri is not None else ""
    elif match.uri.kind is MatchKind.EXACT:
        m.path = match.uri.value
    else:
        m.safe_regex.CopyFrom(_regex(match.uri.value))
    for header, value in match.headers:
        m.headers.add(name=header, string_match=_string_matcher(value))
    if match.method is not None:
        m.headers.add(name=":method", string_match=_string_matcher(match.method))
    action = r.route
    if http.headers is not None:
        _add_headers(r, http.headers)
    rewrite = http.rewrite
    if rewrite is not None:
        if rewrite.uri_regex is not None:
            action.regex_rewrite.pattern.CopyFrom(_regex(rewrite.uri_regex[0]))
            action.regex_rewrite.substitution = rewrite.uri_regex[1]
        elif rewrite.uri:
            action.prefix_rewrite = rewrite.uri
    authority = (rewrite.authority if rewrite is not None else "") or (http.headers.authority if http.headers else "")
    if authority:
        action.host_rewrite_literal = authority
    names = [cluster_name(d.host, d.port or port.number, d.subset) for d in http.destinations]
    if len(names) == 1:
        action.cluster = names[0]
        headers = http.destinations[0].headers
        if headers is not None:  # one destination: its operations follow the route's, as Istio orders them
            _add_headers(r, headers)
            if headers.authority and not action.host_rewrite_literal:
                action.host_rewrite_literal = headers.authority
    else:
        for d, cname in zip(http.destinations, names, strict=True):
            if d.weight > 0:
                weighted = action.weighted_clusters.clusters.add(name=cname, weight=_u32(d.weight))
                if d.headers is not None:
                    _add_headers(weighted, d.headers)
                    if d.headers.authority:
                        weighted.host_rewrite_literal = d.headers.authority
    if rule is not None:
        same = [d for d in http.destinations if d.host == host]
        if same:
            subset = rule.subset(same[0].subset) if same[0].subset else None
            add_hash_policy(action, rule.effective(port.number, subset))
    if http.timeout is not None:
        action.timeout.CopyFrom(_duration(http.timeout))
        action.max_stream_duration.max_stream_duration.CopyFrom(_duration(http.timeout))
    if http.retries is not None and http.retries.attempts > 0:  # 0 disables retries (gRPC rejects num_retries 0)
        rp = action.retry_policy
        rp.num_retries.value = http.retries.attempts
        rp.retry_on = (
            http.retries.retry_on or "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
        )
        if http.retries.per_try_timeout is not None:
            rp.per_try_timeout.CopyFrom(_duration(http.retries.per_try_timeout))
    if http.fault is not None:
        r.typed_per_filter_config[FAULT_FILTER].Pack(_fault(http.fault))
    return r


def _add_headers(
    target: route_components_pb2.Route | route_components_pb2.WeightedCluster.ClusterWeight, headers: Headers
) -> None:
    """Istio's header operations on a route or a weighted cluster: set overwrites, add appends."""
    target.request_headers_to_add.extend(_header_options(headers.request))
    target.request_headers_to_remove.extend(headers.request.remove)
    target.response_headers_to_add.extend(_header_options(headers.response))
    target.response_headers_to_remove.extend(headers.response.remove)


def _header_options(ops: HeaderOperations) -> list[base_pb2.HeaderValueOption]:
    """`set` then `add`, each sorted by name (deterministic bytes whatever the YAML's key order)."""
    out = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for k, v in sorted(ops.set)
    ]
    out += [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
        )
        for k, v in sorted(ops.add)
    ]
    return out


def _u32(n: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=n)


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _fault(fault: Fault) -> fault_pb2.HTTPFault:
    f = fault_pb2.HTTPFault()
    if fault.delay is not None:
        f.delay.CopyFrom(
            common_fault_pb2.FaultDelay(fixed_delay=_duration(fault.delay), percentage=_fraction(fault.delay_percent))
        )
    if fault.abort_status is not None:
        f.abort.http_status = fault.abort_status
        f.abort.percentage.CopyFrom(_fraction(fault.abort_percent))
    elif fault.abort_grpc_status is not None:
        f.abort.grpc_status = fault.abort_grpc_status
        f.abort.percentage.CopyFrom(_fraction(fault.abort_percent))
    return f


__all__ = ["add_fault_filter", "add_hash_policy", "apply", "cluster_name", "route_configuration", "selects"]


# -- what proxyless gRPC does not honour ---------------------------------------------------------------

Ignored = tuple[tuple[str, str], ...]
"""(field, why) pairs: the Istio fields a resource carries that a client type does not honour."""

GRPC_RETRY_ON = frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
"""The retryOn conditions gRPC turns into retryable status codes (gRFC A44); it ignores the others."""

_POOL_FIELDS = (
    ("max_connections", "connectionPool.tcp.maxConnections"),
    ("connect_timeout", "connectionPool.tcp.connectTimeout"),
    ("tcp_keepalive", "connectionPool.tcp.tcpKeepalive"),
    ("http1_max_pending_requests", "connectionPool.http.http1MaxPendingRequests"),
    ("max_requests_per_connection", "connectionPool.http.maxRequestsPerConnection"),
    ("max_retries", "connectionPool.http.maxRetries"),
    ("idle_timeout", "connectionPool.http.idleTimeout"),
)
_HASH_KEYS = (
    ("cookie", "loadBalancer.consistentHash.httpCookie"),
    ("source_ip", "loadBalancer.consistentHash.useSourceIp"),
    ("query_parameter", "loadBalancer.consistentHash.httpQueryParameterName"),
)


def grpc_ignored_by_cluster(policy: TrafficPolicy) -> Ignored:
    """The fields of one cluster's effective DestinationRule settings that proxyless gRPC does not honour.

    The table (and the gRFCs behind it) is in discoveryd/xds/README.md, "What proxyless gRPC honours"."""
    out: list[tuple[str, str]] = []
    lb = policy.load_balancer
    if lb is not None:
        if lb.simple is SimpleLb.RANDOM:
            out.append(("loadBalancer.simple", "RANDOM: gRPC has no such policy and rejects the cluster"))
        h = lb.consistent_hash
        if h is not None:
            if h.maglev:
                out.append(("loadBalancer.consistentHash.maglev", "gRPC has ring hash only (A42): rejects MAGLEV"))
            for attr, name in _HASH_KEYS:
                if getattr(h, attr):
                    out.append((name, "gRPC hashes on headers only (A42); other keys get a random hash"))
        if lb.warmup is not None:
            out.append(("loadBalancer.warmupDurationSecs", "no slow start in gRPC"))
    pool = policy.connection_pool
    if pool is not None:
        for attr, name in _POOL_FIELDS:
            if getattr(pool, attr) is not None:
                out.append((name, "gRPC honours only http2MaxRequests of connectionPool (A32)"))
    od = policy.outlier_detection
    if od is not None:
        if od.consecutive_5xx:
            out.append(("outlierDetection.consecutive5xxErrors", "gRPC ejects by success rate or failure % only (A50)"))
        if od.consecutive_gateway_errors:
            out.append(
                ("outlierDetection.consecutiveGatewayErrors", "gRPC ejects by success rate or failure % only (A50)")
            )
        if od.min_health_percent is not None:
            out.append(("outlierDetection.minHealthPercent", "gRPC has no panic threshold"))
    if policy.tls is not None and policy.tls.mode in (TlsMode.SIMPLE, TlsMode.MUTUAL):
        out.append(("tls", "gRPC takes upstream TLS from xDS credentials' certificate providers only (A29)"))
    return tuple(out)


def grpc_ignored_by_routes(service: VirtualService) -> Ignored:
    """The fields of a VirtualService's http routes that proxyless gRPC does not honour (A28, A31, A44)."""
    found: dict[str, str] = {}
    retry_on: set[str] = set()
    for http in service.http:
        rewrite = http.rewrite
        if rewrite is not None:
            if rewrite.uri:
                found["http.rewrite.uri"] = "gRPC does not rewrite paths"
            if rewrite.uri_regex is not None:
                found["http.rewrite.uriRegexRewrite"] = "gRPC does not rewrite paths"
            if rewrite.authority:
                found["http.rewrite.authority"] = "gRPC does not rewrite the authority"
        if http.headers is not None:
            found["http.headers"] = "gRPC does not add or remove headers"
        if any(d.headers is not None for d in http.destinations):
            found["http.route.headers"] = "gRPC does not add or remove headers"
        retries = http.retries
        if retries is not None and retries.attempts > 0:
            if retries.per_try_timeout is not None:
                found["http.retries.perTryTimeout"] = "gRPC has no per-try timeout (A44)"
            conditions = {c.strip() for c in retries.retry_on.split(",") if c.strip()}
            retry_on |= conditions - GRPC_RETRY_ON
    if retry_on:
        found["http.retries.retryOn"] = (
            f"gRPC retries on gRPC status names only (A44); ignored: {', '.join(sorted(retry_on))}"
        )
    return tuple(sorted(found.items()))
