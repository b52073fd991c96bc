"""Prometheus metrics of one DNS server.

A `DnsMetrics` is owned by one `DnsServer` (and shared with its authority,
forwarder and UDP readers); it is a prometheus collector, registered in the
registry its owner chooses. The daemon's servers share `daemon_metrics()`,
registered once in prometheus_client's default registry (what the admin
/metrics serves, across reload restarts too); a test passes its own
`DnsMetrics()` so that two servers in one process do not share counts.

The per-query counters (queries by type and rcode, answer cache hits and
misses, truncations) are plain integer tallies read at scrape time: a cached
answer costs two attribute increments, no lock and no label lookup.
Everything else uses prometheus_client metric objects held here, outside any
registry, and yielded by `collect()`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from discoveryd.dns.message import RCODE_NAMES, TYPE_NAMES


class Tally:
    """A counter for the hot path; read by `DnsMetrics.collect()` at scrape time."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount


_KNOWN_TYPES = frozenset(
    ("A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT", "AXFR", "IXFR", "DS")
)


class DnsMetrics:
    """Every counter and gauge of one DNS server. Written from its event loop; read by scrapes."""

    def __init__(self) -> None:
        self._queries: dict[tuple[str, str], Tally] = {}
        self._by_code: dict[tuple[int, int], Tally] = {}
        self.cache_hit = Tally()
        self.cache_miss = Tally()
        self.truncated = Tally()
        self.cache_bytes = Tally()
        """Set (not counted) by the authority: bytes its answer cache holds."""
        self.forwarded = Counter(
            "discoveryd_dns_forwarded",
            "Queries for names outside our zones, by outcome: cached, answered (by an upstream), failed (SERVFAIL), "
            "refused (client outside allow_forward_from, or no upstreams).",
            ["result"],
            registry=None,
        )
        self.upstream_seconds = Histogram(
            "discoveryd_dns_upstream_duration_seconds",
            "Latency of one exchange with an upstream resolver, by upstream and outcome.",
            ["upstream", "result"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=None,
        )
        self.upstream_rejected = Counter(
            "discoveryd_dns_upstream_rejected",
            "Datagrams on an upstream exchange that were not its reply and were ignored, by reason: source "
            "(another address or port), id, malformed, question (another question), case (the 0x20 pattern differs).",
            ["reason"],
            registry=None,
        )
        self.dropped = Counter(
            "discoveryd_dns_dropped",
            "Packets dropped without a response, by reason (malformed ones are counted by "
            "discoveryd_dns_malformed_total as well).",
            ["reason"],
            registry=None,
        )
        self.malformed = Counter(
            "discoveryd_dns_malformed",
            "Malformed queries, by reason: short (under a header), oversized (UDP over 4 KiB), tcp_short (a TCP "
            "message under a header; the connection is closed), unreadable (FORMERR: a name, record or pointer "
            "cannot be read), qdcount (not one question), opt (more than one OPT, or OPT as the question type).",
            ["reason"],
            registry=None,
        )
        self.rrl_dropped = Tally()
        self.rrl_slipped = Tally()
        self.query_log_written = Tally()
        self.query_log_suppressed = Tally()
        self.tcp_connections = Gauge(
            "discoveryd_dns_tcp_connections",
            "Open TCP connections from clients.",
            registry=None,
        )
        self.tcp_shed = Counter(
            "discoveryd_dns_tcp_shed",
            "TCP connections closed to make room: idle too long under pressure, or the longest idle at a full table.",
            registry=None,
        )
        self.record_names = Gauge(
            "discoveryd_dns_record_names",
            "Owner names with records built from the index.",
            registry=None,
        )
        self._objects = (
            self.forwarded,
            self.upstream_seconds,
            self.upstream_rejected,
            self.dropped,
            self.malformed,
            self.tcp_connections,
            self.tcp_shed,
            self.record_names,
        )

    def query_counter(self, qtype: int, rcode: int) -> Tally:
        """The tally of `discoveryd_dns_queries_total` for a type and rcode (unusual types share `other`)."""
        found = self._by_code.get((qtype, rcode))
        if found is None:
            name = TYPE_NAMES.get(qtype, "other")
            known = name in _KNOWN_TYPES
            key = (name if known else "other", RCODE_NAMES.get(rcode, str(rcode)))
            found = self._queries.setdefault(key, Tally())
            if known:  # memoised for known types only: a client sending every qtype would fill it otherwise
                self._by_code[(qtype, rcode)] = found
        return found

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "discoveryd_dns_queries",
            "DNS queries answered, by query type and response code.",
            labels=["qtype", "rcode"],
        )
        for (qtype, rcode), tally in sorted(self._queries.items()):
            queries.add_metric([qtype, rcode], tally.n)
        yield queries
        lookups = CounterMetricFamily(
            "discoveryd_dns_answer_cache",
            "Authoritative answer cache lookups; hit / (hit + miss) is the hit ratio.",
            labels=["result"],
        )
        lookups.add_metric(["hit"], self.cache_hit.n)
        lookups.add_metric(["miss"], self.cache_miss.n)
        yield lookups
        yield GaugeMetricFamily(
            "discoveryd_dns_answer_cache_bytes",
            "Bytes held by the authoritative answer cache (responses and exact-query keys, with overhead).",
            value=self.cache_bytes.n,
        )
        yield CounterMetricFamily(
            "discoveryd_dns_truncated",
            "Responses sent with TC set because they did not fit the client's UDP size.",
            value=self.truncated.n,
        )
        rrl = CounterMetricFamily(
            "discoveryd_dns_rrl",
            "UDP responses over the rate limit of their source prefix, by action: dropped, slipped (sent truncated).",
            labels=["action"],
        )
        rrl.add_metric(["dropped"], self.rrl_dropped.n)
        rrl.add_metric(["slipped"], self.rrl_slipped.n)
        yield rrl
        lines = CounterMetricFamily(
            "discoveryd_dns_query_log_lines",
            "Query log lines, by result: written, suppressed (over query_log_rate).",
            labels=["result"],
        )
        lines.add_metric(["written"], self.query_log_written.n)
        lines.add_metric(["suppressed"], self.query_log_suppressed.n)
        yield lines
        for obj in self._objects:
            yield from obj.collect()


_daemon: DnsMetrics | None = None


def daemon_metrics() -> DnsMetrics:
    """The metrics in prometheus_client's default registry (what /metrics serves), created on first use.

    The default registry accepts each metric name once: every DNS server the
    daemon runs (a restart on reload included) shares these.
    """
    global _daemon
    if _daemon is None:
        _daemon = DnsMetrics()
        REGISTRY.register(_daemon)
    return _daemon
