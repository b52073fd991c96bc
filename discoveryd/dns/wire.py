"""Reading queries straight from the packet, without a DNS library.

`scan()` accepts only the common shape: a query (QR=0, opcode QUERY) with one
uncompressed question, no answer or authority records, and at most one
additional record that is an EDNS version 0 OPT at the root, ending exactly at
the end of the packet. Anything else returns None and takes the full parse.
It returns where the question name ends and the answer cache sub-key
(`subkey()`), so that a cache hit needs no further decoding.

`parse()` reads any other query: header, question (labels kept as raw bytes,
so that every legal label works), and the OPT record if any; the server
applies the protocol rules to the result.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from discoveryd.dns.message import MAX_UDP

_NO_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_ONE_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"


def cache_limit(limit: int) -> int:
    """The response size limit an answer is built (and cached) for: 512, 1024 or 1232 over UDP,
    whatever the client advertised in between, so that one name has at most three UDP sizes."""
    return MAX_UDP if limit >= MAX_UDP else 1024 if limit >= 1024 else 512


def subkey(qtype: int, qclass: int, limit: int, do: bool, edns: bool) -> int:
    """Answer cache key below the name: what changes the answer besides the name. Type, class,
    response size limit (`cache_limit`), whether the query had an OPT record, DNSSEC OK."""
    return (qtype << 35) | (qclass << 19) | (limit << 2) | (int(edns) << 1) | int(do)


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
        return qend, subkey(qtype, qclass, 0xFFFF if tcp else 512, False, False)
    # OPT: root name, type 41, class = UDP size, TTL = ext-rcode, version, flags; rdlength; options.
    if fixed + 11 > n or data[fixed] or data[fixed + 1] or data[fixed + 2] != 41 or data[fixed + 6]:
        return None
    rdlength = (data[fixed + 9] << 8) | data[fixed + 10]
    if fixed + 11 + rdlength != n or (rdlength and not options_ok(data, fixed + 11, n)):
        return None
    limit = 0xFFFF if tcp else cache_limit((data[fixed + 3] << 8) | data[fixed + 4])
    return qend, subkey(qtype, qclass, limit, bool(data[fixed + 7] & 0x80), True)


COOKIE = 10
"""EDNS option code of DNS cookies (RFC 7873)."""
NSID = 3
"""EDNS option code of the name server identifier (RFC 5001)."""


def option_value(data: bytes, start: int, end: int, code: int) -> bytes | None:
    """The data of the first EDNS option `code` in data[start:end], or None."""
    i = start
    while i + 4 <= end:
        length = (data[i + 2] << 8) | data[i + 3]
        if (data[i] << 8) | data[i + 1] == code:
            return data[i + 4 : i + 4 + length]
        i += 4 + length
    return None


def option_codes(data: bytes, start: int, end: int) -> set[int]:
    """The EDNS option codes present in data[start:end] (options as `options_ok` reads them)."""
    codes, i = set(), start
    while i + 4 <= end:
        codes.add((data[i] << 8) | data[i + 1])
        i += 4 + ((data[i + 2] << 8) | data[i + 3])
    return codes


def options_ok(data: bytes, start: int, end: int) -> bool:
    """The EDNS options in data[start:end] are well formed: each fits, and a COOKIE option is a
    client cookie (8 bytes) or a client and server cookie (16 to 40 bytes), RFC 7873 5.2.2."""
    i = start
    while i < end:
        if i + 4 > end:
            return False
        code = (data[i] << 8) | data[i + 1]
        length = (data[i + 2] << 8) | data[i + 3]
        i += 4 + length
        if i > end or (code == COOKIE and length != 8 and not 16 <= length <= 40):
            return False
    return True


class FormatError(ValueError):
    """The packet is not a well-formed DNS message (answered with FORMERR)."""


_MAX_RECORDS = 4
"""Records read besides the question (an OPT, a TSIG, ...): a query claiming more gets FORMERR unread."""


@dataclass(frozen=True, slots=True)
class Query:
    """What the server needs from a query that `scan()` declined, read by `parse()`."""

    qid: int
    flags: int
    """Bytes 2..3 of the header."""
    question: tuple[tuple[bytes, ...], int, int] | None
    """(labels as sent, type, class) when QDCOUNT is 1 and the counts are plausible."""
    opts: int
    """How many OPT records the additional section holds (0 when not read)."""
    udp_size: int = 512
    edns_version: int = 0
    do: bool = False
    read: bool = True
    """False when the header alone decided: QDCOUNT above 1 or more than `_MAX_RECORDS` records;
    nothing past the header was read (such a packet costs what garbage costs)."""
    cookie_ok: bool = True
    """Every COOKIE option (RFC 7873) has a legal length."""
    nsid: bool = False
    """The OPT record asks for the server's NSID (RFC 5001)."""
    cookie: bytes | None = None
    """The COOKIE option's data (client cookie, then the server cookie if any), when present."""

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def parse(data: bytes) -> Query:
    """Read a query's header, question and OPT record. Labels may hold any bytes (RFC 2181 11).

    The header decides first: QDCOUNT above 1, or more than `_MAX_RECORDS` other records, returns
    with `read` False without looking further. Raises FormatError for a message that cannot be read:
    short, a label or name too long, a compression pointer that does not point backwards, records
    running past the end.
    """
    if len(data) < 12:
        raise FormatError("shorter than a header")
    qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHH", data, 4)
    qid, flags = struct.unpack_from("!HH", data, 0)
    if qdcount > 1 or ancount + nscount + arcount > _MAX_RECORDS:
        return Query(qid, flags, None, 0, read=False)
    offset = 12
    question = None
    if qdcount:
        labels, offset = _name(data, offset)
        qtype, qclass = _unpack("!HH", data, offset)
        offset += 4
        question = (labels, qtype, qclass)
    for _ in range(ancount + nscount):
        offset = _skip_record(data, offset)
    opts, udp_size, version, do, cookie_ok, nsid = 0, 512, 0, False, True, False
    cookie: bytes | None = None
    for _ in range(arcount):
        labels, offset = _name(data, offset)
        rtype, rclass, ttl, rdlength = _unpack("!HHIH", data, offset)
        offset += 10 + rdlength
        if offset > len(data):
            raise FormatError("record data runs past the end")
        if rtype == _OPT:
            if labels:
                raise FormatError("OPT record not at the root")
            opts += 1
            if opts == 1:
                udp_size, version, do = rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000)
                cookie_ok = options_ok(data, offset - rdlength, offset)
                nsid = NSID in option_codes(data, offset - rdlength, offset)
                cookie = option_value(data, offset - rdlength, offset, COOKIE)
    return Query(qid, flags, question, opts, udp_size, version, do, cookie_ok=cookie_ok, nsid=nsid, cookie=cookie)


