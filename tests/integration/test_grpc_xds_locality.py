"""grpcio's xDS client honours the per-client EDS priorities of a DestinationRule's locality failover.

Two backends, one in zone a and one in zone b of region r1; each client's bootstrap `node.locality`
says where it runs. A client in zone a gets only zone a's backend, one in zone b only zone b's
(gRPC's priority policy, gRFC A27); when the registry marks zone a's endpoint unhealthy, a client in
zone a is served by zone b.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, PortProtocol, Service
from tests.fakes.grpc_backend import COUNTING_CLIENT, METHOD, grpc_backend
from tests.fakes.xds import RunningXds, nacks, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "cart.shop.internal", 8080
CALLS = 30

POLICY = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart.shop.internal
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}
    loadBalancer: {localityLbSetting: {enabled: true}}
"""


def bootstrap(xds_port: int, zone: str) -> str:
    node = {"id": f"grpc-{zone}", "cluster": "integration", "locality": {"region": "r1", "zone": zone}}
    server = {
        "server_uri": f"127.0.0.1:{xds_port}",
        "channel_creds": [{"type": "insecure"}],
        "server_features": ["xds_v3"],
    }
    return json.dumps({"xds_servers": [server], "node": node})


async def run_client(xds: RunningXds, zone: str) -> dict[str, int]:
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap(xds.port, zone)}
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", COUNTING_CLIENT, f"{HOST}:{PORT}", METHOD, str(CALLS), "{}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    seen: dict[str, int] = json.loads(out)
    return seen


def service(a: int, b: int, a_health: Health = Health.HEALTHY) -> Service:
    return Service(
        hostname=Hostname(HOST),
        namespace="shop",
        ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
        endpoints=(
            Endpoint("127.0.0.1", ports={"grpc": a}, locality=Locality("r1", "a"), health=a_health),
            Endpoint("127.0.0.1", ports={"grpc": b}, locality=Locality("r1", "b")),
        ),
    )


async def test_grpc_clients_stay_in_their_zone_and_fail_over(xds: RunningXds) -> None:
    before = nacks()
    objects, problems = read_yaml_all("policy.yaml", POLICY, "shop")
    assert not problems, problems
    policies = PolicySet()
    policies.update("policy.yaml", objects)
    policies.build()
    async with grpc_backend("zone-a") as a, grpc_backend("zone-b") as b:
        with xds.shard.batch():
            xds.shard.set_policy(Hostname(HOST), policies.policies[Hostname(HOST)])
            xds.put(service(a, b))
        in_a, in_b = await asyncio.gather(run_client(xds, "a"), run_client(xds, "b"))
        assert in_a == {"zone-a": CALLS}, in_a
        assert in_b == {"zone-b": CALLS}, in_b
        xds.put(service(a, b, a_health=Health.UNHEALTHY))
        in_a = await run_client(xds, "a")
        assert in_a == {"zone-b": CALLS}, in_a
    assert nacks() == before
