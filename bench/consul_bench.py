"""The Consul registry against the fake Consul agent, which runs in a process of its own on loopback.

- sync: `--services` services x `--instances` instances registered before
  the registry starts → time until the datacenter's part is synced, and
  this process's resident memory before, after and at peak;
- latency: `--samples` times, one instance's check flipped (passing ↔
  warning, weight 1 ↔ 2) through `PUT /v1/catalog/register` → time from
  sending the PUT until the index publishes the version holding the new
  weight (median, p99); the PUT's own round trip is reported alongside (the
  fake's share), and per sample the difference ("ours": from the fake's
  answer to the PUT until the new index version, which includes the fake
  answering the blocking query);
- load: requests the agent receives per minute while nothing changes
  (`--quiet` seconds, with `--wait` as the blocking queries' wait), and
  while `--churn` random checks flip per second (`--churn-seconds`).

    python -m bench consul                               # 1000 x 10, 200 samples
    python -m bench consul --services=200 --samples=50   # quicker
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from adapters.consul import ConsulConfig, ConsulRegistry
from bench.common import median, percentile, rss_bytes, table, write_results
from discoveryd.index import Index
from discoveryd.model import Hostname
from tests.helpers import free_port

_SERVE = """
import asyncio, sys
from tests.fakes.consul import FakeConsul

async def main(port, services, instances):
    fake = FakeConsul()
    fake.port = port
    for s in range(services):
        for i in range(instances):
            n = s * instances + i
            fake.register(
                f"svc-{s}", f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 8080,
                node=f"node-{n}", service_id=f"svc-{s}-{i}", tags=["v1"], meta={"protocol": "http"},
                weights={"Passing": 1, "Warning": 2},
            )
    await fake.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


def _args(argv: list[str]) -> dict[str, float]:
    opts = {
        "services": 1000.0,
        "instances": 10.0,
        "samples": 200.0,
        "wait": 10.0,
        "quiet": 60.0,
        "churn": 20.0,
        "churn-seconds": 30.0,
    }
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts:
            sys.exit(f"unknown option {arg!r}; known: {', '.join('--' + k for k in opts)}")
        opts[key] = float(value)
    return opts


@contextlib.asynccontextmanager
async def _fake_agent(services: int, instances: int) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVE, str(port), str(services), str(instances), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 600)
        if line.strip() != b"ready":
            raise RuntimeError("the fake agent did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


async def _requests(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/v1/fake/requests") as r:
        doc = await r.json()
    return sum(v for k, v in doc["requests"].items() if k != "/v1/fake/requests")


async def _register(session: aiohttp.ClientSession, url: str, s: int, i: int, instances: int, status: str) -> None:
    n = s * instances + i
    body = {
        "Node": f"node-{n}",
        "Address": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
        "Service": {
            "Service": f"svc-{s}",
            "ID": f"svc-{s}-{i}",
            "Port": 8080,
            "Tags": ["v1"],
            "Meta": {"protocol": "http"},
            "Weights": {"Passing": 1, "Warning": 2},
        },
        "Check": {"CheckID": f"service:svc-{s}-{i}", "Status": status, "ServiceID": f"svc-{s}-{i}"},
    }
    async with session.put(url + "/v1/catalog/register", data=json.dumps(body)) as r:
        r.raise_for_status()


async def _run(opts: dict[str, float]) -> dict[str, Any]:
    services, instances = int(opts["services"]), int(opts["instances"])
    async with _fake_agent(services, instances) as url, aiohttp.ClientSession() as session:
        config = ConsulConfig.model_validate(
            {"kind": "consul", "name": "bench", "address": url, "wait": f"{opts['wait']}s"}
        )
        index = Index()
        registry = ConsulRegistry(config, Path("."))
        rss_before = rss_bytes()
        requests_before = await _requests(session, url)
        started = time.perf_counter()
        task = asyncio.create_task(registry.run(index.writer(config.source)))
        try:
            while not index.snapshot.ready:
                await index.wait(index.snapshot.version)
            sync_s = time.perf_counter() - started
            rss_after = rss_bytes()
            assert len(index.snapshot.services) == services
            sync_requests = await _requests(session, url) - requests_before

            # Latency: flip one instance's check; the weight moves between 1 and 2.
            latencies, puts = [], []
            rng = random.Random(7)
            for k in range(int(opts["samples"])):
                s, i = rng.randrange(services), rng.randrange(instances)
                host = Hostname(f"svc-{s}.service.dc1.consul")
                address = f"10.{(s * instances + i) // 65536 % 256}.{(s * instances + i) // 256 % 256}."
                address += str((s * instances + i) % 256)
                svc = index.snapshot.services[host]
                current = next(ep.weight for ep in svc.endpoints if ep.address == address)
                want = 1 if current == 2 else 2
                t0 = time.perf_counter()
                await _register(session, url, s, i, instances, "warning" if want == 2 else "passing")
                puts.append(time.perf_counter() - t0)
                while True:
                    svc = index.snapshot.services[host]
                    if next(ep.weight for ep in svc.endpoints if ep.address == address) == want:
                        break
                    await index.wait(index.snapshot.version)
                latencies.append(time.perf_counter() - t0)
                if k % 50 == 0:
                    await asyncio.sleep(0.05)

            # Load at steady state: nothing changes for `quiet` seconds.
            await asyncio.sleep(1.0)
            before = await _requests(session, url)
            await asyncio.sleep(opts["quiet"])
            quiet_rpm = (await _requests(session, url) - before) * 60 / opts["quiet"]

            # Load during churn: `churn` random check flips per second.
            before = await _requests(session, url)
            flips, deadline = 0, time.monotonic() + opts["churn-seconds"]
            while time.monotonic() < deadline:
                tick = time.monotonic()
                batch = [(rng.randrange(services), rng.randrange(instances)) for _ in range(int(opts["churn"]))]
                await asyncio.gather(
                    *(_register(session, url, s, i, instances, rng.choice(["passing", "warning"])) for s, i in batch)
                )
                flips += len(batch)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            churn_requests = await _requests(session, url) - before
            churn_rpm = churn_requests * 60 / opts["churn-seconds"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ours = [total - put for total, put in zip(latencies, puts, strict=True)]
    return {
        "services": services,
        "instances_per_service": instances,
        "sync_s": round(sync_s, 3),
        "sync_requests": sync_requests,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_sync_mb": round(rss_after / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "latency_median_ms": round(median(latencies) * 1000, 2),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "ours_median_ms": round(median(ours) * 1000, 2),
        "ours_p99_ms": round(percentile(ours, 99) * 1000, 2),
        "put_median_ms": round(median(puts) * 1000, 2),
        "put_p99_ms": round(percentile(puts, 99) * 1000, 2),
        "samples": len(latencies),
        "wait_s": opts["wait"],
        "steady_requests_per_min": round(quiet_rpm, 1),
        "steady_requests_per_min_per_watch": round(quiet_rpm / (services + 1), 2),
        "churn_flips_per_s": round(flips / opts["churn-seconds"], 1),
        "churn_requests_per_min": round(churn_rpm, 1),
    }


def main(argv: list[str]) -> None:
    opts = _args(argv)
    figures = _run_sync(opts)
    rows = [[k, v] for k, v in figures.items()]
    print(table(rows, ["figure", "value"]))
    path = write_results("consul", figures, "python -m bench consul " + " ".join(argv))
    print(f"results: {path}")


def _run_sync(opts: dict[str, float]) -> dict[str, Any]:
    return asyncio.run(_run(opts))


if __name__ == "__main__":
    main(sys.argv[1:])
