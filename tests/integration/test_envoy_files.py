"""ServiceEntry file → files adapter → index → xDS → real Envoy → real HTTP traffic, by editing the file."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from adapters.files import FilesConfig, FilesRegistry
from discoveryd.index import Index
from discoveryd.model import SourceId
from discoveryd.registry import AdapterContext
from tests.fakes.xds import cluster, http_backend, run_envoy, start_xds, stop
from tests.helpers import eventually

pytestmark = pytest.mark.integration

ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: web
  namespace: default
spec:
  hosts: [web.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {{number: 8080, name: http, protocol: HTTP}}
  endpoints:
    - address: 127.0.0.1
      ports: {{http: {port}}}
"""


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_editing_a_serviceentry_file_moves_envoy_traffic(tmp_path: Path, api_type: str) -> None:
    entries = tmp_path / "serviceentries"
    entries.mkdir()
    index = Index()
    source = SourceId("files/test")
    registry = FilesRegistry(FilesConfig(kind="files", name="test", paths=[str(entries)]), AdapterContext(tmp_path))
    async with http_backend("alpha") as alpha, http_backend("beta") as beta:
        (entries / "web.yaml").write_text(ENTRY.format(port=alpha))
        adapter = asyncio.create_task(registry.run(index.writer(source)))
        server, serving = await start_xds(index)
        try:
            async with run_envoy(tmp_path, server.ports[0], api_type, route_to=cluster("web.test")) as envoy:

                async def answers(name: str) -> bool:
                    return (await envoy.request()) == (200, name)

                await eventually(lambda: answers("alpha"), timeout=20, what="traffic to the file's endpoint")
                (entries / "web.yaml").write_text(ENTRY.format(port=beta))
                await eventually(lambda: answers("beta"), timeout=20, what="traffic follows the edited file")
                (entries / "web.yaml").unlink()

                async def gone() -> bool:
                    return cluster("web.test") not in await envoy.get("/clusters")

                await eventually(gone, timeout=20, what="cluster removed with the file")
        finally:
            await stop(serving)
            adapter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await adapter
