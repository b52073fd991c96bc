"""End to end: the real `discoveryd run` with a `kind: kubernetes` registry whose kubeconfig points at the fake
API server on loopback: Kubernetes DNS names answered (dnspython) and a real Envoy sent where the
EndpointSlices say, following changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.grpc_backend import METHOD, bootstrap, count_calls, grpc_backend
from tests.fakes.kubernetes import FakeApiServer, endpoint, endpoint_slice, kubeconfig, service
from tests.fakes.xds import cluster, http_backend, run_envoy
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.integration

WEB = "web.shop.svc.cluster.local"


class Daemon:
    def __init__(self, tmp: Path, fake: FakeApiServer) -> None:
        self.admin, self.xds, self.dns = free_port(), free_port(), free_port()
        (tmp / "kubeconfig").write_text(kubeconfig(fake))
        self.config = tmp / "discoveryd.yaml"
        self.config.write_text(
            "registries:\n"
            "  - kind: kubernetes\n"
            "    name: c1\n"
            "    kubeconfig: kubeconfig\n"
            "    domain: cluster.local\n"
            "    backoff_max: 1s\n"
            f"xds:\n  listen: 127.0.0.1:{self.xds}\n  debounce_after: 10ms\n"
            f"dns:\n  listen: [127.0.0.1:{self.dns}]\n"
            f"admin:\n  listen: 127.0.0.1:{self.admin}\n"
        )
        self.log = tmp / "discoveryd.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("w") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "discoveryd.cli",
                "run",
                "--config",
                str(self.config),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )

    async def get(self, path: str) -> tuple[int, Any]:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise RuntimeError(f"discoveryd exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}{path}") as r:
            text = await r.text()
            return r.status, (json.loads(text) if r.content_type == "application/json" else text)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def daemon(tmp: Path, fake: FakeApiServer) -> AsyncIterator[Daemon]:
    d = Daemon(tmp, fake)
    await d.start()
    try:

        async def ready() -> bool:
            return (await d.get("/readyz"))[0] == 200

        await eventually(ready, timeout=30, interval=0.1, what="discoveryd ready")
        yield d
    finally:
        await d.stop()


async def ask(port: int, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[int, set[str]]:
    query = dns.message.make_query(name, rdtype)
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=2)
    return reply.rcode(), {rd.to_text() for rrset in reply.answer if rrset.rdtype == rdtype for rd in rrset}


async def test_kubernetes_names_are_answered_and_envoy_follows_the_slices(tmp_path: Path) -> None:
    async with (
        FakeApiServer(bookmark_interval=0.5) as fake,
        http_backend("alpha") as alpha,
        http_backend("beta") as beta,
    ):
        web_ports = [{"name": "http", "port": 80, "targetPort": alpha, "protocol": "TCP"}]
        fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10"], ports=web_ports))
        fake.apply(
            "endpointslices",
            endpoint_slice(
                "web", [endpoint("127.0.0.1")], namespace="shop", name="web-1", ports=[{"name": "http", "port": alpha}]
            ),
        )
        fake.apply("services", service("db", "shop", cluster_ips=["None"], ports=[{"name": "tcp-pg", "port": 5432}]))
        db_eps = [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2", ready=False)]
        fake.apply(
            "endpointslices", endpoint_slice("db", db_eps, namespace="shop", ports=[{"name": "tcp-pg", "port": 5432}])
        )
        fake.apply("services", service("mirror", "shop", external_name="mirror.example.org"))
        async with daemon(tmp_path, fake) as d:
            # The DNS server applies index versions in a task of its own: wait for it to hold the first sync.
            async def answered() -> bool:
                return await ask(d.dns, f"{WEB}.", dns.rdatatype.A) == (dns.rcode.NOERROR, {"10.96.0.10"})

            # The first sync is one index version: once one Service is answered, all are.
            await eventually(answered, timeout=10, what="first sync answered")
            assert await ask(d.dns, f"_http._tcp.{WEB}.", dns.rdatatype.SRV) == (
                dns.rcode.NOERROR,
                {f"0 100 80 {WEB}."},
            )
            # Headless: the ready endpoints only, each under its own name.
            assert await ask(d.dns, "db.shop.svc.cluster.local.", dns.rdatatype.A) == (dns.rcode.NOERROR, {"10.1.0.1"})
            assert await ask(d.dns, "db-0.db.shop.svc.cluster.local.", dns.rdatatype.A) == (
                dns.rcode.NOERROR,
                {"10.1.0.1"},
            )
            rcode, cname = await ask(d.dns, "mirror.shop.svc.cluster.local.", dns.rdatatype.CNAME)
            assert (rcode, cname) == (dns.rcode.NOERROR, {"mirror.example.org."})
            assert (await ask(d.dns, "dns-version.cluster.local.", dns.rdatatype.TXT))[1] == {'"1.1.0"'}
            status, registries = await d.get("/debug/registryz")
            assert status == 200
            entry = registries["registries"]["kubernetes/c1"]
            assert entry["synced"] and not entry["stale"]

            async with run_envoy(tmp_path, d.xds, "GRPC", route_to=cluster(WEB, 80)) as envoy:

                async def answers(name: str) -> bool:
                    return (await envoy.request()) == (200, name)

                await eventually(lambda: answers("alpha"), timeout=20, what="traffic to the slice's endpoint")
                fake.apply(
                    "endpointslices",
                    endpoint_slice(
                        "web",
                        [endpoint("127.0.0.1")],
                        namespace="shop",
                        name="web-1",
                        ports=[{"name": "http", "port": beta}],
                    ),
                )
                await eventually(lambda: answers("beta"), timeout=20, what="traffic follows the slice")

            fake.delete("services", "shop", "web")

            async def gone() -> bool:
                return (await ask(d.dns, f"{WEB}.", dns.rdatatype.A))[0] == dns.rcode.NXDOMAIN

            await eventually(gone, timeout=10, what="deleted Service withdrawn from DNS")


CART = "cart.shop.internal"


async def _count_calls(xds_port: int, namespace: str, count: int = 20) -> dict[str, int]:
    """`count` calls from grpcio's xDS client (a subprocess) in `namespace` to xds:///cart:8080; answers by backend."""
    return await count_calls(bootstrap(xds_port, namespace), f"{CART}:8080", METHOD, count, {}, timeout=60)


