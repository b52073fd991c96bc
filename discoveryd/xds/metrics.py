"""Prometheus metrics of the xDS server, on the default registry (served by the admin /metrics).

`type` labels are the short type names CDS, EDS, LDS, RDS.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTED = Gauge("discoveryd_xds_connected_clients", "xDS streams currently open.")
PUSHES = Counter("discoveryd_xds_pushes_total", "Discovery responses sent.", ["type"])
BYTES_SENT = Counter("discoveryd_xds_sent_bytes_total", "Bytes of discovery responses sent.", ["type"])
NACKS = Counter("discoveryd_xds_nacks_total", "Discovery responses rejected by a client.", ["type"])
STALE_NONCES = Counter(
    "discoveryd_xds_stale_nonce_requests_total", "Requests ignored because they answered an older response.", ["type"]
)
PUSH_SECONDS = Histogram(
    "discoveryd_xds_push_seconds",
    "From a snapshot change being queued on a stream to its response being written.",
    ["type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CONVERGENCE_SECONDS = Histogram(
    "discoveryd_xds_convergence_seconds",
    "From an index change to a client's ACK of the response carrying it (debounce included).",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BUILD_SECONDS = Histogram(
    "discoveryd_xds_build_seconds",
    "Time to rebuild the resources of one push from a snapshot diff.",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
