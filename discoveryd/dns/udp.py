"""UDP serving: read every ready datagram per wake-up, answer from the read callback.

Data flow: the event loop calls `readable()` when the socket has datagrams.
Each batch starts with `Answerer.fast_path()` (the answers cannot change within
a batch: index changes are applied by the server's sync task between batches);
each datagram goes to those cache lookups (no parsing): first by
its bytes after the ID (a repeated query), then by its question; on a miss
the peer address is decoded and the packet goes to `Answerer.answer`, which
may return a forwarding job's reply later through `send`. With a `Limit`
(RRL on), each answer of ours (not forwarded replies) is first checked
against the client's packed address: passed, dropped, or sent truncated.
With a `Gate` (the query log on), each reply passes through it, and the
repeated-query shortcut is skipped.

On Linux, `MmsgSocket` moves up to 64 datagrams per system call each way
(recvmmsg/sendmmsg through ctypes, with buffers allocated once and read and
written through integer views of the C structures); elsewhere, or if libc
lacks those calls, `PlainSocket` uses recvfrom/sendto. Both drop a reply the
socket buffer cannot take right now, as the network might: the client
retries.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from discoveryd.dns.metrics import DnsMetrics
from discoveryd.dns.rrl import DROP, SLIP, truncated

BATCH = 64
"""Datagrams per recvmmsg/sendmmsg call (and per wake-up for the plain socket)."""
_RECV_SIZE = 4096
"""Largest query accepted over UDP; longer datagrams are dropped."""
_SEND_SIZE = 2048
"""Reply slot size; UDP replies are at most 1232 bytes, larger ones go out with sendto."""
_NAME_SIZE = 28
"""sizeof(struct sockaddr_in6), enough for either family."""
_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20


Lookup = Callable[[bytes, bool], bytes | None]


class Answerer(Protocol):
    def fast_path(self) -> tuple[Lookup, Lookup]:
        """The cache lookups for this batch (the answers they read stay fixed during a batch).

        Both take (bytes, tcp), return the cached reply or None, and never raise: the first
        takes and returns the bytes after the ID of a repeated query, the second whole packets.
        """

    def answer(self, data: bytes, client: Any, send: Callable[[bytes], None]) -> bytes | None:
        """The reply to a UDP query from `client` (an address tuple), or None (dropped, or sent later via `send`)."""


class Gate(Protocol):
    def __call__(self, response: bytes, ip: bytes, port: int, started: float, local: bool) -> bytes | None:
        """What to send for `response` to the client at packed `ip`, `port` (the query log sees it
        here): itself, or None (withheld). `started`: `time.perf_counter()` when the query was read;
        `local`: an answer of ours, not a forwarded reply. Never raises."""


Limit = Callable[[bytes], int]
"""Rate limiting (`rrl.RateLimiter.verdict`): for an answer of ours to packed `ip`, PASS, DROP or SLIP."""


class PlainSocket:
    """recvfrom/sendto, one datagram per call."""

    def __init__(
        self,
        sock: socket.socket,
        answerer: Answerer,
        metrics: DnsMetrics,
        gate: Gate | None = None,
        limit: Limit | None = None,
    ) -> None:
        self._metrics = metrics
        self._sock = sock
        self._answerer = answerer
        self._gate = gate
        self._limit = limit

    def readable(self) -> None:
        sock, (_, fast), answer, gate = self._sock, self._answerer.fast_path(), self._answerer.answer, self._gate
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(0xFFFF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP errors for earlier replies (client gone)
            started = time.perf_counter() if gate is not None else 0.0
            ip = socket.inet_pton(sock.family, addr[0].partition("%")[0]) if gate or self._limit else b""
            out = fast(data, False)
            if out is None:
                if gate is None:
                    send = _sender(sock, addr, self._metrics)
                else:
                    send = _gated_sender(sock, addr, self._metrics, gate, ip, addr[1], started)
                out = answer(data, addr, send)
                if out is None:
                    continue
            if self._limit is not None:
                verdict = self._limit(ip)
                if verdict:
                    out = truncated(out) if verdict == SLIP else None
                    if out is None:
                        continue
            if gate is not None:
                out = gate(out, ip, addr[1], started, True)
                if out is not None:
                    _sendto(sock, out, addr, self._metrics)
            else:
                _sendto(sock, out, addr, self._metrics)


def _sendto(sock: socket.socket, out: bytes, addr: Any, metrics: DnsMetrics) -> None:
    try:
        sock.sendto(out, addr)
    except OSError:
        metrics.dropped.labels("udp_send").inc()


def _sender(sock: socket.socket, addr: Any, metrics: DnsMetrics) -> Callable[[bytes], None]:
    return lambda out: _sendto(sock, out, addr, metrics)


def _gated_sender(
    sock: socket.socket, addr: Any, metrics: DnsMetrics, gate: Gate, ip: bytes, port: int, started: float
) -> Callable[[bytes], None]:
    """The `send` for a forwarded reply: through `gate` (logged, not rate limited)."""

    def send(out: bytes) -> None:
        passed = gate(out, ip, port, started, False)
        if passed is not None:
            _sendto(sock, passed, addr, metrics)

    return send


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_WORD, _PTR = ctypes.sizeof(ctypes.c_uint), ctypes.sizeof(ctypes.c_size_t)
_WORDS = ctypes.sizeof(_Mmsghdr) // _WORD
"""An mmsghdr in 32-bit words; the fields below are word (or pointer) indexes into one."""
_NAMELEN_WORD = _Msghdr.namelen.offset // _WORD
_FLAGS_WORD = _Msghdr.flags.offset // _WORD
_LEN_WORD = _Mmsghdr.len.offset // _WORD
_PTRS = ctypes.sizeof(_Mmsghdr) // _PTR
"""An mmsghdr in pointer-sized words; msg_name is the first."""
_IOV_WORDS = ctypes.sizeof(_Iovec) // _PTR
assert _Iovec.len.offset == _PTR and ctypes.sizeof(ctypes.c_void_p) == _PTR


def _libc_mmsg() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    return recv, send


_MMSG = _libc_mmsg()


class MmsgSocket:
    """recvmmsg/sendmmsg with fixed buffers: `BATCH` receive slots, `BATCH` reply slots.

    Reply slot i is set up once to go to the sender in receive slot i and to carry
    the bytes of send buffer slot i; when a datagram gets no reply (forwarded,
    dropped) the later replies move down a slot and take their sender's address
    with them, which is undone at the start of the next batch. A cache hit never
    builds a Python address tuple.
    """

    def __init__(
        self,
        sock: socket.socket,
        answerer: Answerer,
        metrics: DnsMetrics,
        gate: Gate | None = None,
        limit: Limit | None = None,
    ) -> None:
        assert _MMSG is not None
        self._metrics = metrics
        self._gate = gate
        self._limit = limit
        self._ip_at, self._ip_len = (8, 16) if sock.family == socket.AF_INET6 else (4, 4)
        self._recvmmsg, self._sendmmsg = _MMSG
        self._sock = sock
        self._fd = sock.fileno()
        self._answerer = answerer
        self._family = sock.family
        # The kernel fills in a sockaddr of the socket's family, always of the same length.
        self._namelen = _NAME_SIZE if sock.family == socket.AF_INET6 else 16
        self._rbuf = ctypes.create_string_buffer(BATCH * _RECV_SIZE)
        self._sbuf = ctypes.create_string_buffer(BATCH * _SEND_SIZE)
        self._names = ctypes.create_string_buffer(BATCH * _NAME_SIZE)
        self._riov = (_Iovec * BATCH)()
        self._siov = (_Iovec * BATCH)()
        self._rmsgs = (_Mmsghdr * BATCH)()
        self._smsgs = (_Mmsghdr * BATCH)()
        rbase, sbase = ctypes.addressof(self._rbuf), ctypes.addressof(self._sbuf)
        self._name_at = [ctypes.addressof(self._names) + i * _NAME_SIZE for i in range(BATCH)]
        for i in range(BATCH):
            self._riov[i].base, self._riov[i].len = rbase + i * _RECV_SIZE, _RECV_SIZE
            hdr = self._rmsgs[i].hdr
            hdr.name, hdr.namelen = self._name_at[i], _NAME_SIZE
            hdr.iov, hdr.iovlen = ctypes.addressof(self._riov[i]), 1
            self._siov[i].base = sbase + i * _SEND_SIZE
            out = self._smsgs[i].hdr
            out.name, out.namelen = self._name_at[i], self._namelen
            out.iov, out.iovlen = ctypes.addressof(self._siov[i]), 1
        # Integer views: mmsghdr fields as 32-bit words (flags, lengths) and 64-bit words (the
        # reply's address pointer), iovec lengths as pointer-sized words.
        self._r32 = memoryview(self._rmsgs).cast("B").cast("I")
        self._s_ptr = memoryview(self._smsgs).cast("B").cast("P")
        self._siov_n = memoryview(self._siov).cast("B").cast("P")
        self._rdata = memoryview(self._rbuf).cast("B")
        self._sdata = memoryview(self._sbuf).cast("B")
        self._names_view = memoryview(self._names).cast("B")
        self._moved: list[int] = []
        self._used = BATCH

    def readable(self) -> None:
        while self._batch() == BATCH:
            pass

    def _batch(self) -> int:
        r32 = self._r32
        for i in range(self._used):
            r32[i * _WORDS + _NAMELEN_WORD] = _NAME_SIZE
        n = int(self._recvmmsg(self._fd, self._rmsgs, BATCH, _MSG_DONTWAIT, None))
        if n <= 0:
            self._used = 0
            return 0
        self._used = n
        s_ptr, name_at = self._s_ptr, self._name_at
        for slot in self._moved:
            s_ptr[slot * _PTRS] = name_at[slot]
        self._moved.clear()
        repeated, fast = self._answerer.fast_path()
        # A c_char array slices to bytes in one step (typeshed has it return a list).
        rbuf, rdata, sdata, siov_n = cast(bytes, self._rbuf), self._rdata, self._sdata, self._siov_n
        gate, limit = self._gate, self._limit
        replies = 0
        for i in range(n):
            word = i * _WORDS
            size = r32[word + _LEN_WORD]
            if r32[word + _FLAGS_WORD] & _MSG_TRUNC:
                self._metrics.dropped.labels("oversized").inc()
                self._metrics.malformed.labels("oversized").inc()
                continue
            start = i * _RECV_SIZE
            slot = replies * _SEND_SIZE
            body = repeated(rbuf[start + 2 : start + size], False) if size > 2 and gate is None else None
            out = None
            if body is not None and limit is not None:
                verdict = limit(self._ip(i))
                if verdict:
                    if verdict == DROP:
                        continue
                    out, body = truncated(rbuf[start : start + 2] + body), None
                    if out is None:
                        continue
            if body is not None:
                length = len(body) + 2
                sdata[slot] = rdata[start]
                sdata[slot + 1] = rdata[start + 1]
                sdata[slot + 2 : slot + length] = body
            else:
                if out is None:
                    data = rbuf[start : start + size]
                    started = time.perf_counter() if gate is not None else 0.0
                    out = fast(data, False)
                    if out is None:
                        addr = self._address(i, r32[word + _NAMELEN_WORD])
                        if gate is None:
                            send = _sender(self._sock, addr, self._metrics)
                        else:
                            send = _gated_sender(self._sock, addr, self._metrics, gate, *self._peer(i), started)
                        out = self._answerer.answer(data, addr, send)
                        if out is None:
                            continue
                    if limit is not None:
                        verdict = limit(self._ip(i))
                        if verdict:
                            out = truncated(out) if verdict == SLIP else None
                            if out is None:
                                continue
                    if gate is not None:
                        out = gate(out, *self._peer(i), started, True)
                        if out is None:
                            continue
                length = len(out)
                if length > _SEND_SIZE:
                    _sendto(self._sock, out, self._address(i, r32[word + _NAMELEN_WORD]), self._metrics)
                    continue
                sdata[slot : slot + length] = out
            siov_n[replies * _IOV_WORDS + 1] = length
            if replies != i:
                s_ptr[replies * _PTRS] = name_at[i]
                self._moved.append(replies)
            replies += 1
        if replies:
            sent = int(self._sendmmsg(self._fd, self._smsgs, replies, _MSG_DONTWAIT))
            if sent < replies:
                self._metrics.dropped.labels("udp_send").inc(replies - max(sent, 0))
        return n

    def _ip(self, i: int) -> bytes:
        """The packed address of receive slot `i`'s sender."""
        start = i * _NAME_SIZE + self._ip_at
        return bytes(self._names_view[start : start + self._ip_len])

    def _peer(self, i: int) -> tuple[bytes, int]:
        """The packed address and the port of receive slot `i`'s sender."""
        start, view = i * _NAME_SIZE, self._names_view
        port = view[start + 2] << 8 | view[start + 3]
        if self._family == socket.AF_INET6:
            return bytes(view[start + 8 : start + 24]), port
        return bytes(view[start + 4 : start + 8]), port

    def _address(self, i: int, namelen: int) -> Any:
        """The peer of receive slot `i` as a socket address tuple."""
        start = i * _NAME_SIZE
        raw = bytes(self._names_view[start : start + namelen])
        port = int.from_bytes(raw[2:4], "big")
        if self._family == socket.AF_INET6:
            return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, 0, int.from_bytes(raw[24:28], sys.byteorder))
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def reader(
    sock: socket.socket, answerer: Answerer, metrics: DnsMetrics, gate: Gate | None = None, limit: Limit | None = None
) -> PlainSocket | MmsgSocket:
    """The fastest UDP reader this platform supports for `sock`; our answers through `limit`, every
    reply through `gate`, when given."""
    if _MMSG is not None:
        return MmsgSocket(sock, answerer, metrics, gate, limit)
    return PlainSocket(sock, answerer, metrics, gate, limit)