_OPT = 41
_MAX_NAME = 255
_MAX_POINTERS = 32


def _unpack(fmt: str, data: bytes, offset: int) -> tuple[int, ...]:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error:
        raise FormatError("message ends inside a record") from None


def _name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """The labels of the name at `offset` and the offset just after it (following compression pointers)."""
    labels: list[bytes] = []
    length = 1
    end = None
    pointers = 0
    while True:
        if offset >= len(data):
            raise FormatError("message ends inside a name")
        size = data[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise FormatError("message ends inside a compression pointer")
            target = ((size & 0x3F) << 8) | data[offset + 1]
            if end is None:
                end = offset + 2
            pointers += 1
            if target >= offset or pointers > _MAX_POINTERS:
                raise FormatError("compression pointer does not point backwards")
            offset = target
            continue
        if size & 0xC0:
            raise FormatError("unknown label type")
        offset += 1
        if size == 0:
            return tuple(labels), offset if end is None else end
        length += size + 1
        if length > _MAX_NAME or offset + size > len(data):
            raise FormatError("name too long or cut short")
        labels.append(data[offset : offset + size])
        offset += size


def _skip_record(data: bytes, offset: int) -> int:
    _, offset = _name(data, offset)
    (rdlength,) = _unpack("!H", data, offset + 8)
    offset += 10 + rdlength
    if offset > len(data):
        raise FormatError("record data runs past the end")
    return offset
