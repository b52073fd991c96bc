"""Response rate limiting (RRL) for UDP answers, per source prefix, with slip to TC like Knot's.

Data flow: with `dns.rrl.responses_per_second` above 0, the UDP reader
passes each response it is about to send for an authoritative or local
answer (not forwarded replies) to `RateLimiter.check()` with the client's
packed address. The address is cut to its prefix (`ipv4_prefix`,
`ipv6_prefix`: /24 and /56 by default) and hashed into a fixed table of
`table_size` token buckets (colliding prefixes share a bucket, as in Knot:
memory stays fixed whatever the number of sources). Each bucket refills at
`responses_per_second` up to one second's worth. A response over the rate
is dropped, except every `slip`-th one, which goes out truncated (TC set,
question only), so that a legitimate client behind a spoofed-against prefix
still gets through over TCP. `slip: 0` drops them all.

Used from the event loop only; the answer cost with RRL off is one `None`
check per datagram in the reader.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RrlSettings:
    responses_per_second: float
    slip: int = 1
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    table_size: int = 65536


class RateLimiter:
    """Token buckets keyed by source prefix. `limited`/`slipped` count responses withheld and truncated."""

    def __init__(self, settings: RrlSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = float(settings.responses_per_second)
        self._slip = settings.slip
        self._shift4 = 32 - settings.ipv4_prefix
        self._shift6 = 128 - settings.ipv6_prefix
        size = 1
        while size < settings.table_size:
            size <<= 1
        self._mask = size - 1
        self._tokens = [self._rate] * size
        self._stamp = [0.0] * size
        self._slips = 0
        self._clock = clock
        self.limited = 0
        self.slipped = 0

    def bucket(self, ip: bytes) -> int:
        """The table slot of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address's prefix."""
        if len(ip) == 4:
            return hash((4, int.from_bytes(ip, "big") >> self._shift4)) & self._mask
        return hash((6, int.from_bytes(ip, "big") >> self._shift6)) & self._mask

    def check(self, response: bytes, ip: bytes) -> bytes | None:
        """`response` if the prefix of `ip` is within its rate; else its slip (truncated) or None (dropped)."""
        i = self.bucket(ip)
        now = self._clock()
        rate = self._rate
        tokens = self._tokens[i] + (now - self._stamp[i]) * rate
        if tokens > rate:
            tokens = rate
        self._stamp[i] = now
        if tokens >= 1.0:
            self._tokens[i] = tokens - 1.0
            return response
        self._tokens[i] = tokens
        self.limited += 1
        if self._slip:
            self._slips += 1
            if self._slips >= self._slip:
                self._slips = 0
                self.slipped += 1
                return truncated(response)
        return None


def truncated(response: bytes) -> bytes | None:
    """`response` cut to its header and question with TC set (a slip); None if it has no readable question."""
    end = 12
    size = len(response)
    while end < size and response[end]:
        if response[end] & 0xC0:
            return None
        end += response[end] + 1
    end += 5
    if end > size:
        return None
    return (
        response[:2] + bytes((response[2] | 0x02, response[3])) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + response[12:end]
    )
