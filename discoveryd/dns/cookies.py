"""DNS server cookies (RFC 7873, interoperable form of RFC 9018).

Data flow: the server hands `Cookies.server_cookie()` the client cookie and address of a query
that carried a COOKIE option; the result (version 1, reserved, timestamp, SipHash-2-4 of client
cookie | version | reserved | timestamp | client IP under the server secret) goes back in our
OPT record. A server cookie the client sends back is checked with `valid()`; this server does
not require cookies (no BADCOOKIE), so an invalid or missing one just gets a fresh one.

Replicas that share `dns.cookie_secret` accept each other's cookies (RFC 9018 4.4); without a
secret each process draws a random one at start.
"""

from __future__ import annotations

import ipaddress
import os
import time

_MASK = 0xFFFFFFFFFFFFFFFF
_LIFETIME = 3600
"""Seconds a server cookie stays valid (RFC 9018 4.3: one hour)."""
_FUTURE = 300
"""Seconds a timestamp may lie ahead of our clock (RFC 9018 4.3: five minutes)."""


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def siphash24(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 of `data` under a 16-byte `key`, as 8 bytes (little-endian, as the reference)."""
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _MASK
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _MASK
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _MASK
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _MASK
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        rounds(2)
        v0 ^= m
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= last
    rounds(2)
    v0 ^= last
    v2 ^= 0xFF
    rounds(4)
    return ((v0 ^ v1 ^ v2 ^ v3) & _MASK).to_bytes(8, "little")


class Cookies:
    """Server cookies under one secret. Owned by one `DnsServer`, used on its loop."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret: bytes = secret if secret is not None else os.urandom(16)
        if len(self._secret) != 16:
            raise ValueError("a cookie secret is 16 bytes")

    def _hash(self, client_cookie: bytes, head: bytes, client: str) -> bytes:
        try:
            ip = ipaddress.ip_address(client.partition("%")[0]).packed
        except ValueError:
            ip = b""
        return siphash24(self._secret, bytes(client_cookie) + head + bytes(ip))

    def server_cookie(self, client_cookie: bytes, client: str, now: float | None = None) -> bytes:
        """A fresh server cookie (16 bytes) for this client cookie and client address."""
        head = b"\x01\x00\x00\x00" + (int(now if now is not None else time.time()) & 0xFFFFFFFF).to_bytes(4, "big")
        return head + self._hash(client_cookie, head, client)

    def valid(self, client_cookie: bytes, server_cookie: bytes, client: str, now: float | None = None) -> bool:
        """Whether `server_cookie` is one of ours for this client, and neither expired nor from the future."""
        if len(server_cookie) != 16 or server_cookie[0] != 1:
            return False
        stamp = int.from_bytes(server_cookie[4:8], "big")
        age = (int(now if now is not None else time.time()) - stamp) & 0xFFFFFFFF
        if age > _LIFETIME and (0x100000000 - age) > _FUTURE:
            return False
        return self._hash(client_cookie, server_cookie[:8], client) == server_cookie[8:]
