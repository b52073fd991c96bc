"""A real Envoy in zone A follows a DestinationRule's locality failover served by discoveryd.

The service has one backend in zone A and one in zone B. Envoy's bootstrap node says it runs in
region r1, zone A: its assignment puts zone A at priority 0 and zone B at 1, so real traffic goes
to zone A; when zone A's endpoint goes unhealthy (in the registry, or ejected by outlier
detection after a 503) traffic moves to zone B.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from discoveryd.model import Endpoint, Health, Hostname, Locality, Service
from discoveryd.policy import HostPolicy
from tests.fakes.policy import read_policies
from tests.fakes.xds import (  # noqa: F401
    Envoy,
    RunningXds,
    answers,
    assert_no_rejections,
    failing_backend,
    http_backend,
    nacks,
    run_envoy,
    service,
    xds,
)
from tests.helpers import eventually

pytestmark = pytest.mark.integration

WEB = Hostname("web.test")
CLUSTER = "outbound|8080||web.test"

POLICY = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.test
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 100}
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover: [{from: r1, to: r2}]
"""

NODE_IN_ZONE_A = {"id": "envoy-zone-a", "cluster": "integration", "locality": {"region": "r1", "zone": "a"}}


def policy() -> HostPolicy:
    return read_policies(POLICY, file="policy.yaml").policies[WEB]


def web(a: int, b: int, a_health: Health = Health.HEALTHY) -> Service:
    return service(
        WEB,
        Endpoint("127.0.0.1", ports={"http": a}, locality=Locality("r1", "a"), health=a_health),
        Endpoint("127.0.0.1", ports={"http": b}, locality=Locality("r1", "b")),
    )


@contextlib.asynccontextmanager
async def envoy_in_zone_a(xds: RunningXds, tmp_path: Path, api_type: str, a: int, b: int) -> AsyncIterator[Envoy]:
    """Serve web (port `a` in zone A, `b` in zone B) under the locality policy; a real Envoy in zone A,
    once it has zone A at priority 0 and zone B at 1."""
    xds.put_with_policy(policy(), web(a, b))
    async with run_envoy(tmp_path, xds.port, api_type, route_to=CLUSTER, node=NODE_IN_ZONE_A) as envoy:
        expected = {f"127.0.0.1:{a}": "0", f"127.0.0.1:{b}": "1"}

        async def zone_b_is_next() -> bool:
            return await envoy.host_stats(CLUSTER, "priority") == expected

        await eventually(zone_b_is_next, timeout=20, what="zone A at priority 0, zone B at 1 in envoy")
        yield envoy


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_traffic_stays_in_the_clients_zone_and_fails_over_when_it_goes_unhealthy(
    xds: RunningXds, tmp_path: Path, api_type: str
) -> None:
    before = nacks()
    async with (
        http_backend("zone-a") as a,
        http_backend("zone-b") as b,
        envoy_in_zone_a(xds, tmp_path, api_type, a, b) as envoy,
    ):
        dump = await envoy.get_json("/config_dump?resource=dynamic_active_clusters")
        (found,) = [c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == CLUSTER]
        assert "locality_weighted_lb_config" in found["common_lb_config"]

        async with aiohttp.ClientSession() as session:
            assert await answers(session, envoy.listener, 20) == {"200 zone-a": 20}

            xds.put(web(a, b, a_health=Health.UNHEALTHY))  # the registry marks zone A's endpoint down

            async def moved() -> bool:
                return await answers(session, envoy.listener, 5) == {"200 zone-b": 5}

            await eventually(moved, timeout=20, interval=0.1, what="traffic moved to zone B")
            assert await answers(session, envoy.listener, 20) == {"200 zone-b": 20}

            xds.put(web(a, b))  # healthy again: back to zone A

            async def back() -> bool:
                return await answers(session, envoy.listener, 5) == {"200 zone-a": 5}

            await eventually(back, timeout=20, interval=0.1, what="traffic back in zone A")
        await assert_no_rejections(envoy, before)


async def test_outlier_ejection_in_the_clients_zone_moves_traffic_to_the_next_zone(
    xds: RunningXds, tmp_path: Path
) -> None:
    before = nacks()
    async with (
        failing_backend("zone-a") as a,
        http_backend("zone-b") as b,
        envoy_in_zone_a(xds, tmp_path, "GRPC", a, b) as envoy,
    ):
        ejections = f"cluster.{CLUSTER}.outlier_detection.ejections_enforced_consecutive_5xx"
        async with aiohttp.ClientSession() as session:
            first = await answers(session, envoy.listener, 1)
            assert first == {"503 zone-a": 1}  # zone A first, while it is healthy
            # Envoy ejects on its main thread, then tells the worker: a request in between may still reach A.
            await eventually(lambda: envoy.stat(ejections), timeout=10, interval=0.05, what="zone A ejected")

            async def moved() -> bool:
                return await answers(session, envoy.listener, 20) == {"200 zone-b": 20}

            await eventually(moved, timeout=10, interval=0.1, what="every request in zone B after the ejection")
        assert await envoy.stat(ejections) == 1  # one ejection (baseEjectionTime 5m): B serves because A is out
        await assert_no_rejections(envoy, before)
