"""Prometheus metrics of the DNS server, on the default registry (served by the admin /metrics).

The per-query counters (queries by type and rcode, answer cache hits and
misses, truncations) are plain integer tallies that a collector reads at
scrape time: a cached answer costs two attribute increments, no lock and no
label lookup. Everything else uses prometheus_client metrics directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from discoveryd.dns.message import RCODE_NAMES, TYPE_NAMES


class Tally:
    """A counter for the hot path; read by `_Collector` at scrape time."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount


_QUERIES: dict[tuple[str, str], Tally] = {}
ANSWER_CACHE_HIT = Tally()
ANSWER_CACHE_MISS = Tally()
TRUNCATED = Tally()

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
UPSTREAM_REJECTED = Counter(
    "discoveryd_dns_upstream_rejected_total",
    "Datagrams on an upstream exchange that were not its reply and were ignored, by reason: source (another "
    "address or port), id, malformed, question (another question), case (the 0x20 case pattern differs).",
    ["reason"],
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

_KNOWN_TYPES = frozenset(
    ("A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT", "AXFR", "IXFR", "DS")
)


@cache
def query_counter(qtype: int, rcode: int) -> Tally:
    """The tally of `discoveryd_dns_queries_total` for a type and rcode (unusual types share `other`)."""
    name = TYPE_NAMES.get(qtype, "other")
    key = (name if name in _KNOWN_TYPES else "other", RCODE_NAMES.get(rcode, str(rcode)))
    return _QUERIES.setdefault(key, Tally())


class _Collector:
    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "discoveryd_dns_queries",
            "DNS queries answered, by query type and response code.",
            labels=["qtype", "rcode"],
        )
        for (qtype, rcode), tally in sorted(_QUERIES.items()):
            queries.add_metric([qtype, rcode], tally.n)
        yield queries
        lookups = CounterMetricFamily(
            "discoveryd_dns_answer_cache",
            "Authoritative answer cache lookups; hit / (hit + miss) is the hit ratio.",
            labels=["result"],
        )
        lookups.add_metric(["hit"], ANSWER_CACHE_HIT.n)
        lookups.add_metric(["miss"], ANSWER_CACHE_MISS.n)
        yield lookups
        yield CounterMetricFamily(
            "discoveryd_dns_truncated",
            "Responses sent with TC set because they did not fit the client's UDP size.",
            value=TRUNCATED.n,
        )


REGISTRY.register(_Collector())
