"""Files registry: time from a ServiceEntry file write to the index version that holds it.

The real `FilesRegistry` runs against a real `Index` over a temporary
directory that holds `--others` unrelated ServiceEntry files (each event
re-lists the directory, so its size matters). One file is then rewritten
`--writes` times, each time with a new endpoint address, in one of two ways:
in place (`write`) and as an editor does (`replace`: write a temporary file,
rename it over the original). Latency is from just before the write to the
`created` time of the first snapshot holding the new address.

Two more measurements of large files (issue 8 item 8):
- `--big-file N` (default 1000): one file of N ServiceEntries; one entry in
  the middle is edited (atomic replace) `--writes` times; latency as above,
  and to the first DNS answer with the entry's new VIP (dnspython over UDP
  to a `DnsServer` on loopback that follows the index).
- `--parse N` (default 20000, about 15 MB): a file of N ServiceEntries read,
  parsed, validated and translated once (`FileSet.refresh()` + `result()`)
  in a child process; its wall time, CPU time (user + system: steadier than
  wall time on a shared machine) and peak RSS (the child's ru_maxrss).
  `--parse 0` skips it; `--others= --big-file=0` runs it alone.

    python -m bench files [--writes=100] [--others=0,500] [--big-file=1000] [--parse=20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message

from adapters.files import FilesConfig, FilesRegistry
from bench.common import median, percentile, table, write_results
from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.index import Index
from discoveryd.model import Hostname, SourceId, Zone
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


def rich_entry(i: int) -> str:
    """A ServiceEntry with two hosts, three ports, two labelled endpoints: about 750 bytes."""
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-{i}
  namespace: ns-{i % 50}
  labels:
    app: svc-{i}
    team: team-{i % 17}
spec:
  hosts:
    - svc-{i}.ns-{i % 50}.example.internal
    - alt-{i}.example.internal
  addresses:
    - 240.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - number: 8080
      name: http
      protocol: HTTP
    - number: 8443
      name: https
      protocol: HTTPS
    - number: 9090
      name: grpc-metrics
      protocol: GRPC
  endpoints:
    - address: {_address(i)}
      ports:
        http: 18080
      labels:
        version: v1
      locality: us-east1/us-east1-b
      weight: 10
    - address: 10.200.{i // 256 % 256}.{i % 256}
      labels:
        version: v2
      locality: us-east1/us-east1-c
  exportTo:
    - "."
    - istio-system
"""


async def _measure_big_file(directory: Path, entries: int, writes: int) -> tuple[list[float], list[float]]:
    """Edit one entry in the middle of a file of `entries` ServiceEntries (its endpoint address and
    its VIP); latencies to the index version holding it, and to the first DNS answer (dnspython over
    UDP to the daemon's `DnsServer` on loopback, following the index) carrying the new VIP."""
    middle = entries // 2
    parts = [rich_entry(i) for i in range(entries)]
    target = directory / "big.yaml"
    target.write_text("".join(parts))
    host = Hostname(f"svc-{middle}.ns-{middle % 50}.example.internal")
    index = Index()
    config = FilesConfig(kind="files", name="bench", paths=[str(directory)])
    registry = FilesRegistry(config, AdapterContext(directory))
    task = asyncio.create_task(registry.run(index.writer(SourceId("files/bench"))))
    dns_server = DnsServer(DnsConfig(listen=["127.0.0.1:0"]), index, [Zone(Hostname("example.internal"))])
    serving = asyncio.create_task(dns_server.serve())
    to_index: list[float] = []
    to_dns: list[float] = []
    old_vip = f"240.{middle // 65536 % 256}.{middle // 256 % 256}.{middle % 256}"
    try:
        while not index.snapshot.ready or host not in index.snapshot.services:
            await asyncio.wait_for(index.wait(index.snapshot.version), timeout=120)
        await asyncio.wait_for(dns_server.started.wait(), timeout=120)
        dns_host, dns_port = dns_server.addresses[0]
        query = dns.message.make_query(f"{host}.", "A")
        for n in range(1, writes + 1):
            want = f"10.250.{n // 256 % 256}.{n % 256}"
            vip = f"241.0.{n // 256 % 256}.{n % 256}"
            edited = rich_entry(middle).replace(f"address: {_address(middle)}", f"address: {want}")
            parts[middle] = edited.replace(f"- {old_vip}", f"- {vip}")
            temp = directory / ".big.yaml.tmp"
            temp.write_text("".join(parts))
            version = index.snapshot.version
            start = time.monotonic()
            os.replace(temp, target)
            while True:
                snapshot = await asyncio.wait_for(index.wait(version), timeout=120)
                version = snapshot.version
                svc = snapshot.services.get(host)
                if svc is not None and any(ep.address == want for ep in svc.endpoints):
                    to_index.append(snapshot.created - start)
                    break
            deadline = time.monotonic() + 60
            while True:
                reply = await dns.asyncquery.udp(query, dns_host, port=dns_port, timeout=5)
                if any(rr.address == vip for rrset in reply.answer for rr in rrset):
                    to_dns.append(time.monotonic() - start)
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DNS never answered {vip} for {host}")
                await asyncio.sleep(0.0005)
    finally:
        for t in (task, serving):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return to_index, to_dns


