"""End to end from a ServiceEntry file on disk to a DNS answer: edit the file, the next answers follow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.rcode

from adapters.files import FilesConfig, FilesRegistry
from discoveryd.index import Index
from discoveryd.model import SourceId
from discoveryd.registry import AdapterContext
from tests.fakes.dns import ask, rrs, running
from tests.helpers import eventually


def service_entry(addresses: list[str]) -> str:
    endpoints = "\n".join(f"    - address: {ip}" for ip in addresses)
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: billing
spec:
  hosts: [billing.internal.example]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {{number: 8080, name: http, protocol: HTTP}}
  endpoints:
{endpoints}
"""


async def test_editing_a_service_entry_file_changes_the_answer(tmp_path: Path, index: Index) -> None:
    entries = tmp_path / "serviceentries"
    entries.mkdir()
    path = entries / "billing.yaml"
    path.write_text(service_entry(["10.20.0.1", "10.20.0.2"]))
    config = FilesConfig(kind="files", name="local", paths=["serviceentries/"])
    registry = FilesRegistry(config, AdapterContext(tmp_path))
    adapter = asyncio.create_task(registry.run(index.writer(SourceId("files/local"))))
    try:
        async with running(index) as srv:

            def answers(want: list[str]) -> Callable[[], Awaitable[bool]]:
                async def probe() -> bool:
                    return rrs((await ask(srv, "billing.internal.example.", "A")).answer) == want

                return probe

            async def srv_answer() -> list[str]:
                return rrs((await ask(srv, "_http._tcp.billing.internal.example.", "SRV", "tcp")).answer)

            async def refused() -> bool:
                return (await ask(srv, "billing.internal.example.", "A")).rcode() == dns.rcode.REFUSED

            both = ["billing.internal.example. 30 IN A 10.20.0.1", "billing.internal.example. 30 IN A 10.20.0.2"]
            await eventually(answers(both), timeout=10, what="file content answered")
            assert len(await srv_answer()) == 2
            path.write_text(service_entry(["10.20.0.9"]))
            await eventually(
                answers(["billing.internal.example. 30 IN A 10.20.0.9"]), timeout=10, what="edited file answered"
            )
            assert await srv_answer() == [
                "_http._tcp.billing.internal.example. 30 IN SRV 0 1 8080 10-20-0-9.billing.internal.example."
            ]
            path.unlink()
            await eventually(refused, timeout=10, what="removed host no longer ours")
    finally:
        adapter.cancel()
        await asyncio.gather(adapter, return_exceptions=True)
