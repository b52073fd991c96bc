"""A loopback gRPC backend and the bootstrap of grpcio's xDS client, for the tests that drive it through discoveryd."""

from __future__ import annotations

import contextlib
import json
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


def bootstrap(xds_port: int, namespace: str | None = None) -> str:
    node: dict[str, object] = {"id": "grpc-client", "cluster": "integration"}
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
