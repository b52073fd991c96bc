"""grpcio's xDS client follows DestinationRule subsets and VirtualService routes served by discoveryd.

The policies are read from YAML with the files registry's reader (`adapters.istio.policy`) and written to
the index shard next to the service, so the whole path (validation → index → CDS/EDS/RDS → gRPC) runs.
Clients run in subprocesses, as in test_grpc_xds_client.py.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service
from tests.fakes.grpc_backend import METHOD, bootstrap, count_calls, grpc_backend, grpc_server
from tests.fakes.policy import DR_HEAD, VS_HEAD
from tests.fakes.xds import RunningXds, nacks, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "cart.shop.internal", 8080
CALLS = 600

POLICY = (
    "\n"
    + DR_HEAD
    + """\
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
"""
    + VS_HEAD
    + """\
  http:
  - name: canary-header
    match: [{headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: cart.shop.internal, subset: v2}}]
  - name: broken
    match: [{uri: {prefix: /test.Who/Broken}}]
    fault: {abort: {grpcStatus: PERMISSION_DENIED, percentage: {value: 100}}}
    route: [{destination: {host: cart.shop.internal, subset: v1}}]
  - name: flaky
    match: [{uri: {exact: /test.Flaky/Name}}]
    retries: {attempts: 3, retryOn: unavailable}
    route: [{destination: {host: cart.shop.internal, subset: v2}}]
  - name: flaky-without-retries
    match: [{uri: {exact: /test.Flaky/NoRetry}}]
    retries: {attempts: 0, retryOn: unavailable}
    route: [{destination: {host: cart.shop.internal, subset: v2}}]
  - name: split
    route:
    - {destination: {host: cart.shop.internal, subset: v1}, weight: 80}
    - {destination: {host: cart.shop.internal, subset: v2}, weight: 20}
"""
)


@contextlib.asynccontextmanager
async def policy_setup(xds: RunningXds) -> AsyncIterator[None]:
    objects, problems = read_yaml_all("policy.yaml", POLICY, "shop")
    assert not problems, problems
    policies = PolicySet()
    policies.update("policy.yaml", objects)
    assert policies.build() == {Hostname(HOST)}
    assert not policies.problems()
    async with grpc_backend("v1-a") as a, grpc_backend("v1-b") as b, flaky_backend("v2") as c:
        xds.put_with_policy(
            policies.policies[Hostname(HOST)],
            Service(
                hostname=Hostname(HOST),
                namespace="shop",
                ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
                endpoints=(
                    Endpoint("127.0.0.1", ports={"grpc": a}, labels={"version": "v1"}),
                    Endpoint("127.0.0.1", ports={"grpc": b}, labels={"version": "v1"}),
                    Endpoint("127.0.0.1", ports={"grpc": c}, labels={"version": "v2"}),
                ),
            ),
        )
        yield


@contextlib.asynccontextmanager
async def flaky_backend(name: str) -> AsyncIterator[int]:
    """`grpc_backend`'s Who/Name, plus Flaky/Name and Flaky/NoRetry failing every other call with UNAVAILABLE."""
    calls = 0

    async def who(_: bytes, __: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return name.encode()

    async def flaky(_: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        nonlocal calls
        calls += 1
        if calls % 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "odd call")
        return name.encode()

    who_service, who_method = METHOD.strip("/").split("/")
    handlers = [
        grpc.method_handlers_generic_handler(who_service, {who_method: grpc.unary_unary_rpc_method_handler(who)}),
        grpc.method_handlers_generic_handler(
            "test.Flaky",
            {m: grpc.unary_unary_rpc_method_handler(flaky) for m in ("Name", "NoRetry")},
        ),
    ]
    async with grpc_server(handlers) as port:
        yield port


async def run_client(xds: RunningXds, method: str, count: int, metadata: dict[str, str]) -> dict[str, int]:
    return await count_calls(bootstrap(xds.port, "shop"), f"{HOST}:{PORT}", method, count, metadata)


async def test_weighted_split_between_subsets_is_80_20(xds: RunningXds) -> None:
    before = nacks()
    async with policy_setup(xds):
        seen = await run_client(xds, METHOD, CALLS, {})
    assert set(seen) <= {"v1-a", "v1-b", "v2"}, seen
    v1 = seen.get("v1-a", 0) + seen.get("v1-b", 0)
    share = v1 / CALLS
    # Binomial(600, 0.8): sd = 1.6 points; ±6 points is beyond 3.5 sd.
    assert 0.74 <= share <= 0.86, seen
    assert seen.get("v1-a", 0) > 0 and seen.get("v1-b", 0) > 0, f"the v1 subset holds both v1 backends: {seen}"
    assert nacks() == before


async def test_header_match_routes_to_a_subset_and_fault_abort_answers(xds: RunningXds) -> None:
    before = nacks()
    async with policy_setup(xds):
        canary, broken = await asyncio.gather(
            run_client(xds, METHOD, 50, {"x-canary": "yes"}),
            run_client(xds, "/test.Who/Broken", 20, {}),
        )
    assert canary == {"v2": 50}, canary
    assert broken == {"status:PERMISSION_DENIED": 20}, broken
    assert nacks() == before


async def test_retries_hide_every_other_unavailable(xds: RunningXds) -> None:
    async with policy_setup(xds):
        retried, plain = await asyncio.gather(
            run_client(xds, "/test.Flaky/Name", 20, {}),
            run_client(xds, "/test.Flaky/NoRetry", 20, {}),
        )
    assert retried == {"v2": 20}, retried
    # Without retries the alternation shows (the two clients share the backend's counter, so not exactly 10).
    assert plain.get("status:UNAVAILABLE", 0) >= 3, plain
