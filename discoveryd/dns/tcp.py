"""Who may hold a TCP connection to the DNS server, and for how long (RFC 7766 §6.2.3).

Data flow: the server's accept callback asks `Slots.admit()` for each new
connection; each complete query the connection sends calls `Slots.touch()`;
the connection task calls `Slots.release()` when it ends, and reads
`Slots.idle_timeout()` before waiting for the next query.

Rules, each bounding what one client can make us hold:
- a source (an IPv4 address, an IPv6 /64) holds at most `per_source`
  connections; a further one is refused (closed at once);
- only a complete query resets a connection's idle clock, so neither empty
  messages nor a message dribbled byte by byte keep it open;
- above half of `limit` in use, the idle timeout shrinks linearly from
  `idle` to `MIN_IDLE` at a full table, and each admission closes the
  connections idle longer than that;
- a full table admits a new connection by closing the one idle longest, so
  held but unused connections cannot lock out new clients.

Connections are kept in least-recently-active order (an OrderedDict), so an
admission costs O(1) plus O(1) per connection it closes.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

MIN_IDLE = 1.0
"""Idle timeout, in seconds, with every slot in use."""


class Refusal(StrEnum):
    SOURCE_LIMIT = "tcp_source_limit"


class Conn:
    """One client connection: its source key, when it last completed a query, and how to close it.

    Created by the server's accept callback; `last` is written only by `Slots`.
    """

    __slots__ = ("close", "last", "source")

    def __init__(self, source: str, now: float, close: Callable[[], None]) -> None:
        self.source = source
        self.last = now
        self.close = close


def source_key(peer: str) -> str:
    """The key connections are counted under: the IPv4 address, or the IPv6 /64 (v4-mapped → IPv4)."""
    try:
        ip = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Slots:
    """The TCP slot table of one server. Used from the event loop only."""

    def __init__(self, limit: int, per_source: int, idle: float) -> None:
        self._limit = limit
        self._per_source = per_source
        self._idle = idle
        self._order: OrderedDict[Conn, None] = OrderedDict()
        self._per: dict[str, int] = {}
        self.shed = 0
        """Connections closed to make room (idle under pressure, or the longest idle at a full table)."""

    def __len__(self) -> int:
        return len(self._order)

    def idle_timeout(self) -> float:
        """The idle timeout for the current occupancy."""
        n, half = len(self._order), self._limit / 2
        if n <= half or self._idle <= MIN_IDLE:
            return self._idle
        free = max(0.0, (self._limit - n) / (self._limit - half))
        return MIN_IDLE + (self._idle - MIN_IDLE) * free

    def admit(self, conn: Conn) -> Refusal | None:
        """Take a slot for `conn` (closing others if needed), or say why it is refused."""
        held = self._per.get(conn.source, 0)
        if held >= self._per_source:
            return Refusal.SOURCE_LIMIT
        self._order[conn] = None
        self._per[conn.source] = held + 1
        if len(self._order) > self._limit // 2:
            cutoff = conn.last - self.idle_timeout()
            while self._order:
                oldest = next(iter(self._order))
                if oldest.last >= cutoff and len(self._order) <= self._limit:
                    break
                self._evict(oldest)
        return None

    def touch(self, conn: Conn, now: float) -> None:
        """`conn` completed a query at `now`."""
        if conn in self._order:
            conn.last = now
            self._order.move_to_end(conn)

    def release(self, conn: Conn) -> None:
        """`conn` ended (its task's cleanup); idempotent."""
        if self._order.pop(conn, False) is None:
            held = self._per[conn.source] - 1
            if held:
                self._per[conn.source] = held
            else:
                del self._per[conn.source]

    def _evict(self, conn: Conn) -> None:
        self.release(conn)
        self.shed += 1
        conn.close()
