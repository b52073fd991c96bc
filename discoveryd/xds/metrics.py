"""Prometheus metrics of one xDS server.

An `XdsMetrics` is owned by one `XdsServer` and registers its metrics in the
registry it is given: the daemon's (prometheus_client's default registry,
served by the admin /metrics) unless a caller passes its own, so that two
servers can run in one process (tests) without sharing counts.
`type` labels are the short type names CDS, EDS, LDS, RDS.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from discoveryd.xds.resources import SHORT

_PUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONVERGENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUILD_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class XdsMetrics:
    """The metrics of one server; per-type children are looked up once (they run for every response and ACK)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connected = Gauge("discoveryd_xds_connected_clients", "xDS streams currently open.", registry=registry)
        self.pushes = Counter("discoveryd_xds_pushes_total", "Discovery responses sent.", ["type"], registry=registry)
        self.sent_bytes = Counter(
            "discoveryd_xds_sent_bytes_total", "Bytes of discovery responses sent.", ["type"], registry=registry
        )
        self.nacks = Counter(
            "discoveryd_xds_nacks_total", "Discovery responses rejected by a client.", ["type"], registry=registry
        )
        self.stale_nonces = Counter(
            "discoveryd_xds_stale_nonce_requests_total",
            "Requests ignored because they answered an older response.",
            ["type"],
            registry=registry,
        )
        self.push_seconds = Histogram(
            "discoveryd_xds_push_seconds",
            "From a snapshot change being queued on a stream to its response being written.",
            ["type"],
            buckets=_PUSH_BUCKETS,
            registry=registry,
        )
        self.convergence_seconds = Histogram(
            "discoveryd_xds_convergence_seconds",
            "From an index change to a client's ACK of the response carrying it (debounce included).",
            ["type"],
            buckets=_CONVERGENCE_BUCKETS,
            registry=registry,
        )
        self.build_seconds = Histogram(
            "discoveryd_xds_build_seconds",
            "Time to rebuild the resources of one push from a snapshot diff.",
            buckets=_BUILD_BUCKETS,
            registry=registry,
        )
        self.unsupported_fields = Gauge(
            "discoveryd_xds_unsupported_fields",
            "Hosts whose resources, sent to clients of this type, carry this Istio field they do not honour.",
            ["client_type", "field"],
            registry=registry,
        )
        self.subscription_limit = Counter(
            "discoveryd_xds_subscription_limit_total",
            "Streams ended with RESOURCE_EXHAUSTED for naming more resources of this type than allowed.",
            ["type"],
            registry=registry,
        )
        shorts = SHORT.values()
        self.pushes_by = {s: self.pushes.labels(s) for s in shorts}
        self.sent_bytes_by = {s: self.sent_bytes.labels(s) for s in shorts}
        self.nacks_by = {s: self.nacks.labels(s) for s in shorts}
        self.stale_nonces_by = {s: self.stale_nonces.labels(s) for s in shorts}
        self.push_seconds_by = {s: self.push_seconds.labels(s) for s in shorts}
        self.convergence_by = {s: self.convergence_seconds.labels(s) for s in shorts}
        self.subscription_limit_by = {s: self.subscription_limit.labels(s) for s in shorts}


_daemon: XdsMetrics | None = None


def daemon_metrics() -> XdsMetrics:
    """The metrics in prometheus_client's default registry (what /metrics serves), created on first use.

    The default registry accepts each metric name once: every server of the
    daemon's one xDS listener set (a restart on reload included) shares these.
    """
    global _daemon
    if _daemon is None:
        _daemon = XdsMetrics(REGISTRY)
    return _daemon
