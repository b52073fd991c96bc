"""Index build time and resident memory.

For 1k and 10k services with 10 endpoints each (10k and 100k endpoints), in a
fresh subprocess per size so resident memory is that of the index alone:

- build: one `replace()` of the whole shard → the first snapshot;
- upsert: one service changed → the next snapshot (median, p99 of 200);
- RSS before and after, and the difference.

    python -m bench index
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import median, percentile, table, write_results

SIZES = (1_000, 10_000)
ENDPOINTS = 10


def _ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


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


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(_measure(int(argv[1]))))
        return
    rows, figures = [], {}
    for n in SIZES:
        out = subprocess.run(
            [sys.executable, "-m", "bench.index_bench", "--child", str(n)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout)
        figures[str(n)] = r
        rows.append(
            [
                n,
                r["endpoints"],
                f"{r['build_s'] * 1e3:.0f} ms",
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
    write_results("index", figures, "make bench BENCH_ARGS=index")


if __name__ == "__main__":
    main(sys.argv[1:])
