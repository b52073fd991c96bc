"""Files registry: time from a ServiceEntry file write to the index version that holds it.

The real `FilesRegistry` runs against a real `Index` over a temporary
directory that holds `--others` unrelated ServiceEntry files (each event
re-lists the directory, so its size matters). One file is then rewritten
`--writes` times, each time with a new endpoint address, in one of two ways:
in place (`write`) and as an editor does (`replace`: write a temporary file,
rename it over the original). Latency is from just before the write to the
`created` time of the first snapshot holding the new address.

    python -m bench files [--writes=100] [--others=0,500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.files import FilesConfig, FilesRegistry
from bench.common import median, percentile, table, write_results
from discoveryd.index import Index
from discoveryd.model import Hostname, SourceId
from discoveryd.registry import AdapterContext

HOST = Hostname("bench.example.internal")


def service_entry(name: str, host: str, address: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
        "  ports: [{number: 8080, name: http, protocol: HTTP}]\n"
        f"  endpoints:\n    - {{address: {address}, locality: r1/z1}}\n    - {{address: 10.255.0.1, locality: r1/z2}}\n"
    )


def _address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


async def _measure(directory: Path, others: int, writes: int, mode: str) -> list[float]:
    for i in range(others):
        (directory / f"other-{i:05d}.yaml").write_text(
            service_entry(f"other-{i}", f"other-{i}.bench.internal", "10.9.0.1")
        )
    target = directory / "bench.yaml"
    target.write_text(service_entry("bench", HOST, _address(0)))

    index = Index()
    config = FilesConfig(kind="files", name="bench", paths=[str(directory)])
    registry = FilesRegistry(config, AdapterContext(directory))
    task = asyncio.create_task(registry.run(index.writer(SourceId("files/bench"))))
    latencies: list[float] = []
    try:
        while not index.snapshot.ready or HOST not in index.snapshot.services:
            await index.wait(index.snapshot.version)
        for n in range(1, writes + 1):
            want = _address(n)
            text = service_entry("bench", HOST, want)
            version = index.snapshot.version
            start = time.monotonic()
            if mode == "replace":
                temp = directory / ".bench.yaml.tmp"
                temp.write_text(text)
                os.replace(temp, target)
            else:
                target.write_text(text)
            while True:
                snapshot = await asyncio.wait_for(index.wait(version), timeout=10)
                version = snapshot.version
                svc = snapshot.services.get(HOST)
                if svc is not None and any(ep.address == want for ep in svc.endpoints):
                    latencies.append(snapshot.created - start)
                    break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return latencies


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench files", description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--others", default="0,500", help="comma-separated counts of unrelated files in the directory")
    args = parser.parse_args(argv)
    others_counts = [int(x) for x in args.others.split(",") if x]

    rows: list[list[Any]] = []
    figures: dict[str, Any] = {"writes": args.writes}
    for others in others_counts:
        for mode in ("write", "replace"):
            with tempfile.TemporaryDirectory(prefix="files-bench-") as tmp:
                latencies = asyncio.run(_measure(Path(tmp), others, args.writes, mode))
            ms = [x * 1000 for x in latencies]
            key = f"{mode}_others_{others}"
            figures[key] = {
                "median_ms": round(median(ms), 1),
                "p99_ms": round(percentile(ms, 99), 1),
                "max_ms": round(max(ms), 1),
            }
            rows.append([others + 1, mode, len(ms), f"{median(ms):.1f}", f"{percentile(ms, 99):.1f}", f"{max(ms):.1f}"])
    print(table(rows, ["files in dir", "write", "n", "median ms", "p99 ms", "max ms"]))
    command = "python -m bench files " + " ".join(argv)
    path = write_results("files", figures, command.strip())
    print(f"results: {path}")
