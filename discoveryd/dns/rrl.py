"""Response rate limiting (RRL) for UDP answers, per source prefix, with slip to TC like Knot's.

Data flow: with `dns.rrl.responses_per_second` above 0, the UDP reader asks
`RateLimiter.verdict()` about each answer of ours it is about to send (not
forwarded replies), with the client's packed address. The address is cut to its prefix (`ipv4_prefix`,
`ipv6_prefix`: /24 and /56 by default) and hashed into a fixed table of
`table_size` token buckets (colliding prefixes share a bucket, as in Knot:
memory stays fixed whatever the number of sources). Each bucket refills at
`responses_per_second` up to one second's worth. A response over the rate
is dropped, except every `slip`-th one, which goes out truncated (TC set,
question only), so that a legitimate client behind a spoofed-against prefix
still gets through over TCP. `slip: 0` drops them all.

Used from the event loop only; the answer cost with RRL off is one `None`
check per datagram in the reader; with it on, a dropped response costs no
copy, and a passed one keeps the reader's repeated-query shortcut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from discoveryd.dns.metrics import Tally


@dataclass(frozen=True, slots=True)
class RrlSettings:
    responses_per_second: float
    slip: int = 1
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    table_size: int = 65536


PASS, DROP, SLIP = 0, 1, 2


class RateLimiter:
    """Token buckets keyed by source prefix."""

    def __init__(
        self,
        settings: RrlSettings,
        clock: Callable[[], float] = time.monotonic,
        dropped: Tally | None = None,
        slipped: Tally | None = None,
    ) -> None:
        """`dropped`, `slipped`: where to count withheld and truncated responses (the server's metrics)."""
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
        # Whole-byte prefixes key on the address bytes themselves (cheaper than shifting an int).
        self._bytes4 = settings.ipv4_prefix // 8 if settings.ipv4_prefix % 8 == 0 else 0
        self._bytes6 = settings.ipv6_prefix // 8 if settings.ipv6_prefix % 8 == 0 else 0
        self.dropped = dropped if dropped is not None else Tally()
        self.slipped = slipped if slipped is not None else Tally()

    def bucket(self, ip: bytes) -> int:
        """The table slot of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address's prefix."""
        if len(ip) == 4:
            if self._bytes4:
                return hash(ip[: self._bytes4]) & self._mask
            return hash(int.from_bytes(ip, "big") >> self._shift4) & self._mask
        if self._bytes6:
            return hash(ip[: self._bytes6]) & self._mask
        return hash((6, int.from_bytes(ip, "big") >> self._shift6)) & self._mask

    def verdict(self, ip: bytes) -> int:
        """PASS if the prefix of `ip` is within its rate (taking a token), else SLIP (send the
        response truncated) for every `slip`-th limited response, else DROP."""
        i = self.bucket(ip)
        now = self._clock()
        rate = self._rate
        tokens = self._tokens[i] + (now - self._stamp[i]) * rate
        if tokens > rate:
            tokens = rate
        self._stamp[i] = now
        if tokens >= 1.0:
            self._tokens[i] = tokens - 1.0
            return PASS
        self._tokens[i] = tokens
        if self._slip:
            self._slips += 1
            if self._slips >= self._slip:
                self._slips = 0
                self.slipped.n += 1
                return SLIP
        self.dropped.n += 1
        return DROP

    def check(self, response: bytes, ip: bytes) -> bytes | None:
        """`verdict()` applied to `response`: itself, its slip, or None."""
        verdict = self.verdict(ip)
        if verdict == PASS:
            return response
        return truncated(response) if verdict == SLIP else None


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
