"""grpcio's xDS client honours the per-client EDS priorities of a DestinationRule's locality failover.

Two backends, one in zone a and one in zone b of region r1; each client's bootstrap `node.locality`
says where it runs. A client in zone a gets only zone a's backend, one in zone b only zone b's
(gRPC's priority policy, gRFC A27); when the registry marks zone a's endpoint unhealthy, a client in
zone a is served by zone b.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import asyncio

import pytest

from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, PortProtocol, Service
from tests.fakes.grpc_backend import METHOD, bootstrap, count_calls, grpc_backend
from tests.fakes.policy import DR_HEAD, read_policies
from tests.fakes.xds import RunningXds, nacks, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "cart.shop.internal", 8080
CALLS = 30

POLICY = (
    "\n"
    + DR_HEAD
    + """\
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}
    loadBalancer: {localityLbSetting: {enabled: true}}
"""
)


async def run_client(xds: RunningXds, zone: str) -> dict[str, int]:
    locality = {"region": "r1", "zone": zone}
    return await count_calls(
        bootstrap(xds.port, node_id=f"grpc-{zone}", locality=locality), f"{HOST}:{PORT}", METHOD, CALLS, {}
    )


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
    policies = read_policies(POLICY, "shop", "policy.yaml")
    async with grpc_backend("zone-a") as a, grpc_backend("zone-b") as b:
        xds.put_with_policy(policies.policies[Hostname(HOST)], service(a, b))
        in_a, in_b = await asyncio.gather(run_client(xds, "a"), run_client(xds, "b"))
        assert in_a == {"zone-a": CALLS}, in_a
        assert in_b == {"zone-b": CALLS}, in_b
        xds.put(service(a, b, a_health=Health.UNHEALTHY))
        in_a = await run_client(xds, "a")
        assert in_a == {"zone-b": CALLS}, in_a
    assert nacks() == before