async def test_destination_rules_from_the_cluster_shape_grpc_clients_per_namespace(tmp_path: Path) -> None:
    """DestinationRule and VirtualService CRDs reach real gRPC xDS clients: the public route pins subset
    `pinned`, which the service's rule defines as v1 and a rule of namespace `web` (exported to `.`) as v2.
    A client in web calls v2, one in shop v1; once web's rule is deleted, web's clients call v1 too."""
    async with (
        FakeApiServer(bookmark_interval=0.5, crds_installed=True) as fake,
        grpc_backend("v1") as v1,
        grpc_backend("v2") as v2,
    ):
        entry = {
            "hosts": [CART],
            "ports": [{"number": 8080, "name": "grpc", "protocol": "GRPC"}],
            "resolution": "STATIC",
            "location": "MESH_INTERNAL",
            "endpoints": [
                {"address": "127.0.0.1", "ports": {"grpc": v1}, "labels": {"version": "v1"}},
                {"address": "127.0.0.1", "ports": {"grpc": v2}, "labels": {"version": "v2"}},
            ],
        }
        fake.apply("serviceentries", {"metadata": {"name": "cart", "namespace": "shop"}, "spec": entry})

        def rule(namespace: str, version: str, **spec: Any) -> dict[str, Any]:
            subsets = [{"name": "pinned", "labels": {"version": version}}]
            return {
                "metadata": {"name": "cart", "namespace": namespace},
                "spec": {"host": CART, "subsets": subsets, **spec},
            }

        fake.apply("destinationrules", rule("shop", "v1"))
        fake.apply("destinationrules", rule("web", "v2", exportTo=["."]))
        pinned = [{"destination": {"host": CART, "subset": "pinned"}}]
        fake.apply(
            "virtualservices",
            {"metadata": {"name": "cart", "namespace": "shop"}, "spec": {"hosts": [CART], "http": [{"route": pinned}]}},
        )
        async with daemon(tmp_path, fake) as d:
            assert await _count_calls(d.xds, "web") == {"v2": 20}
            assert await _count_calls(d.xds, "shop") == {"v1": 20}
            fake.delete("destinationrules", "web", "cart")

            async def moved() -> bool:
                return await _count_calls(d.xds, "web", 4) == {"v1": 4}

            await eventually(moved, timeout=30, interval=0.2, what="web's clients follow the deletion")
