"""A real Envoy applies a VirtualService's rewrite and header operations served by discoveryd over RDS.

Envoy's static listener takes its routes from the RouteConfiguration `web.test:8080` over ADS; the
backend records the path and headers of each request it receives.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from discoveryd.model import Endpoint, Hostname
from tests.fakes.policy import read_policies
from tests.fakes.xds import RunningXds, assert_no_rejections, nacks, run_envoy, service, serving, xds  # noqa: F401
from tests.helpers import eventually

pytestmark = pytest.mark.integration

WEB = Hostname("web.test")
ROUTES = "web.test:8080"

POLICY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.test]
  http:
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    headers:
      request: {set: {x-env: staging}, add: {x-trace: "on"}, remove: [x-secret]}
      response: {set: {x-route: api}}
    route:
    - destination: {host: web.test}
      headers: {response: {add: {x-dest: web}}}
"""


@contextlib.asynccontextmanager
async def recording_backend(seen: list[tuple[str, dict[str, str]]]) -> AsyncIterator[int]:
    """A loopback HTTP server that appends (path, headers) of every request to `seen`; yields its port."""

    async def handle(request: web.Request) -> web.Response:
        headers: dict[str, str] = {}
        for k, v in request.headers.items():  # repeated headers joined, as HTTP allows
            headers[k.lower()] = f"{headers[k.lower()]},{v}" if k.lower() in headers else v
        seen.append((request.path, headers))
        return web.Response(text="ok")

    async with serving(handle) as port:
        yield port


async def test_envoy_rewrites_the_prefix_and_sets_request_and_response_headers(xds: RunningXds, tmp_path: Path) -> None:
    before = nacks()
    policies = read_policies(POLICY, file="routes.yaml")
    seen: list[tuple[str, dict[str, str]]] = []
    async with recording_backend(seen) as port:
        xds.put_with_policy(policies.policies[WEB], service(WEB, Endpoint("127.0.0.1", ports={"http": port})))
        async with run_envoy(tmp_path, xds.port, "GRPC", route_to="unused", rds=ROUTES) as envoy:
            async with aiohttp.ClientSession() as session:
                answer: dict[str, str] = {}

                async def routed() -> bool:
                    headers = {"Host": "web.test", "x-secret": "s3cret", "x-trace": "client"}
                    async with session.get(envoy.listener + "/api/items", headers=headers) as r:
                        if r.status != 200:
                            return False
                        answer.update({k.lower(): v for k, v in r.headers.items()})
                        return True

                await eventually(routed, timeout=20, interval=0.1, what="the VirtualService route in envoy")
            path, received = seen[-1]
            assert path == "/v2/items"
            assert received["x-env"] == "staging"
            assert "x-secret" not in received
            assert received["x-trace"] == "client,on", received  # add keeps the client's value
            assert answer["x-route"] == "api" and answer["x-dest"] == "web", answer
            await assert_no_rejections(envoy, before)
