"""A loopback gRPC backend and the bootstrap of grpcio's xDS client, for the tests that drive it through discoveryd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator

import grpc

METHOD = "/test.Who/Name"

# Makes `count` calls with the given metadata (a JSON object) and prints how many each backend answered,
# and the status codes of failed calls.
COUNTING_CLIENT = """
import collections, json, sys
import grpc

target, method, count, metadata = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
seen = collections.Counter()
with grpc.insecure_channel(f"xds:///{target}") as channel:
    call = channel.unary_unary(method)
    for _ in range(count):
        try:
            seen[call(b"", timeout=20, wait_for_ready=True, metadata=list(metadata.items())).decode()] += 1
        except grpc.RpcError as e:
            seen["status:" + e.code().name] += 1
print(json.dumps(seen), flush=True)
"""


@contextlib.asynccontextmanager
async def grpc_server(handlers: list[grpc.GenericRpcHandler]) -> AsyncIterator[int]:
    """A loopback gRPC server with `handlers`; yields its port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def grpc_backend(name: str) -> AsyncIterator[int]:
    """A loopback gRPC server whose one method answers with `name`; yields its port."""

    async def handle(_: bytes, __: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return name.encode()

    handler = grpc.unary_unary_rpc_method_handler(handle)
    service, method = METHOD.strip("/").split("/")
    async with grpc_server([grpc.method_handlers_generic_handler(service, {method: handler})]) as port:
        yield port


def bootstrap(
    xds_port: int, namespace: str | None = None, node_id: str = "grpc-client", locality: dict[str, str] | None = None
) -> str:
    node: dict[str, object] = {"id": node_id, "cluster": "integration"}
    if locality is not None:
        node["locality"] = locality
    if namespace is not None:
        node["metadata"] = {"NAMESPACE": namespace}
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": f"127.0.0.1:{xds_port}",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": node,
        }
    )


async def run_grpc_client(xds_bootstrap: str, code: str, *args: str, timeout: float = 120) -> bytes:
    """Run `code` in a Python subprocess with grpcio's xDS bootstrap `xds_bootstrap` and `args` as its argv;
    asserts it exits 0 within `timeout` seconds (killed otherwise) and returns its stdout."""
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": xds_bootstrap}
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    return out


async def count_calls(
    xds_bootstrap: str, target: str, method: str, count: int, metadata: dict[str, str], timeout: float = 120
) -> dict[str, int]:
    """`count` calls of `method` on xds:///`target` with `metadata` from grpcio's xDS client (COUNTING_CLIENT
    in a subprocess): how many each backend answered, and `status:<code>` counts of failed calls."""
    out = await run_grpc_client(
        xds_bootstrap, COUNTING_CLIENT, target, method, str(count), json.dumps(metadata), timeout=timeout
    )
    seen: dict[str, int] = json.loads(out)
    return seen
