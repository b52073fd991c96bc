"""How long each adapter's full sync holds the event loop: one `replace()` call, or `replace_in_steps()`.

For each adapter the sync path alone runs over a large world, prepared first
(not measured) as the adapter prepares it:

- kubernetes: `--services` Services with one EndpointSlice each, fed to the
  `services` part's view as its reflectors do, then the coalescer's first flush;
- kubernetes-istio: ServiceEntries of 50 hosts (`--services` hosts in all) in
  the `istio` part's view, translated, then its first flush;
- files: the same ServiceEntries in 10 YAML files, read and translated
  (`FileSet.refresh`, in a worker thread in the registry), then the first
  publication;
- consul: one datacenter's `--services` health watches, each with its
  service built, then the sync that follows their first reads.

Each runs in a child process of its own (a fresh heap), once with the index's
writer ("steps") and once with a writer that hides `replace_in_steps` (the
adapters then call `replace()`, as before it existed). A ticker task on the
loop measures the longest gap between two of its turns, in wall time and in
CPU time of the loop thread (other processes' load does not count). The
cyclic garbage collector runs as in the daemon: the full collections that
fall in the window are counted (each costs what the whole heap costs), and the
longest single collection pass is shown with its generation.

    python -m bench sync_stall                      # 100k services per adapter
    python -m bench sync_stall --services=20000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LoopTicker, table, write_results

ADAPTERS = ("kubernetes", "kubernetes-istio", "files", "consul")
HOSTS_PER_ENTRY = 50


class _OneCall:
    """A shard writer without `replace_in_steps`: the adapters fall back to `replace()`."""

    def __init__(self, shard: Any) -> None:
        self._shard = shard

    def __getattr__(self, name: str) -> Any:
        if name == "replace_in_steps":
            raise AttributeError(name)
        return getattr(self._shard, name)


async def _timed(index: Any, work: Any) -> dict[str, float]:
    """Run `work()` (a coroutine function) with a ticker on the loop; the longest gaps and the totals."""
    full: list[float] = []
    passes: list[tuple[int, float]] = []  # (generation, CPU seconds) of each collection
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.thread_time()
        else:
            passes.append((info["generation"], time.thread_time() - began[0]))
            if info["generation"] == 2:
                full.append(1.0)

    version = index.snapshot.version
    ticker = LoopTicker()
    ticker.start()
    await asyncio.sleep(0)
    gc.callbacks.append(on_gc)
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        await work()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        await asyncio.sleep(0)
    finally:
        gc.callbacks.remove(on_gc)
        await ticker.stop()
    return {
        "max_stall_wall_ms": max(ticker.gaps_wall) * 1e3,
        "max_stall_cpu_ms": max(ticker.gaps_cpu) * 1e3,
        "sync_wall_s": wall,
        "sync_cpu_s": cpu,
        "yields": float(len(ticker.gaps_wall)),
        "full_collections": float(len(full)),
        "longest_collection_ms": max((t for _, t in passes), default=0.0) * 1e3,
        "longest_collection_generation": float(max(passes, key=lambda p: p[1])[0]) if passes else -1.0,
        "versions": float(index.snapshot.version - version),
        "services": float(len(index.snapshot.services)),
    }


def _entries_yaml(n_hosts: int) -> list[str]:
    entries = max(1, n_hosts // HOSTS_PER_ENTRY)
    docs = []
    for i in range(entries):
        names = ", ".join(f"h{i}-{k}.bench.internal" for k in range(HOSTS_PER_ENTRY))
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: e{i}, namespace: ns{i % 20}}}\n"
            f"spec: {{hosts: [{names}], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: DNS}}\n"
        )
    return docs


async def _run(adapter: str, n: int, steps: bool) -> dict[str, float]:
    from discoveryd.index import Index
    from discoveryd.model import SourceId

    index = Index()

    def writer(source: SourceId, part: str | None = None) -> Any:
        shard = index.writer(source)
        if part is not None:
            shard = shard.part(part)
        return shard if steps else _OneCall(shard)

    if adapter == "kubernetes":
        from adapters.kubernetes import KubernetesConfig
        from adapters.kubernetes.registry import SERVICES_PART, _ServiceView
        from tests.fakes.kubernetes import endpoint, endpoint_slice, service

        config = KubernetesConfig.model_validate({"kind": "kubernetes", "name": "bench"})
        view = _ServiceView(config, writer(config.source, SERVICES_PART))
        view.expected = {"services", "endpointslices"}
        view.services_replace(None, [service(f"s{i}", f"ns{i % 50}") for i in range(n)])
        ip = "10.{}.{}.{}"
        slices = [
            endpoint_slice(f"s{i}", [endpoint(ip.format(i >> 16, i >> 8 & 255, i & 255))], namespace=f"ns{i % 50}")
            for i in range(n)
        ]
        view.slices_replace(None, slices)
        del slices
        view.listed = set(view.expected)
        return await _timed(index, view.flush)
    if adapter == "kubernetes-istio":
        import yaml

        from adapters.kubernetes.crds import ISTIO_PART, IstioView

        istio = IstioView(writer(SourceId("kubernetes/bench"), ISTIO_PART))
        istio.expected = {"serviceentries"}
        istio.replace("serviceentries", None, [yaml.safe_load(d) for d in _entries_yaml(n)])
        istio.listed = set(istio.expected)
        istio._translation.build()  # a step of its own, before the replace (see the module docstring)
        return await _timed(index, istio.flush)
    if adapter == "files":
        from adapters.files.registry import FileSet, _Publisher

        directory = Path(tempfile.mkdtemp(prefix="sync-stall-"))
        docs = _entries_yaml(n)
        for f in range(10):
            (directory / f"f{f}.yaml").write_text("---\n".join(docs[f::10]))
        files = FileSet((directory,), "default")
        files.refresh()
        publisher = _Publisher(writer(SourceId("files/bench")), files)
        return await _timed(index, publisher.publish)
    if adapter == "consul":
        from adapters.consul import ConsulConfig, ConsulRegistry
        from adapters.consul.mapping import Naming
        from adapters.consul.registry import _Datacenter, _Watch
        from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service

        config = ConsulConfig.model_validate({"kind": "consul", "name": "bench", "address": "127.0.0.1:1"})
        source = config.source
        registry = ConsulRegistry(config, Path(tempfile.gettempdir()))
        dc = _Datacenter(registry, "dc1", writer(source, "dc1"), Naming(source, "consul", "dc1"))
        ports = (Port(80, "http", PortProtocol.HTTP),)
        for i in range(n):
            watch = dc._watches[f"s{i}"] = _Watch(f"s{i}")
            ep = Endpoint(f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", ports={"http": 8080}, source=source)
            host = Hostname(f"s{i}.service.dc1.consul")
            watch.built = Service(hostname=host, ports=ports, endpoints=(ep,), source=source)
            watch.first.set()
        dc._tg = asyncio.TaskGroup()  # every service has its watch: none is started
        return await _timed(index, lambda: dc._reconcile(frozenset(dc._watches)))
    raise SystemExit(f"unknown adapter {adapter}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(asyncio.run(_run(argv[1], int(argv[2]), argv[3] == "steps"))))
        return
    parser = argparse.ArgumentParser(prog="python -m bench sync_stall")
    parser.add_argument("--services", type=int, default=100_000)
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    opts = parser.parse_args(argv)
    figures: dict[str, Any] = {"services": opts.services}
    rows = []
    for adapter in opts.adapters.split(","):
        for mode in ("one call", "steps"):
            child = [sys.executable, "-m", "bench.sync_stall_bench", "--child", adapter, str(opts.services)]
            proc = subprocess.run([*child, "steps" if mode == "steps" else "call"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["loadavg_1m"] = os.getloadavg()[0]
            figures.setdefault(adapter, {})[mode] = r
            rows.append(
                [
                    adapter,
                    "replace()" if mode == "one call" else "replace_in_steps()",
                    f"{r['max_stall_wall_ms']:.1f} / {r['max_stall_cpu_ms']:.1f}",
                    f"{r['sync_wall_s']:.2f} / {r['sync_cpu_s']:.2f}",
                    f"{r['yields']:.0f}",
                    f"{r['full_collections']:.0f}",
                    f"{r['longest_collection_ms']:.1f} (gen {r['longest_collection_generation']:.0f})",
                    f"{r['versions']:.0f}",
                    f"{r['services']:.0f}",
                    f"{r['loadavg_1m']:.1f}",
                ]
            )
    print(
        table(
            rows,
            [
                "adapter",
                "call",
                "longest loop stall, wall / CPU ms",
                "sync, wall / CPU s",
                "yields",
                "full GCs",
                "longest GC pass, CPU ms",
                "versions",
                "services",
                "load",
            ],
        )
    )
    print(write_results("sync_stall", figures, "python -m bench sync_stall " + " ".join(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
