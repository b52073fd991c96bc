"""Writing DNS messages: record types, rdata values, and the response packer (RFC 1035 4.1, RFC 6891).

Data flow: `records` builds rdata values once per snapshot change (`bytes`
for fixed-form data, `Named` and `Soa` for data holding domain names);
`answer` and `forward` put them in `RR`s and call `pack()`, which writes the
header, the question, the three sections and an OPT record into one buffer.

Names are compressed (RFC 1035 4.1.4) against every name already written,
by exact label bytes: the question name is written first, at offset 12, so
an owner name equal to the question becomes a pointer to it and takes the
query's case when the question is patched. SRV targets are never compressed
(RFC 2782); rdata given as `bytes` is written as it is.

Size: `pack()` keeps the response within `limit` by dropping the additional
section (not a truncation, RFC 2181 9), else by sending the header, the
question and the OPT record with TC set.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, DS = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 43
SVCB, HTTPS, IXFR, AXFR, ANY = 64, 65, 251, 252, 255

TYPE_NAMES = {
    A: "A",
    NS: "NS",
    CNAME: "CNAME",
    SOA: "SOA",
    PTR: "PTR",
    MX: "MX",
    TXT: "TXT",
    AAAA: "AAAA",
    SRV: "SRV",
    OPT: "OPT",
    DS: "DS",
    SVCB: "SVCB",
    HTTPS: "HTTPS",
    IXFR: "IXFR",
    AXFR: "AXFR",
    ANY: "ANY",
}

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {
    NOERROR: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}

CLASS_IN = 1
MAX_UDP = 1232
"""The UDP payload size we advertise and never exceed (DNS flag day 2020)."""

_QR, _AA, _TC, _RD, _RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
_POINTER_LIMIT = 0x4000
"""Compression pointers have 14 bits: names written past this offset are not pointed at."""


@dataclass(frozen=True, slots=True)
class Named:
    """Rdata of fixed bytes followed by one domain name: CNAME, PTR, NS (`prefix` empty) or SRV
    (`prefix` holds priority, weight and port). `target` is dotted, without the trailing dot."""

    prefix: bytes
    target: str


@dataclass(frozen=True, slots=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int


Rdata = bytes | Named | Soa
"""`bytes` is the rdata exactly as it goes on the wire (A, AAAA, TXT, or anything opaque)."""


class RR(NamedTuple):
    owner: tuple[bytes, ...]
    rtype: int
    ttl: int
    rdata: Rdata
    rclass: int = CLASS_IN


def labels(name: str) -> tuple[bytes, ...]:
    """A dotted name as wire labels (`""` is the root)."""
    return tuple(name.encode("ascii", "replace").split(b".")) if name else ()


def srv(priority: int, weight: int, port: int, target: str) -> Named:
    return Named(((priority << 32) | (weight << 16) | port).to_bytes(6, "big"), target)


def txt(*strings: bytes) -> bytes:
    """TXT rdata: each string (at most 255 bytes) with its length byte."""
    return b"".join(bytes((len(s),)) + s for s in strings)


def opt_record(do: bool, rcode: int = NOERROR) -> bytes:
    """Our OPT record: root owner, our UDP size, the upper rcode bits, version 0, the client's DO bit."""
    return b"\x00\x00\x29" + MAX_UDP.to_bytes(2, "big") + bytes((rcode >> 4, 0, 0x80 if do else 0, 0, 0, 0))


def header_flags(rcode: int, *, aa: bool = False, tc: bool = False, rd: bool = False, ra: bool = False) -> int:
    """Bytes 2..3 of a response header with opcode QUERY."""
    return _QR | (_AA if aa else 0) | (_TC if tc else 0) | (_RD if rd else 0) | (_RA if ra else 0) | (rcode & 0xF)


class _Writer:
    """One message being written, with the offsets of every name suffix written so far."""

    __slots__ = ("buf", "names")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.names: dict[tuple[bytes, ...], int] = {}

    def name(self, name: tuple[bytes, ...], compress: bool = True) -> None:
        buf, names = self.buf, self.names
        for i in range(len(name)):
            suffix = name[i:]
            if compress:
                at = names.get(suffix)
                if at is not None:
                    buf += (0xC000 | at).to_bytes(2, "big")
                    return
            pos = len(buf)
            if pos < _POINTER_LIMIT and suffix not in names:
                names[suffix] = pos
            part = name[i]
            buf.append(len(part))
            buf += part
        buf.append(0)

    def record(self, rr: RR) -> None:
        buf = self.buf
        self.name(rr.owner)
        rdata = rr.rdata
        buf += ((rr.rtype << 48) | (rr.rclass << 32) | (rr.ttl & 0xFFFFFFFF)).to_bytes(8, "big")
        if type(rdata) is bytes:
            buf += len(rdata).to_bytes(2, "big")
            buf += rdata
            return
        start = len(buf)
        buf += b"\x00\x00"
        if isinstance(rdata, Named):
            buf += rdata.prefix
            self.name(labels(rdata.target), rr.rtype != SRV)
        elif isinstance(rdata, Soa):
            self.name(labels(rdata.mname))
            self.name(labels(rdata.rname))
            for value in (rdata.serial, rdata.refresh, rdata.retry, rdata.expire, rdata.minimum):
                buf += (value & 0xFFFFFFFF).to_bytes(4, "big")
        buf[start : start + 2] = (len(buf) - start - 2).to_bytes(2, "big")


def pack(
    qid: int,
    flags: int,
    question: tuple[Sequence[bytes], int, int] | None,
    answer: Sequence[RR] = (),
    authority: Sequence[RR] = (),
    additional: Sequence[RR] = (),
    opt: bytes | None = None,
    limit: int = 0xFFFF,
) -> bytes:
    """The message with header bytes 2..3 `flags`, within `limit` bytes (TC set when the answer does not fit)."""
    out = _pack(qid, flags, question, answer, authority, additional, opt)
    if len(out) <= limit:
        return out
    if additional:
        out = _pack(qid, flags, question, answer, authority, (), opt)
        if len(out) <= limit:
            return out
    return _pack(qid, flags | _TC, question, (), (), (), opt)


def _pack(
    qid: int,
    flags: int,
    question: tuple[Sequence[bytes], int, int] | None,
    answer: Sequence[RR],
    authority: Sequence[RR],
    additional: Sequence[RR],
    opt: bytes | None,
) -> bytes:
    w = _Writer()
    counts = (1 if question is not None else 0, len(answer), len(authority), len(additional) + (opt is not None))
    w.buf += struct.pack("!6H", qid, flags, *counts)
    if question is not None:
        qname, qtype, qclass = question
        w.name(tuple(qname), compress=False)
        w.buf += ((qtype << 16) | qclass).to_bytes(4, "big")
    for section in (answer, authority, additional):
        for rr in section:
            w.record(rr)
    if opt is not None:
        w.buf += opt
    return bytes(w.buf)
