"""grpcio's own xDS client dials xds:///<hostname>:<port> through discoveryd (LDS → RDS → CDS → EDS).

The client runs in a subprocess: it reads its bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG) when the channel is
created, and a process of its own keeps that global state out of the test process.
"""

# ruff: noqa: F811 - pytest fixtures imported from xds_fixtures are parameters by design

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from discoveryd.model import Endpoint, Hostname, Port, Protocol, Service
from discoveryd.xds import metrics
from tests.integration.xds_fixtures import RunningXds, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "api.test", 50051
METHOD = "/test.Who/Name"

CLIENT = """
import collections, json, sys
import grpc

target, count = sys.argv[1], int(sys.argv[2])
with grpc.insecure_channel(f"xds:///{target}") as channel:
    who = channel.unary_unary(sys.argv[3])
    seen = collections.Counter(who(b"", timeout=20, wait_for_ready=True).decode() for _ in range(count))
print(json.dumps(seen))
"""


@contextlib.asynccontextmanager
async def grpc_backend(name: str) -> AsyncIterator[int]:
    """A loopback gRPC server whose one method answers with `name`; yields its port."""

    async def handle(_: bytes, __: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return name.encode()

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(handle)
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def bootstrap(xds_port: int) -> str:
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": f"127.0.0.1:{xds_port}",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": "grpc-client", "cluster": "integration"},
        }
    )


async def test_grpc_xds_client_spreads_over_both_backends(xds: RunningXds) -> None:
    nacks = sum(float(metrics.NACKS.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS"))
    async with grpc_backend("one") as one, grpc_backend("two") as two:
        xds.put(
            Service(
                hostname=Hostname(HOST),
                ports=(Port(PORT, "grpc", Protocol.GRPC),),
                endpoints=(
                    Endpoint("127.0.0.1", ports={"grpc": one}),
                    Endpoint("127.0.0.1", ports={"grpc": two}),
                ),
            )
        )
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap(xds.port)}
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            f"{HOST}:{PORT}",
            "40",
            METHOD,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(60):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-3000:]
        seen = json.loads(out)
        assert set(seen) == {"one", "two"}, seen
        assert min(seen.values()) >= 5, f"round robin should spread 40 calls over both: {seen}"
    assert sum(float(metrics.NACKS.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS")) == nacks
