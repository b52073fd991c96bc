"""Prometheus metrics of the DNS server, on the default registry (served by the admin /metrics).

The hot path holds pre-resolved label children (`query_counter`) so that a
cached answer costs two counter increments and no label lookups.
"""

from __future__ import annotations

from functools import cache

from dnslib import QTYPE, RCODE
from prometheus_client import Counter, Gauge, Histogram

QUERIES = Counter(
    "discoveryd_dns_queries_total",
    "DNS queries answered, by query type and response code.",
    ["qtype", "rcode"],
)
ANSWER_CACHE = Counter(
    "discoveryd_dns_answer_cache_total",
    "Authoritative answer cache lookups; hit / (hit + miss) is the hit ratio.",
    ["result"],
)
FORWARDED = Counter(
    "discoveryd_dns_forwarded_total",
    "Queries for names outside our zones, by outcome: cached, answered (by an upstream), failed (SERVFAIL), "
    "refused (client outside allow_forward_from, or no upstreams).",
    ["result"],
)
UPSTREAM_SECONDS = Histogram(
    "discoveryd_dns_upstream_duration_seconds",
    "Latency of one exchange with an upstream resolver, by upstream and outcome.",
    ["upstream", "result"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TRUNCATED = Counter(
    "discoveryd_dns_truncated_total",
    "Responses sent with TC set because they did not fit the client's UDP size.",
)
DROPPED = Counter(
    "discoveryd_dns_dropped_total",
    "Packets dropped without a response, by reason.",
    ["reason"],
)
TCP_CONNECTIONS = Gauge(
    "discoveryd_dns_tcp_connections",
    "Open TCP connections from clients.",
)
RECORD_NAMES = Gauge(
    "discoveryd_dns_record_names",
    "Owner names with records built from the index.",
)

ANSWER_CACHE_HIT = ANSWER_CACHE.labels("hit")
ANSWER_CACHE_MISS = ANSWER_CACHE.labels("miss")

_KNOWN_TYPES = frozenset(
    ("A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT", "AXFR", "IXFR", "DS")
)


@cache
def query_counter(qtype: int, rcode: int) -> Counter:
    """The `discoveryd_dns_queries_total` child for a type and rcode (unusual types share `other`)."""
    name = QTYPE.get(qtype, "other")
    rname = "BADVERS" if rcode == 16 else RCODE.get(rcode, str(rcode))
    return QUERIES.labels(name if name in _KNOWN_TYPES else "other", rname)
