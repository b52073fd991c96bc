"""The query log: one line per answered query (client, name, type, rcode, duration), rate-limited.

Data flow: with `dns.query_log` on, the UDP reader and the TCP connection
loop hand each response they send (and forwarded replies when they go out)
to `QueryLog.record()` with the client's packed address and the time the
query was read. The name, type and rcode are read back from the response's
question and header, so the log shows what was answered. The name is
written in DNS presentation format with every byte outside printable ASCII
(and space, `"`, `\\`, `.` inside a label) escaped as `\\DDD` or `\\c`, so a
query can never forge or break a log line.

Lines go to the logger `discoveryd.dns.query` at INFO. At most
`query_log_rate` lines per second pass (a token bucket with one second's
burst); the rest are counted (`suppressed`) and reported in one line when
logging resumes. Records carry `prelimited` so the process-wide log flood
filter leaves them to this limit. Used from the event loop only.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from discoveryd.dns.message import RCODE_NAMES, TYPE_NAMES

log = logging.getLogger("discoveryd.dns.query")

_PLAIN = frozenset(range(0x21, 0x7F)) - {
    ord("."),
    ord("\\"),
    ord('"'),
    ord("("),
    ord(")"),
    ord(";"),
    ord("@"),
    ord("$"),
}


def presentation(wire: bytes, start: int = 12) -> tuple[str, int]:
    """The uncompressed name at `start` of `wire` in presentation format, and the offset after it."""
    out: list[str] = []
    i, size = start, len(wire)
    while i < size:
        length = wire[i]
        if length == 0 or length & 0xC0:
            i += 1
            break
        label = wire[i + 1 : i + 1 + length]
        out.append(
            "".join(chr(c) if c in _PLAIN else (f"\\{chr(c)}" if 0x20 < c < 0x7F else f"\\{c:03d}") for c in label)
        )
        i += 1 + length
    return ".".join(out) + ".", i


def describe(response: bytes) -> tuple[str, str, str]:
    """(name, type, rcode) of a response, read from its question and header."""
    if len(response) < 12:
        return "-", "-", "-"
    name, end = presentation(response)
    qtype = int.from_bytes(response[end : end + 2], "big") if end + 2 <= len(response) else 0
    rcode = response[3] & 0x0F
    tc = "+tc" if response[2] & 0x02 else ""
    return name, TYPE_NAMES.get(qtype, f"TYPE{qtype}"), RCODE_NAMES.get(rcode, str(rcode)) + tc


def client_text(ip: bytes, port: int) -> str:
    if len(ip) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, ip)}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, ip)}]:{port}"


class QueryLog:
    """Rate-limited query lines. `written` and `suppressed` count lines logged and withheld."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = float(rate)
        self._tokens = float(rate)
        self._clock = clock
        self._stamp = clock()
        self._pending = 0
        self.written = 0
        self.suppressed = 0

    def record(self, ip: bytes, port: int, proto: str, response: bytes, started: float) -> None:
        """Log one response to the client at (`ip`, `port`); `started` is when its query was read
        (`time.perf_counter()`)."""
        duration = time.perf_counter() - started
        now = self._clock()
        tokens = min(self._rate, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens < 1.0:
            self._tokens = tokens
            self._pending += 1
            self.suppressed += 1
            return
        self._tokens = tokens - 1.0
        if self._pending:
            log.info(
                "query log: %d lines suppressed (over %g per second)",
                self._pending,
                self._rate,
                extra={"prelimited": True},
            )
            self._pending = 0
        name, qtype, rcode = describe(response)
        client = client_text(ip, port)
        ms = round(duration * 1000, 3)
        self.written += 1
        log.info(
            "query client=%s proto=%s name=%s type=%s rcode=%s duration_ms=%.3f",
            client,
            proto,
            name,
            qtype,
            rcode,
            ms,
            extra={
                "prelimited": True,
                "client": client,
                "proto": proto,
                "qname": name,
                "qtype": qtype,
                "rcode": rcode,
                "duration_ms": ms,
            },
        )
