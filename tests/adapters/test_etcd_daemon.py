"""End to end: the real `discoveryd run` with an etcd registry: DNS answers and /debug/registryz for etcd keys."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.etcd import EtcdServer, etcd
from tests.helpers import eventually, free_port, wait_sync

__all__ = ["etcd"]  # the session fixture, imported to be found by pytest

pytestmark = pytest.mark.integration


class _Daemon:
    def __init__(self, tmp: Path, etcd_url: str, prefix: str) -> None:
        self.admin, self.xds, self.dns = free_port(), free_port(), free_port()
        self.config = tmp / "discoveryd.yaml"
        self.config.write_text(
            "registries:\n"
            "  - kind: etcd\n"
            "    name: main\n"
            f"    endpoints: [{etcd_url}]\n"
            f"    prefix: {prefix}\n"
            "    domain: mesh.local\n"
            f"xds:\n  listen: 127.0.0.1:{self.xds}\n"
            f"dns:\n  listen: [127.0.0.1:{self.dns}]\n"
            f"admin:\n  listen: 127.0.0.1:{self.admin}\n"
        )
        self.log = tmp / "discoveryd.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"discoveryd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def registry(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/debug/registryz", timeout=5) as reply:
            doc: dict[str, Any] = json.load(reply)
        return dict(doc["registries"]["etcd/main"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def daemon(etcd: EtcdServer, tmp_path: Path) -> Iterator[_Daemon]:
    d = _Daemon(tmp_path, etcd.url, f"/e2e-{uuid.uuid4().hex[:12]}/")
    try:
        wait_sync(d.ready, timeout=30, what="discoveryd ready")
        yield d
    finally:
        d.stop()


async def _ask(port: int, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[int, set[str]]:
    query = dns.message.make_query(name, rdtype)
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=2)
    return reply.rcode(), {rd.to_text() for rrset in reply.answer if rrset.rdtype == rdtype for rd in rrset}


async def test_registered_endpoint_is_answered_and_withdrawn(daemon: _Daemon, etcd: EtcdServer) -> None:
    prefix = daemon.config.read_text().split("prefix: ", 1)[1].split("\n", 1)[0]
    value = json.dumps({"Op": 0, "Addr": "10.20.0.1:8080", "Metadata": {"protocol": "grpc"}}).encode()
    async with aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=10) as client:
        await client.put(f"{prefix}checkout/1".encode(), value)

        async def answered() -> bool:
            return bool((await _ask(daemon.dns, "checkout.mesh.local.", dns.rdatatype.A))[1])

        await eventually(answered, timeout=15, what="A record")
        assert await _ask(daemon.dns, "checkout.mesh.local.", dns.rdatatype.A) == (dns.rcode.NOERROR, {"10.20.0.1"})
        rcode, srv = await _ask(daemon.dns, "_grpc._tcp.checkout.mesh.local.", dns.rdatatype.SRV)
        assert rcode == dns.rcode.NOERROR and len(srv) == 1 and next(iter(srv)).split()[2] == "8080"

        await client.delete(f"{prefix}checkout/1".encode())

        async def gone() -> bool:
            rcode, _ = await _ask(daemon.dns, "checkout.mesh.local.", dns.rdatatype.A)
            return bool(rcode == dns.rcode.NXDOMAIN)

        await eventually(gone, timeout=15, what="name withdrawn")


def test_bad_value_shows_in_registryz_by_key(daemon: _Daemon, etcd: EtcdServer) -> None:
    prefix = daemon.config.read_text().split("prefix: ", 1)[1].split("\n", 1)[0]
    key = f"{prefix}billing/1"
    subprocess.run(
        [str(Path(sys.executable).parent / "etcdctl"), f"--endpoints={etcd.url}", "put", key, '{"Addr": "nowhere"}'],
        check=True,
        capture_output=True,
        timeout=30,
    )
    problems = wait_sync(lambda: daemon.registry()["problems"], timeout=15, what="problem in /debug/registryz")
    assert problems == [
        {"where": key, "field": "Addr", "message": "expected ip:port, got 'nowhere'", "severity": "error"}
    ]
    assert daemon.registry()["synced"] and not daemon.registry()["stale"]
