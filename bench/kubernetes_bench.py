"""The Kubernetes registry against the fake API server (tests/fakes/kubernetes.py) in another process.

- initial sync: `--services` Services with `--endpoints` endpoints in one
  EndpointSlice per Service, stored before the registry starts → time from
  start until the part is synced with every Service, and this process's
  resident memory before and after (the index included);
- update throughput: the server applies `--updates` EndpointSlice changes
  (one endpoint's readiness flips) as fast as it can → changes per second
  until the last is in the index, and how many index versions that took;
- latency: one change at a time, `--samples` times → time from the server
  applying it until the index publishes it, and until a DNS query to a
  DnsServer over that index (dnspython, UDP, loopback) answers it (median,
  p99); the server stamps each change with `time.monotonic()`, which is
  the same clock in both processes on Linux;
- raw JSON vs generated models: a list of `--parse` EndpointSlices and the
  watch events for them parsed with orjson (what the registry does) and
  deserialized into the official client's models.

    python -m bench kubernetes                       # 5k services, 50k endpoints
    python -m bench kubernetes --services=500 --endpoints=5000 --updates=1000 --samples=100
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import orjson

from bench.common import median, percentile, rss_bytes, table, write_results

ZONE = "cluster.local"


def _ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def _slice(i: int, per: int, *, flip: int | None = None, flipped: bool = False) -> dict[str, Any]:
    from tests.fakes.kubernetes import endpoint, endpoint_slice

    eps = [
        endpoint(
            _ip(i * per + j), zone=f"z{j % 3}", node=f"node-{(i * per + j) % 500}", pod=f"s{i}-{j}", namespace="bench"
        )
        for j in range(per)
    ]
    if flip is not None:
        eps[flip]["conditions"]["ready"] = not flipped
    return endpoint_slice(f"s{i}", eps, namespace="bench", name=f"s{i}-abcde")


# -- the server process ----------------------------------------------------------------------


def serve(services: int, per: int) -> None:
    """Child: the fake API server with the cluster loaded; commands on stdin, answers on stdout.

    `burst N`: flip N endpoints' readiness as fast as possible (one slice change each), print `done <last>`;
    `one K`: flip one endpoint of slice K, print the monotonic time it was applied.
    """
    from tests.fakes.kubernetes import FakeApiServer, service

    async def main() -> None:
        fake = FakeApiServer(bookmark_interval=30)
        for i in range(services):
            fake.apply(
                "services", service(f"s{i}", "bench", cluster_ips=["None"], ports=[{"name": "http", "port": 80}])
            )
            fake.apply("endpointslices", _slice(i, per), copy_obj=False)
        await fake.start()
        print(fake.port, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        flips = [False] * services
        while line := (await reader.readline()).decode().split():
            if line[0] == "burst":
                count = int(line[1])
                began = time.monotonic()
                for n in range(count):
                    k = n % services
                    flips[k] = not flips[k]
                    fake.apply("endpointslices", _slice(k, per, flip=0, flipped=flips[k]), copy_obj=False)
                    if n % 200 == 199:
                        await asyncio.sleep(0)  # let the watch handler write, as a real server interleaves
                took = time.monotonic() - began
                print(f"done {(count - 1) % services} {flips[(count - 1) % services]} {took:.6f}", flush=True)
            elif line[0] == "one":
                k = int(line[1])
                flips[k] = not flips[k]
                fake.apply("endpointslices", _slice(k, per, flip=0, flipped=flips[k]), copy_obj=False)
                print(f"{time.monotonic():.9f} {flips[k]}", flush=True)
        await fake.stop()

    asyncio.run(main())


# -- the measuring side --------------------------------------------------------------------------


def _args(argv: list[str]) -> dict[str, int]:
    opts = {"services": 5000, "endpoints": 50_000, "updates": 5000, "samples": 300, "parse": 5000}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts:
            sys.exit(f"unknown option {arg}; known: {', '.join('--' + k for k in opts)}")
        opts[key] = int(value)
    return opts


async def _measure(opts: dict[str, int], figures: dict[str, Any]) -> None:
    from adapters.kubernetes import KubernetesConfig, KubernetesRegistry
    from discoveryd.config import DnsConfig
    from discoveryd.dns import DnsServer
    from discoveryd.index import Index
    from discoveryd.model import Health, Hostname, Zone, ZoneFlavor
    from tests.fakes.kubernetes import kubeconfig

    services, per = opts["services"], max(1, opts["endpoints"] // opts["services"])
    child = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, started once before measuring
        [sys.executable, "-m", "bench.kubernetes_bench", "--serve", str(services), str(per)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    loop = asyncio.get_running_loop()

    async def ask(command: str) -> str:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return await loop.run_in_executor(None, child.stdout.readline)

    try:
        port = int(await loop.run_in_executor(None, child.stdout.readline))

        class _Server:
            url = f"http://127.0.0.1:{port}"
            token = None

        tmp = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
        (tmp / "kubeconfig").write_text(kubeconfig(_Server()))  # type: ignore[arg-type]
        config = KubernetesConfig(kind="kubernetes", name="bench", kubeconfig=tmp / "kubeconfig")
        gc.collect()
        before = rss_bytes()
        index = Index()
        registry = KubernetesRegistry(config, tmp)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        task = asyncio.create_task(registry.run(index.writer(config.source)))
        while not (index.snapshot.ready and len(index.snapshot.services) == services):
            await index.wait(index.snapshot.version)
        sync = time.monotonic() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        figures["initial_sync_cpu_s"] = round(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime, 3)
        figures["load_average"] = os.getloadavg()[0]
        gc.collect()
        after = rss_bytes()
        endpoints = index.snapshot.endpoint_count()
        figures["initial_sync_s"] = round(sync, 3)
        figures["rss_before_mib"] = round(before / 2**20, 1)
        figures["rss_after_mib"] = round(after / 2**20, 1)
        figures["rss_added_mib"] = round((after - before) / 2**20, 1)
        figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        figures["endpoints"] = endpoints

        # Update throughput: a burst of slice changes, until the last one is in the index.
        count = opts["updates"]
        version0 = index.snapshot.version
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        done = (await ask(f"burst {count}")).split()
        last_k, last_flipped = int(done[1]), done[2] == "True"
        host = Hostname(f"s{last_k}.bench.svc.{ZONE}")
        want = Health.UNHEALTHY if last_flipped else Health.HEALTHY
        first_ip = _ip(last_k * per)

        def applied() -> bool:
            svc = index.snapshot.services.get(host)
            return svc is not None and any(e.address == first_ip and e.health is want for e in svc.endpoints)

        while not applied():
            await index.wait(index.snapshot.version)
        elapsed = time.monotonic() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        burst_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        figures["updates_per_cpu_s"] = round(count / burst_cpu) if burst_cpu > 0 else None
        figures["updates"] = count
        figures["updates_per_s"] = round(count / elapsed)
        figures["writer_alone_per_s"] = round(count / float(done[3]))
        figures["update_versions"] = index.snapshot.version - version0

        # Latency: one change at a time, to the index version and to the DNS answer.
        dns_port = _free_port()
        server = DnsServer(
            DnsConfig(listen=[f"127.0.0.1:{dns_port}"]), index, [Zone(Hostname(ZONE), ZoneFlavor.KUBERNETES)]
        )
        serving = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.started.wait(), 120)  # it listens once its first record build is done
        to_index: list[float] = []
        to_dns: list[float] = []
        try:
            for n in range(opts["samples"]):
                k = (n * 7919) % services
                name = f"s{k}.bench.svc.{ZONE}."
                host = Hostname(name[:-1])
                ip = _ip(k * per)
                reply = (await ask(f"one {k}")).split()
                stamp, flipped = float(reply[0]), reply[1] == "True"
                want = Health.UNHEALTHY if flipped else Health.HEALTHY
                seen_index = None
                while True:
                    svc = index.snapshot.services.get(host)
                    if (
                        seen_index is None
                        and svc is not None
                        and any(e.address == ip and e.health is want for e in svc.endpoints)
                    ):
                        seen_index = time.monotonic()
                    if seen_index is not None:
                        answer = await dns.asyncquery.udp(
                            dns.message.make_query(name, dns.rdatatype.A), "127.0.0.1", port=dns_port, timeout=2
                        )
                        ips = {rd.to_text() for rr in answer.answer for rd in rr}
                        if (ip in ips) != flipped:
                            to_dns.append(time.monotonic() - stamp)
                            to_index.append(seen_index - stamp)
                            break
                    else:
                        await asyncio.sleep(0.0005)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        figures["event_to_index_ms"] = {
            "median": round(median(to_index) * 1000, 2),
            "p99": round(percentile(to_index, 99) * 1000, 2),
        }
        figures["event_to_dns_ms"] = {
            "median": round(median(to_dns) * 1000, 2),
            "p99": round(percentile(to_dns, 99) * 1000, 2),
        }
        figures["samples"] = len(to_dns)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if child.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _free_port() -> int:
    from tests.helpers import free_port

    return free_port()


def _parse(figures: dict[str, Any], count: int) -> None:
    """orjson into dicts (what the registry does) vs the official client's generated models."""
    from kubernetes.aio import client

    from adapters.kubernetes.mapping import parse_slice

    items = []
    for i in range(count):
        s = _slice(i, 10)
        s["metadata"]["resourceVersion"] = str(i + 2)
        items.append(s)
    body = json.dumps(
        {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {}, "items": items}
    )
    lines = [json.dumps({"type": "MODIFIED", "object": s}).encode() for s in items]
    api = client.ApiClient()

    def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(3):
            gc.collect()
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    raw_list = timed(lambda: [parse_slice(s) for s in orjson.loads(body)["items"]])
    model_list = timed(lambda: api.deserialize(body, "V1EndpointSliceList", "application/json"))
    raw_events = timed(lambda: [parse_slice(orjson.loads(line)["object"]) for line in lines])
    model_events = timed(
        lambda: [
            api.deserialize(json.dumps(json.loads(line)["object"]), "V1EndpointSlice", "application/json")
            for line in lines
        ]
    )
    figures["parse"] = {
        "slices": count,
        "list_raw_ms": round(raw_list * 1000, 1),
        "list_models_ms": round(model_list * 1000, 1),
        "events_raw_ms": round(raw_events * 1000, 1),
        "events_models_ms": round(model_events * 1000, 1),
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), int(argv[2]))
        return
    opts = _args(argv)
    figures: dict[str, Any] = {"options": opts}
    _parse(figures, opts["parse"])
    asyncio.run(_measure(opts, figures))
    p = figures["parse"]
    rows = [
        [
            "initial sync",
            f"{figures['initial_sync_s']} s, {figures['initial_sync_cpu_s']} s CPU in this process"
            f" ({opts['services']} services, {figures['endpoints']} endpoints; load average {figures['load_average']})",
        ],
        [
            "RSS before / after / added",
            f"{figures['rss_before_mib']} / {figures['rss_after_mib']} / {figures['rss_added_mib']} MiB",
        ],
        [
            "update throughput",
            f"{figures['updates_per_s']} slice changes/s"
            f" ({figures['updates']} → {figures['update_versions']} versions);"
            f" the fake server alone: {figures['writer_alone_per_s']}/s;"
            f" {figures['updates_per_cpu_s']} changes per CPU-second in this process",
        ],
        [
            "event → index version",
            f"median {figures['event_to_index_ms']['median']} ms, p99 {figures['event_to_index_ms']['p99']} ms",
        ],
        [
            "event → DNS answer",
            f"median {figures['event_to_dns_ms']['median']} ms, p99 {figures['event_to_dns_ms']['p99']} ms"
            f" ({figures['samples']} samples)",
        ],
        [
            "parse list of slices: orjson / models",
            f"{p['list_raw_ms']} / {p['list_models_ms']} ms ({p['slices']} slices)",
        ],
        ["parse watch events: orjson / models", f"{p['events_raw_ms']} / {p['events_models_ms']} ms"],
    ]
    print(table(rows, ["what", "figure"]))
    command = "python -m bench kubernetes " + " ".join(argv)
    print(write_results("kubernetes", figures, command.strip()))


if __name__ == "__main__":
    main(sys.argv[1:])
    os._exit(0)