_PARSE_CHILD = """
import json, resource, sys, time
from adapters.files.registry import FileSet
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, cpu_start = time.perf_counter(), cpu()
files = FileSet((sys.argv[1],), "default")
files.refresh()
services, problems = files.result()
elapsed, cpu_used = time.perf_counter() - start, cpu() - cpu_start
print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu_used, "services": len(services),
                  "problems": sum(map(len, problems.values())),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _measure_parse(entries: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="files-bench-parse-") as tmp:
        path = Path(tmp) / "big.yaml"
        with path.open("w") as f:
            for i in range(entries):
                f.write(rich_entry(i))
        size = path.stat().st_size
        out = subprocess.run(
            [sys.executable, "-c", _PARSE_CHILD, str(path)], check=True, capture_output=True, text=True
        ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["file_mb"] = round(size / 2**20, 1)
    result["load_average"] = os.getloadavg()[0]
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench files", description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--others", default="0,500", help="comma-separated counts of unrelated files in the directory")
    parser.add_argument("--big-file", type=int, default=1000, help="ServiceEntries in the edited big file (0: skip)")
    parser.add_argument("--parse", type=int, default=20000, help="ServiceEntries in the parsed file (0: skip)")
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
    if args.big_file:
        with tempfile.TemporaryDirectory(prefix="files-bench-big-") as tmp:
            to_index, to_dns = asyncio.run(_measure_big_file(Path(tmp), args.big_file, args.writes))
        big_rows = []
        for what, seconds in (("index", to_index), ("DNS answer", to_dns)):
            ms = [x * 1000 for x in seconds]
            key = f"edit_one_of_{args.big_file}" + ("" if what == "index" else "_to_dns")
            figures[key] = {
                "median_ms": round(median(ms), 1),
                "p99_ms": round(percentile(ms, 99), 1),
                "max_ms": round(max(ms), 1),
            }
            big_rows.append([what, f"{median(ms):.1f}", f"{percentile(ms, 99):.1f}", f"{max(ms):.1f}"])
        figures["load_average"] = os.getloadavg()[0]
        print(f"\nedit one ServiceEntry of a {args.big_file}-entry file ({len(to_index)} edits):")
        print(table(big_rows, ["to", "median ms", "p99 ms", "max ms"]))
    if args.parse:
        parsed = _measure_parse(args.parse)
        figures[f"parse_{args.parse}"] = parsed
        print(f"\nread + parse + validate + translate one file of {args.parse} ServiceEntries:")
        print(
            table(
                [
                    [
                        parsed["file_mb"],
                        f"{parsed['seconds']:.2f}",
                        f"{parsed['cpu_seconds']:.2f}",
                        f"{parsed['peak_rss_mb']:.0f}",
                        parsed["services"],
                    ]
                ],
                ["file MB", "wall s", "CPU s", "peak RSS MB", "services"],
            )
        )
    command = "python -m bench files " + " ".join(argv)
    path = write_results("files", figures, command.strip())
    print(f"results: {path}")
