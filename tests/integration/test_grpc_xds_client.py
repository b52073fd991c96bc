"""grpcio's own xDS client dials xds:///<hostname>:<port> through discoveryd (LDS → RDS → CDS → EDS).

The client runs in a subprocess: it reads its bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG) when the channel is
created, and a process of its own keeps that global state out of the test process.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service
from discoveryd.xds.metrics import daemon_metrics
from tests.fakes.grpc_backend import METHOD, bootstrap, grpc_backend, run_grpc_client
from tests.fakes.xds import RunningXds, xds  # noqa: F401

pytestmark = pytest.mark.integration

HOST, PORT = "api.test", 50051

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


# Calls each target once and prints the status code of each call.
PROBE = """
import json, sys
import grpc

out = {}
for target in sys.argv[2:]:
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        try:
            channel.unary_unary(sys.argv[1])(b"", timeout=40)
            out[target] = "OK"
        except grpc.RpcError as e:
            out[target] = e.code().name
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize(("namespace", "sees_shop"), [("shop", True), ("web", False)])
async def test_grpc_xds_client_dials_only_what_is_exported_to_its_namespace(
    xds: RunningXds, namespace: str | None, sees_shop: bool
) -> None:
    async with grpc_backend("public") as public, grpc_backend("shop") as shop:
        xds.put(
            Service(
                hostname=Hostname("public.test"),
                ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
                endpoints=(Endpoint("127.0.0.1", ports={"grpc": public}),),
            ),
            Service(
                hostname=Hostname("shop-only.test"),
                namespace="shop",
                export_to=(".",),
                ports=(Port(PORT, "grpc", PortProtocol.GRPC),),
                endpoints=(Endpoint("127.0.0.1", ports={"grpc": shop}),),
            ),
        )
        targets = [f"public.test:{PORT}", f"shop-only.test:{PORT}"]
        # a name gRPC never saw is "does not exist" only after 15 s
        out = await run_grpc_client(bootstrap(xds.port, namespace), PROBE, METHOD, *targets, timeout=90)
        result = json.loads(out)
        assert result[targets[0]] == "OK"
        assert result[targets[1]] == ("OK" if sees_shop else "UNAVAILABLE"), result
