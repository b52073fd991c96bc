"""Index build time, resident memory, and publish cost per changed service.

Two tables, each size in a fresh subprocess (so resident memory is that of the
index alone):

- build: for 1k and 10k services with 10 endpoints each (10k and 100k
  endpoints): one `replace()` of the whole shard → the first snapshot; one
  service changed → the next snapshot (median, p99 of 200); RSS.
- publish: for 1k, 10k, 100k and 1M services (one endpoint each): the cost of
  publishing a version that changes one service (one `upsert`, median and p99
  of 500), and per service of a 100-service staged batch. Run for the index
  of this tree ("after") and, with `--before REV`, for `discoveryd/index.py`
  as it was at git revision REV ("before"; default c89d8de, the last index
  that copied the whole map per version).

    python -m bench index                      # both tables, before = c89d8de
    python -m bench index --before REV
    python -m bench index --sizes 1000,100000  # publish table sizes

A third table: the longest the event loop waits (wall, and CPU time of the
loop thread) while one shard's 10 services become 100k, then while the 100k
are relisted with 1% changed, with `replace()` in one call and with
`replace_in_steps()`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from bench.common import LoopTicker, median, percentile, table, write_results

SIZES = (1_000, 10_000)
PUBLISH_SIZES = (1_000, 10_000, 100_000, 1_000_000)
ENDPOINTS = 10
BEFORE = "c89d8de"
ROOT = Path(__file__).resolve().parent.parent


def _ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def _index_module(path: str | None) -> ModuleType:
    """The index module of this tree, or the one saved at `path` (an older revision)."""
    if path is None:
        import discoveryd.index

        return discoveryd.index
    spec = importlib.util.spec_from_file_location("discoveryd_index_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _measure(n: int) -> dict[str, float]:
    import gc

    from bench.common import rss_bytes
    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Hostname, Locality, Port, PortProtocol, Service, SourceId

    gc.collect()
    rss0 = rss_bytes()
    source = SourceId("files/bench")

    def service(i: int, gen: int = 0) -> Service:
        return Service(
            hostname=Hostname(f"svc-{i}.ns-{i % 50}.svc.cluster.local"),
            namespace=f"ns-{i % 50}",
            ports=(Port(80, "http", PortProtocol.HTTP), Port(9090, "grpc-metrics", PortProtocol.GRPC)),
            addresses=(f"10.96.{i // 250}.{i % 250}",),
            source=source,
            endpoints=tuple(
                Endpoint(
                    _ip(i * ENDPOINTS + e),
                    ports={"http": 8080 + gen},
                    labels={"app": f"svc-{i}", "version": "v1"},
                    locality=Locality("eu-west1", f"eu-west1-{'abc'[e % 3]}"),
                    source=source,
                )
                for e in range(ENDPOINTS)
            ),
        )

    services = [service(i) for i in range(n)]
    rss_input = rss_bytes()
    index = Index([source])
    shard = index.writer(source)
    t0 = time.perf_counter()
    shard.replace(services)
    build = time.perf_counter() - t0
    assert len(index.snapshot.services) == n
    del services
    gc.collect()
    rss1 = rss_bytes()

    upserts = []
    for k in range(200):
        changed = service(k * 7 % n, gen=k + 1)
        t0 = time.perf_counter()
        shard.upsert(changed)
        upserts.append(time.perf_counter() - t0)
    return {
        "services": n,
        "endpoints": n * ENDPOINTS,
        "build_s": build,
        "upsert_median_ms": median(upserts) * 1e3,
        "upsert_p99_ms": percentile(upserts, 99) * 1e3,
        "rss_baseline_mb": rss0 / 2**20,
        "rss_input_mb": (rss_input - rss0) / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "index_mb": (rss1 - rss0) / 2**20,
    }


def _publish(n: int, module_path: str | None) -> dict[str, float]:
    """Publish cost per changed service at `n` services, for the index module at `module_path`."""
    import gc

    from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId

    mod = _index_module(module_path)
    source = SourceId("files/bench")
    ports = (Port(80, "http", PortProtocol.HTTP),)

    def service(i: int, gen: int = 0) -> Service:
        return Service(
            hostname=Hostname(f"svc-{i}.ns-{i % 50}.svc.cluster.local"),
            ports=ports,
            source=source,
            endpoints=(Endpoint(_ip(i), ports={"http": 8080 + gen}, source=source),),
        )

    index = mod.Index([source])
    shard = index.writer(source)
    shard.replace(service(i) for i in range(n))
    assert len(index.snapshot.services) == n
    gc.collect()
    gc.freeze()  # the index is long-lived: keep the collector from rescanning it on every sample
    singles = []
    cpu = 0.0
    for k in range(500):
        changed = service(k * 7919 % n, gen=k + 1)
        c0 = time.process_time()
        t0 = time.perf_counter()
        shard.upsert(changed)
        singles.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    batches = []
    for k in range(20):
        changed_many = [service((k * 100 + j) * 7919 % n, gen=1000 + k) for j in range(100)]
        t0 = time.perf_counter()
        with shard.batch():
            for s in changed_many:
                shard.upsert(s)
        batches.append((time.perf_counter() - t0) / 100)
    return {
        "services": n,
        "one_median_us": median(singles) * 1e6,
        "one_p99_us": percentile(singles, 99) * 1e6,
        "one_cpu_mean_us": cpu / len(singles) * 1e6,
        "loadavg_1m": os.getloadavg()[0],
        "batch100_per_service_us": median(batches) * 1e6,
    }


def _stall(n: int, stepwise: bool) -> dict[str, float]:
    """The longest the event loop waits while one shard's 10 services become `n` (all new), then while
    `n` are relisted with 1% changed: `replace()` in one call, or `replace_in_steps()`."""
    import asyncio

    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId

    source = SourceId("etcd/bench")
    ports = (Port(80, "http", PortProtocol.HTTP),)

    def world(count: int, gen: int, changed: int = 0) -> list[Service]:
        return [
            Service(
                hostname=Hostname(f"svc-{i}.ns-{i % 50}.svc.cluster.local"),
                ports=ports,
                source=source,
                endpoints=(Endpoint(_ip(i), ports={"http": 8080 + (gen if i < changed else 0)}, source=source),),
            )
            for i in range(count)
        ]

    async def measure(shard: object, services: list[Service]) -> dict[str, float]:
        ticker = LoopTicker()
        ticker.start()
        await asyncio.sleep(0)
        w0, c0 = time.perf_counter(), time.process_time()
        if stepwise:
            await shard.replace_in_steps(services)  # type: ignore[attr-defined]
        else:
            shard.replace(services)  # type: ignore[attr-defined]
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        await asyncio.sleep(0)
        await ticker.stop()
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "max_stall_wall_ms": max(ticker.gaps_wall) * 1e3,
            "max_stall_cpu_ms": max(ticker.gaps_cpu) * 1e3,
            "yields": float(len(ticker.gaps_wall)),
        }

    async def run() -> dict[str, float]:
        index = Index([source])
        shard = index.writer(source)
        shard.replace(world(10, 0))
        first = await measure(shard, world(n, 0))
        relist = await measure(shard, world(n, 1, changed=n // 100))
        assert len(index.snapshot.services) == n
        out = {f"new_{k}": v for k, v in first.items()}
        out.update({f"relist_{k}": v for k, v in relist.items()})
        out["loadavg_1m"] = os.getloadavg()[0]
        return out

    return asyncio.run(run())


def _child(args: list[str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "bench.index_bench", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {args} failed:\n{proc.stderr}")
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(_measure(int(argv[1]))))
        return
    if argv[:1] == ["--child-stall"]:
        print(json.dumps(_stall(int(argv[1]), argv[2] == "steps")))
        return
    if argv[:1] == ["--child-publish"]:
        print(json.dumps(_publish(int(argv[1]), argv[2] if len(argv) > 2 else None)))
        return
    parser = argparse.ArgumentParser(prog="python -m bench index")
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' index (empty: skip)")
    parser.add_argument("--sizes", default=",".join(map(str, PUBLISH_SIZES)), help="publish table sizes")
    parser.add_argument("--stall", type=int, default=100_000, help="services in the replace-stall table")
    opts = parser.parse_args(argv)
    sizes = [int(s) for s in opts.sizes.split(",") if s]

    rows, figures = [], {}
    for n in SIZES:
        r = _child(["--child", str(n)])
        figures[str(n)] = r
        rows.append(
            [
                n,
                r["endpoints"],
                f"{float(r['build_s']) * 1e3:.0f} ms",  # type: ignore[arg-type]
                f"{r['upsert_median_ms']:.2f} / {r['upsert_p99_ms']:.2f} ms",
                f"{r['index_mb']:.0f} MiB",
                f"{r['rss_after_mb']:.0f} MiB",
            ]
        )
    print(
        table(
            rows,
            ["services", "endpoints", "build (replace all)", "one upsert median / p99", "index RSS", "process RSS"],
        )
    )
    print("index RSS = process RSS after the build, minus RSS before the model objects were created")

    publish: dict[str, dict[str, object]] = {}
    prow = []
    with tempfile.TemporaryDirectory() as tmp:
        before_path: str | None = None
        if opts.before:
            source = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{opts.before}:discoveryd/index.py"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            before_path = str(Path(tmp) / "index_before.py")
            Path(before_path).write_text(source)
        for n in sizes:
            after = _child(["--child-publish", str(n)])
            before = _child(["--child-publish", str(n), before_path]) if before_path else None
            publish[str(n)] = {"after": after, "before": before}

            def cell(r: dict[str, object] | None, key: str) -> str:
                return "-" if r is None else f"{r[key]:.1f}"

            prow.append(
                [
                    n,
                    cell(before, "one_median_us") + " / " + cell(before, "one_p99_us"),
                    cell(after, "one_median_us") + " / " + cell(after, "one_p99_us"),
                    cell(before, "one_cpu_mean_us") + " / " + cell(after, "one_cpu_mean_us"),
                    cell(before, "batch100_per_service_us"),
                    cell(after, "batch100_per_service_us"),
                    f"{after['loadavg_1m']:.1f}",
                ]
            )
    print()
    print(
        table(
            prow,
            [
                "services",
                f"one change, before ({opts.before}) median / p99 µs",
                "one change, after median / p99 µs",
                "CPU per change, before / after µs",
                "per service in a 100-batch, before µs",
                "after µs",
                "load (1 min)",
            ],
        )
    )
    figures["publish"] = publish  # type: ignore[assignment]

    stall: dict[str, dict[str, object]] = {}
    srow = []
    for mode in ("one call", "steps"):
        r = _child(["--child-stall", str(opts.stall), "steps" if mode == "steps" else "call"])
        stall[mode] = r
        for case, label in (("new", f"10 -> {opts.stall:,} services"), ("relist", f"{opts.stall:,}, 1% changed")):
            srow.append(
                [
                    "replace()" if mode == "one call" else "replace_in_steps()",
                    label,
                    f"{r[case + '_max_stall_wall_ms']:.1f} / {r[case + '_max_stall_cpu_ms']:.1f}",
                    f"{r[case + '_wall_s']:.2f} / {r[case + '_cpu_s']:.2f}",
                    f"{r[case + '_yields']:.0f}",
                    f"{r['loadavg_1m']:.1f}",
                ]
            )
    print()
    print(
        table(
            srow,
            ["call", "change", "longest loop stall, wall / CPU ms", "whole replace, wall / CPU s", "yields", "load"],
        )
    )
    figures["replace_stall"] = stall  # type: ignore[assignment]
    write_results("index", figures, "python -m bench index " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
