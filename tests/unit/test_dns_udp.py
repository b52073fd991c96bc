"""The UDP readers on a real loopback socket, driven by hand: every reply goes to its own sender, in batches
with gaps (queries dropped or answered later), repeated queries and replies too large for a send slot."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discoveryd.dns import udp
from discoveryd.dns.metrics import DnsMetrics


class _Echo:
    """Replies `ok:` + the query; a query starting with `drop` gets none, `later` is answered through `send`,
    `big` gets a reply larger than a send slot. Queries starting with `again` are answered by `repeated`."""

    def __init__(self) -> None:
        self.later: list[tuple[bytes, Callable[[bytes], None]]] = []
        self.repeated_calls = 0

    def fast_path(self) -> tuple[udp.Lookup, udp.Lookup]:
        return self._repeated, self._fast

    def _repeated(self, after_id: bytes, tcp: bool) -> bytes | None:
        if after_id.startswith(b"again"):
            self.repeated_calls += 1
            return b"ok:" + after_id
        return None

    def _fast(self, data: bytes, tcp: bool) -> bytes | None:
        return None

    def answer(self, data: bytes, client: Any, send: Callable[[bytes], None]) -> bytes | None:
        body = data[2:]
        if body.startswith(b"drop"):
            return None
        if body.startswith(b"later"):
            self.later.append((data, send))
            return None
        if body.startswith(b"big"):
            return data[:2] + b"ok:" + body + b"x" * 3000
        return data[:2] + b"ok:" + body


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def _kind(n: int) -> bytes:
    return [b"plain", b"drop", b"again", b"later", b"plain", b"big", b"again"][n % 7]


class _Gate:
    """Passes every reply, noting who it went to and whether it was local."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes, int, bool]] = []

    def __call__(self, response: bytes, ip: bytes, port: int, started: float, local: bool) -> bytes | None:
        self.seen.append((response, ip, port, local))
        return response


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("reader", ["mmsg", "plain"])
def test_every_reply_goes_to_its_sender_across_batches_with_gaps(
    server: socket.socket, clients: list[socket.socket], reader: str, gated: bool
) -> None:
    if reader == "mmsg" and udp._MMSG is None:
        pytest.skip("recvmmsg/sendmmsg not available")
    answerer = _Echo()
    gate = _Gate() if gated else None
    kind = udp.MmsgSocket if reader == "mmsg" else udp.PlainSocket
    handler = kind(server, answerer, DnsMetrics(), gate)
    sent: dict[int, list[bytes]] = {i: [] for i in range(len(clients))}
    total = udp.BATCH * 2 + 17
    for n in range(total):
        c = n % len(clients)
        payload = n.to_bytes(2, "big") + _kind(n) + b"-%d" % n
        clients[c].sendto(payload, server.getsockname())
        sent[c].append(payload)
    # Loopback delivers on sendto: every datagram is queued before the reader runs.
    for _ in range(total // udp.BATCH + 2):
        handler.readable()
    for data, send in answerer.later:
        send(data[:2] + b"ok:" + data[2:])
    for c, payloads in sent.items():
        expected = {p[:2] + b"ok:" + p[2:] for p in payloads if not p[2:].startswith(b"drop")}
        got = [clients[c].recv(4096) for _ in expected]
        assert {g.rstrip(b"x") if g[2:].startswith(b"ok:big") else g for g in got} == expected, f"client {c}"
        assert all(len(g) > udp._SEND_SIZE for g in got if g[2:].startswith(b"ok:big"))
    if gate is not None:
        ports = {c.getsockname()[1] for c in clients}
        assert {(ip, port in ports) for _, ip, port, _ in gate.seen} == {(socket.inet_aton("127.0.0.1"), True)}
        by_port = {c.getsockname()[1]: c for c in clients}
        for response, _, port, _ in gate.seen:  # each reply was gated for the client that sent its query
            n = int(response.split(b"-")[-1].rstrip(b"x"))
            assert by_port[port] is clients[n % len(clients)]
        later = sum(1 for n in range(total) if _kind(n) == b"later")
        assert sum(1 for *_, local in gate.seen if not local) == later
    elif reader == "mmsg":
        assert answerer.repeated_calls == sum(1 for n in range(total) if _kind(n) == b"again")
