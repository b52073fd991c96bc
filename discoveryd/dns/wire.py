"""Reading the question of a plain query straight from the packet, without a DNS library.

`scan()` accepts only the common shape: a query (QR=0, opcode QUERY) with one
uncompressed question, no answer or authority records, and at most one
additional record that is an EDNS version 0 OPT at the root, ending exactly at
the end of the packet. Anything else returns None and takes the full parse.
It returns where the question name ends and the answer cache sub-key
(`subkey()`), so that a cache hit needs no further decoding.
"""

from __future__ import annotations

MAX_UDP = 1232
"""The UDP payload size we advertise and never exceed (DNS flag day 2020)."""

_NO_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_ONE_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"


def subkey(qtype: int, qclass: int, limit: int, do: bool) -> int:
    """Answer cache key below the name: type, class, response size limit, DNSSEC OK."""
    return (qtype << 34) | (qclass << 18) | (limit << 1) | int(do)


def scan(data: bytes, tcp: bool) -> tuple[int, int] | None:
    """(end of the question name, `subkey`) of a plain query, or None."""
    n = len(data)
    if n < 17 or data[2] & 0xF8:
        return None
    counts = data[4:12]
    if counts != _NO_OPT and counts != _ONE_OPT:
        return None
    i = 12
    length = data[i]
    while length:
        if length > 63:
            return None
        i += length + 1
        if i >= n:
            return None
        length = data[i]
    qend = i + 1
    fixed = qend + 4
    if fixed > n:
        return None
    qtype = (data[qend] << 8) | data[qend + 1]
    qclass = (data[qend + 2] << 8) | data[qend + 3]
    if counts == _NO_OPT:
        if fixed != n:
            return None
        return qend, subkey(qtype, qclass, 0xFFFF if tcp else 512, False)
    # OPT: root name, type 41, class = UDP size, TTL = ext-rcode, version, flags; rdlength; options.
    if fixed + 11 > n or data[fixed] or data[fixed + 1] or data[fixed + 2] != 41 or data[fixed + 6]:
        return None
    if fixed + 11 + ((data[fixed + 9] << 8) | data[fixed + 10]) != n:
        return None
    if tcp:
        limit = 0xFFFF
    else:
        limit = (data[fixed + 3] << 8) | data[fixed + 4]
        limit = 512 if limit < 512 else MAX_UDP if limit > MAX_UDP else limit
    return qend, subkey(qtype, qclass, limit, bool(data[fixed + 7] & 0x80))
