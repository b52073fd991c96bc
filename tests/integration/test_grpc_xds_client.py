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

from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service
from discoveryd.xds.metrics import daemon_metrics
from tests.integration.xds_fixtures import RunningXds, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "api.test", 50051
METHOD = "/test.Who/Name"

# Prints the spread of `count` calls, then calls until `count` answers in a row come from the backend named in
# its stdin (the test writes it after moving the endpoints), printing how many calls that took.
CLIENT = """
import collections, json, sys
import grpc

target, count = sys.argv[1], int(sys.argv[2])
with grpc.insecure_channel(f"xds:///{target}") as channel:
    who = channel.unary_unary(sys.argv[3])
    call = lambda: who(b"", timeout=20, wait_for_ready=True).decode()
    print(json.dumps(collections.Counter(call() for _ in range(count))), flush=True)
    only = sys.stdin.readline().strip()
    calls = streak = 0
    while streak < count and calls < 10000:
        calls += 1
        streak = streak + 1 if call() == only else 0
    print(json.dumps({"calls": calls, "streak": streak}), flush=True)
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


async def test_grpc_xds_client_spreads_over_both_backends_and_follows_updates(xds: RunningXds) -> None:
    nacks = sum(float(daemon_metrics().nacks.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS"))
    async with grpc_backend("one") as one, grpc_backend("two") as two:
        xds.put(
            Service(
                hostname=Hostname(HOST),
                ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
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
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(60):
                line = await proc.stdout.readline()
                assert line, (await proc.stderr.read()).decode()[-3000:]
                seen = json.loads(line)
                assert set(seen) == {"one", "two"}, seen
                assert min(seen.values()) >= 5, f"round robin should spread 40 calls over both: {seen}"

                # Endpoint "one" leaves the service: the client follows the EDS update.
                xds.put(
                    Service(
                        hostname=Hostname(HOST),
                        ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
                        endpoints=(Endpoint("127.0.0.1", ports={"grpc": two}),),
                    )
                )
                proc.stdin.write(b"two\n")
                await proc.stdin.drain()
                moved = json.loads(await proc.stdout.readline())
                assert moved["streak"] == 40, moved
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, (await proc.stderr.read()).decode()[-3000:]
    assert sum(float(daemon_metrics().nacks.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS")) == nacks
