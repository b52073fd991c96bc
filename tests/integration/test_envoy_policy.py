"""A real Envoy follows DestinationRule subsets and outlier detection served by discoveryd.

Envoy's static listener routes to the subset cluster `outbound|8080|v2|web.test`; the policy is read from
YAML with the files registry's reader and written to the index shard next to the service.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import collections
from pathlib import Path

import aiohttp
import pytest

from discoveryd.model import Endpoint, Hostname
from tests.fakes.policy import read_policies
from tests.fakes.xds import (  # noqa: F401
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
V2 = "outbound|8080|v2|web.test"

POLICY = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.test
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


async def test_envoy_routes_to_the_subset_only_and_ejects_the_failing_backend(xds: RunningXds, tmp_path: Path) -> None:
    before = nacks()
    policies = read_policies(POLICY, file="policy.yaml")
    async with http_backend("v1") as v1, http_backend("v2") as v2, failing_backend("bad") as bad:
        xds.put_with_policy(
            policies.policies[WEB],
            service(
                WEB,
                Endpoint("127.0.0.1", ports={"http": v1}, labels={"version": "v1"}),
                Endpoint("127.0.0.1", ports={"http": v2}, labels={"version": "v2"}),
                Endpoint("127.0.0.1", ports={"http": bad}, labels={"version": "v2"}),
            ),
        )
        async with run_envoy(tmp_path, xds.port, "GRPC", route_to=V2) as envoy:
            expected = {f"127.0.0.1:{v2}", f"127.0.0.1:{bad}"}

            async def subset_in_envoy() -> bool:
                return set(await envoy.host_stats(V2, "priority")) == expected

            await eventually(subset_in_envoy, timeout=20, what="v2 subset in envoy")

            # Outlier detection as configured, in Envoy's own view of the cluster.
            dump = await envoy.get_json("/config_dump?resource=dynamic_active_clusters")
            (found,) = [c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == V2]
            assert found["outlier_detection"]["consecutive_5xx"] == 2
            assert found["outlier_detection"]["base_ejection_time"] == "300s"

            # Real traffic: only the subset's backends answer; the failing one is ejected after two 5xx.
            seen: collections.Counter[str] = collections.Counter()
            async with aiohttp.ClientSession() as session:

                async def only_v2_answers() -> bool:
                    await answers(session, envoy.listener, 10, seen)
                    text = await envoy.get("/clusters")
                    return f"{V2}::127.0.0.1:{bad}::health_flags::/failed_outlier_check" in text

                await eventually(only_v2_answers, timeout=20, interval=0.1, what="the 503 backend ejected")
                assert set(seen) <= {"200 v2", "503 bad"}, seen
                assert seen["503 bad"] >= 2, seen
                after = await answers(session, envoy.listener, 20)
            assert after == {"200 v2": 20}, after
            assert await envoy.stat(f"cluster.{V2}.outlier_detection.ejections_enforced_consecutive_5xx") >= 1
            await assert_no_rejections(envoy, before)
