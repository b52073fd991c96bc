"""The real `discoveryd run`: honest readiness with a dead registry, and warm restarts after kill -9.

Warm restart, end to end with the real etcd (behind a loopback proxy the test
can cut) and a files registry: the daemon syncs and saves its state; it is
killed with SIGKILL; etcd becomes unreachable; the daemon starts again. Its
first CDS response must already hold every cluster, and DNS must never
answer NXDOMAIN for a name that exists, at any time across the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2

from discoveryd import state
from discoveryd.xds.resources import CLUSTER
from tests.fakes.etcd import EtcdServer, TcpProxy, etcd
from tests.fakes.xds import Stream, names
from tests.helpers import eventually, free_port, wait_sync

__all__ = ["etcd"]  # the session fixture, imported to be found by pytest

pytestmark = pytest.mark.integration

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.example]
  ports:
    - {number: 80, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
    - address: 10.9.0.1
"""


class Daemon:
    """`discoveryd run` with its own loopback ports; stopped (or killed) by PID."""

    def __init__(self, tmp: Path, registries: str, extra: str = "") -> None:
        self.tmp = tmp
        self.admin, self.xds, self.dns = free_port(), free_port(), free_port()
        self.config = tmp / "discoveryd.yaml"
        self.config.write_text(
            f"registries:\n{registries}"
            f"xds:\n  listen: 127.0.0.1:{self.xds}\n"
            f"dns:\n  listen: [127.0.0.1:{self.dns}]\n"
            f"admin:\n  listen: 127.0.0.1:{self.admin}\n" + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with (self.tmp / f"discoveryd.{self.runs}.log").open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def logs(self) -> str:
        return (self.tmp / f"discoveryd.{self.runs}.log").read_text()

    def get(self, path: str) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"discoveryd exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path: str) -> Any:
        return json.loads(self.get(path)[1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def daemon(tmp: Path, registries: str, extra: str = "") -> Iterator[Daemon]:
    d = Daemon(tmp, registries, extra)
    try:
        yield d
    finally:
        d.stop()


def test_a_dead_registry_blocks_readiness_until_ready_timeout_then_is_reported(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(SE)
    registries = (
        "  - kind: files\n    name: local\n    paths: [se/]\n"
        f"  - kind: etcd\n    name: main\n    endpoints: [http://127.0.0.1:{dead}]\n"
        "    prefix: /x/\n    domain: mesh.local\n"
    )
    with daemon(tmp_path, registries, "ready_timeout: 3s\n") as d:
        started = time.monotonic()
        d.start()
        wait_sync(lambda: d.get("/debug/registryz")[0] == 200, timeout=20, what="admin up")
        reg = wait_sync(
            lambda: (r := d.json("/debug/registryz"))["registries"]["etcd/main"]["last_error"] and r,
            timeout=20,
            what="the etcd failure reported",
        )
        # Failed, never synced: not ready (before this change a first failure made it ready).
        assert not reg["registries"]["etcd/main"]["ready"]
        if time.monotonic() - started < 2.5:
            status, body = d.get("/readyz")
            assert status == 503 and "etcd/main" in body
        status, body = wait_sync(lambda: (r := d.get("/readyz"))[0] == 200 and r, timeout=20, what="ready after 3s")
        assert time.monotonic() - started >= 3.0
        assert "ready_timeout" in body and "etcd/main" in body
        reg = d.json("/debug/registryz")["registries"]["etcd/main"]
        assert reg["timed_out"] and reg["ready"] and not reg["synced"]
        metrics = d.get("/metrics")[1]
        assert 'discoveryd_registry_ready_timed_out{registry="etcd/main"} 1.0' in metrics
        assert "has not synced within ready_timeout" in d.logs()


async def _cds_names(port: int) -> list[str]:
    # Own subchannel pool: a shared one keeps the reconnect backoff of refused connections.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stream = Stream(channel)
        await stream.send(CLUSTER)
        response = await stream.recv(timeout=20)
        await stream.close()
        return names(response)


async def _rcode(port: int, name: str) -> int | None:
    try:
        query = dns.message.make_query(name, dns.rdatatype.A)
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=0.3)
    except (dns.exception.Timeout, OSError):
        return None
    return int(reply.rcode())


async def test_kill_9_restart_serves_the_whole_world_at_once(etcd: EtcdServer, tmp_path: Path) -> None:
    prefix = f"/warm-{uuid.uuid4().hex[:10]}/"
    count = 200
    async with aetcd.Client(host="127.0.0.1", port=int(etcd.url.rsplit(":", 1)[1])) as client:
        for i in range(count):
            value = json.dumps({"Op": 0, "Addr": f"10.1.{i // 250}.{i % 250 + 1}:8080"}).encode()
            await client.put(f"{prefix}svc-{i}/a".encode(), value)
    proxy = TcpProxy(int(etcd.url.rsplit(":", 1)[1]))
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(SE)
    registries = (
        "  - kind: files\n    name: local\n    paths: [se/]\n"
        f"  - kind: etcd\n    name: main\n    endpoints: [{proxy.url}]\n"
        f"    prefix: {prefix}\n    domain: mesh.local\n"
    )
    names_to_ask = ["svc-0.mesh.local.", f"svc-{count - 1}.mesh.local.", "web.shop.example."]
    rcodes: list[tuple[str, int]] = []
    probing = True

    async def probe(d: Daemon) -> None:
        while probing:
            for name in names_to_ask:
                rc = await _rcode(d.dns, name)
                if rc is not None:
                    rcodes.append((name, rc))
            await asyncio.sleep(0.01)

    try:
        with daemon(tmp_path, registries, "state_dir: state\nready_timeout: 60s\n") as d:
            d.start()
            await eventually(lambda: d.get("/readyz")[0] == 200, timeout=30, what="first run ready")
            full = await _cds_names(d.xds)
            assert len(full) >= count + 1
            state_file = tmp_path / "state" / state.FILE_NAME
            await eventually(
                lambda: state_file.exists() and state_file.stat().st_size > 0, timeout=10, what="state saved"
            )
            await asyncio.sleep(1.5)  # past the save throttle: the saved state is the synced one
            prober = asyncio.create_task(probe(d))
            try:
                await eventually(lambda: len(rcodes) >= 3, timeout=10, what="DNS answers before the kill")
                d.kill()
                proxy.block()  # etcd unreachable for the restarted daemon
                started = time.monotonic()
                d.start()
                first = await eventually(lambda: _try_cds(d.xds), timeout=20, what="first CDS after restart")
                elapsed = time.monotonic() - started
                assert sorted(first) == sorted(full), "the first CDS response after restart is the whole world"
                # The admin API starts once xDS has answered (or shortly after it listens).
                status = await eventually(
                    lambda: d.json("/debug/registryz")["registries"]["etcd/main"], timeout=10, what="admin API"
                )
                assert status["restored"] and status["stale"] and not status["synced"]
                await asyncio.sleep(1.0)  # keep probing DNS while restored
                proxy.unblock()
                await eventually(
                    lambda: d.json("/debug/registryz")["registries"]["etcd/main"]["synced"],
                    timeout=30,
                    what="etcd resynced",
                )
                await asyncio.sleep(0.5)
            finally:
                probing = False
                await prober
            nxdomain = [(n, rc) for n, rc in rcodes if rc == dns.rcode.NXDOMAIN]
            assert not nxdomain, f"NXDOMAIN for existing names across the restart: {nxdomain[:5]}"
            assert any(rc == dns.rcode.NOERROR for _, rc in rcodes)
            print(f"first complete CDS response {elapsed:.2f}s after start ({len(first)} clusters)")
    finally:
        proxy.close()


async def _try_cds(port: int) -> list[str] | None:
    try:
        return await asyncio.wait_for(_cds_names(port), timeout=5)
    except (grpc.aio.AioRpcError, TimeoutError, AssertionError):
        return None


DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web.shop.example
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {tcp: {maxConnections: 7}}
"""


async def _clusters(port: int) -> dict[str, cluster_pb2.Cluster] | None:
    options = [("grpc.use_local_subchannel_pool", 1)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stream = Stream(channel)
            await stream.send(CLUSTER)
            response = await stream.recv(timeout=5)
            await stream.close()
    except (grpc.aio.AioRpcError, TimeoutError, AssertionError):
        return None
    out = {}
    for packed in response.resources:
        cluster = cluster_pb2.Cluster()
        packed.Unpack(cluster)
        out[cluster.name] = cluster
    return out


async def test_kill_9_restart_serves_each_cluster_with_its_policy_from_the_first_response(tmp_path: Path) -> None:
    """The first CDS response after a restart comes before the files registry has read its files:
    the restored DestinationRule must be in it (not the cluster without its policy, changed later)."""
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(SE)
    (tmp_path / "se" / "web-rule.yaml").write_text(DR)
    registries = "  - kind: files\n    name: local\n    paths: [se/]\n"
    with daemon(tmp_path, registries, "state_dir: state\n") as d:
        d.start()
        await eventually(lambda: d.get("/readyz")[0] == 200, timeout=30, what="first run ready")
        before = await eventually(lambda: _clusters(d.xds), timeout=20, what="CDS before the kill")
        (web,) = [name for name in before if "web.shop.example" in name]
        assert before[web].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
        state_file = tmp_path / "state" / state.FILE_NAME

        def saved_with_policy() -> bool:
            saved = state.decode(state_file.read_bytes(), str(state_file))
            policies = {host for part in saved.parts for host, _ in part.policies}
            return saved.xds is not None and "web.shop.example" in policies

        await eventually(saved_with_policy, timeout=10, what="state saved with the policy and the xDS resources")
        d.kill()
        d.start()
        first = await eventually(lambda: _clusters(d.xds), timeout=20, what="first CDS after restart")
        assert first[web].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
        assert first == before  # the very world served before the kill, policies included
        assert "and the xDS resources of" in d.logs()  # the first build took the saved resources
