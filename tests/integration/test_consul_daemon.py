"""End to end: the real `discoveryd run` reading the fake Consul agent, answering Consul's DNS names and serving Envoy.

The fake agent runs in the test's event loop; discoveryd and Envoy are
subprocesses (stopped by PID). DNS questions go through dnspython.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.consul import FakeConsul
from tests.fakes.xds import cluster, http_backend, run_envoy
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.integration

TOKEN = "c0nsul-t0ken-5e1f0a77"


class _Daemon:
    def __init__(self, tmp: Path, consul_url: str) -> None:
        self.admin, self.xds, self.dns = free_port(), free_port(), free_port()
        self.config = tmp / "discoveryd.yaml"
        self.config.write_text(
            "registries:\n"
            "  - kind: consul\n"
            "    name: main\n"
            f"    address: {consul_url}\n"
            "    datacenters: [dc1, dc2]\n"
            "    wait: 5s\n"
            "    backoff_max: 1s\n"
            "    acl_retry: 1s\n"
            f"xds:\n  listen: 127.0.0.1:{self.xds}\n"
            f"dns:\n  listen: [127.0.0.1:{self.dns}]\n  ttl: 1s\n"
            f"admin:\n  listen: 127.0.0.1:{self.admin}\n"
        )
        self.log = tmp / "discoveryd.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["CONSUL_HTTP_TOKEN"] = TOKEN
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def get(self, path: str) -> tuple[int, str]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"discoveryd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as reply:
                return int(reply.status), reply.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def registry(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.get("/debug/registryz")[1])
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    async with FakeConsul() as f:
        f.acl_token = TOKEN
        f.add_datacenter("dc2")
        yield f


async def _ask(port: int, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[int, set[str]]:
    query = dns.message.make_query(name, rdtype)
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=2)
    return reply.rcode(), {rd.to_text() for rrset in reply.answer if rrset.rdtype == rdtype for rd in rrset}


async def _answered(daemon: _Daemon, name: str, rdtype: dns.rdatatype.RdataType = dns.rdatatype.A) -> set[str]:
    rcode, found = await _ask(daemon.dns, name, rdtype)
    assert rcode == dns.rcode.NOERROR, (name, dns.rcode.to_text(rcode))
    return found


def _ports(records: set[str]) -> list[str]:
    return sorted(r.split()[2] for r in records)


async def test_consul_dns_names(fake: FakeConsul, tmp_path: Path) -> None:
    fake.register("web", "10.0.0.1", 8080, node="n1", tags=["v1"], meta={"protocol": "http"})
    fake.register("web", "10.0.0.2", 8081, node="n2", service_id="web-2", tags=["v2"])
    fake.register("api", "10.0.2.1", 9000, node="n9", dc="dc2")
    d = _Daemon(tmp_path, fake.url)
    try:
        await eventually(d.ready, timeout=30, what="discoveryd ready")
        a, srv = dns.rdatatype.A, dns.rdatatype.SRV
        assert await _answered(d, "web.service.consul.") == {"10.0.0.1", "10.0.0.2"}
        assert await _answered(d, "web.service.dc1.consul.") == {"10.0.0.1", "10.0.0.2"}
        assert await _answered(d, "v1.web.service.consul.") == {"10.0.0.1"}
        assert await _answered(d, "v2.web.service.dc1.consul.") == {"10.0.0.2"}
        assert await _answered(d, "api.service.dc2.consul.") == {"10.0.2.1"}
        # Not the agent's datacenter: no short name.
        assert (await _ask(d.dns, "api.service.consul.", a))[0] == dns.rcode.NXDOMAIN
        assert _ports(await _answered(d, "_web._tcp.service.consul.", srv)) == ["8080", "8081"]
        assert _ports(await _answered(d, "_web._v1.service.dc1.consul.", srv)) == ["8080"]
        assert _ports(await _answered(d, "_api._tcp.service.dc2.consul.", srv)) == ["9000"]
        # A critical instance leaves the answers.
        fake.set_service_check("web-2", "critical")

        async def only_first() -> bool:
            return await _answered(d, "web.service.consul.") == {"10.0.0.1"}

        await eventually(only_first, timeout=10, what="critical instance dropped from DNS")
    finally:
        d.stop()


async def test_envoy_follows_consul_and_the_token_stays_secret(fake: FakeConsul, tmp_path: Path) -> None:
    async with http_backend("alpha") as alpha, http_backend("beta") as beta:
        fake.register("web", "127.0.0.1", alpha, node="n1", meta={"protocol": "http"})
        fake.register("api", "127.0.0.2", 9000, node="n9", dc="dc2")
        d = _Daemon(tmp_path, fake.url)
        try:
            await eventually(d.ready, timeout=30, what="discoveryd ready")
            async with run_envoy(tmp_path, d.xds, "GRPC", route_to=cluster("web.service.dc1.consul", alpha)) as envoy:

                async def answers(name: str) -> bool:
                    return (await envoy.request()) == (200, name)

                await eventually(lambda: answers("alpha"), timeout=20, what="traffic to the Consul instance")
                # A second instance; the first goes critical: Envoy follows.
                fake.register("web", "127.0.0.1", beta, node="n2", service_id="web-2", meta={"protocol": "http"})
                fake.set_service_check("web", "critical")
                await eventually(lambda: answers("beta"), timeout=20, what="traffic moves to the passing one")

            status, configz = d.get("/debug/configz")
            assert status == 200 and "consul" in configz
            registryz = json.dumps(d.registry())
            assert "dc1" in registryz and "dc2" in registryz
            for text in (configz, registryz, d.get("/metrics")[1], d.log.read_text()):
                assert TOKEN not in text
            assert TOKEN in fake.seen_tokens
        finally:
            d.stop()
        assert TOKEN not in d.log.read_text()
