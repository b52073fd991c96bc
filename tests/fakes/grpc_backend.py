"""A loopback gRPC backend and the bootstrap of grpcio's xDS client, for the tests that drive it through discoveryd."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import grpc

METHOD = "/test.Who/Name"


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
