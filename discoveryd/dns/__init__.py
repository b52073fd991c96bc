"""The DNS server: authoritative for mesh names built from the index, forwarding everything else.

Modules, in data-flow order: `records` (the index snapshot as DNS records),
`answer` (resolution, wire encoding, the answer cache and its hot path),
`forward` (upstream resolvers, their cache, spoofing checks), `server`
(UDP/TCP listeners, the protocol rules, CNAME chasing for recursive
clients), `udp` (batched datagram I/O), `tcp` (who may hold a connection),
`rrl` (response rate limiting), `querylog`, `metrics` (per-server counters),
`wire` (reading a query's question) and `message` (record types and writing
responses), both without a DNS library.
"""

from discoveryd.dns.server import DnsServer

__all__ = ["DnsServer"]
