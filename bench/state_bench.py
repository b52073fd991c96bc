"""Warm restarts: the cost of saving the index, and what a restart after kill -9 serves first.

1. Save/load cost in this process, for `--services` services with 10 endpoints
   each (default 10k services = 100k endpoints): `Index.capture()` (on the
   event loop), encode (positional rows, orjson, and the xDS resources served,
   as the daemon's worker thread does), the atomic write, the file size; then
   load + restore into a fresh index.
2. The real `discoveryd run` with a files registry (4 ServiceEntries) and an
   etcd registry (real etcd, `--keys` keys, 10 per service): it syncs, saves,
   and is killed with SIGKILL; it is started again and a CDS client connects
   at once and keeps retrying → time from the new process's start to the
   first CDS response, and how many clusters it held, with the state file
   and without it (state_dir removed).

    python -m bench state                      # 100k endpoints, 50k etcd keys
    python -m bench state --services=1000 --keys=5000
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aetcd
import grpc

from bench.common import median, table, write_results
from bench.etcd_bench import ENDPOINTS_PER_SERVICE, _load
from discoveryd import state
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Locality, Port, PortProtocol, Service, SourceId
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, Builder, BuildOptions
from tests.fakes.etcd import EtcdServer
from tests.fakes.xds import Stream, names
from tests.helpers import free_port, wait_sync

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: se-{i}, namespace: shop}}
spec:
  hosts: [se-{i}.shop.example]
  ports:
    - {{number: 80, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
    - address: 10.9.0.{i}
"""


def _args(argv: list[str]) -> dict[str, int]:
    opts = {"services": 10_000, "keys": 50_000, "rounds": 3}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {arg}; known: {sorted(opts)}")
        opts[key] = int(value)
    return opts


def _ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def save_cost(services: int) -> dict[str, float]:
    source = SourceId("etcd/bench")
    index = Index([source])
    shard = index.writer(source)
    shard.replace(
        Service(
            Hostname(f"svc-{i}.mesh.local"),
            ports=(Port(8080, "http", PortProtocol.HTTP),),
            source=source,
            endpoints=tuple(
                Endpoint(
                    _ip(i * 10 + e),
                    labels={"app": f"svc-{i}"},
                    locality=Locality("r", f"z{e % 3}"),
                    source=source,
                )
                for e in range(10)
            ),
        )
        for i in range(services)
    )
    shard.mark_synced()  # only synced parts are saved
    snap = index.snapshot
    view, _ = Builder(BuildOptions()).update(EMPTY_VIEW, snap, None)  # what xDS serves, saved with the index
    captures, encodes, encode_cpu, writes = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for _ in range(5):
            t0 = time.perf_counter()
            parts = index.capture()
            t1 = time.perf_counter()
            c1 = time.process_time()
            xds = state.SavedXds("bench", (source,), state.served_resources(view, snap, index.snapshot))
            data = state.encode(parts, time.time(), None, xds)
            encode_cpu.append(time.process_time() - c1)
            t2 = time.perf_counter()
            state.write_atomically(directory, data)
            t3 = time.perf_counter()
            captures.append(t1 - t0)
            encodes.append(t2 - t1)
            writes.append(t3 - t2)
        t0 = time.perf_counter()
        loaded = state.load(directory, [source])
        assert loaded is not None
        fresh = Index([source])
        state.restore(fresh, loaded)
        load_s = time.perf_counter() - t0
        assert len(fresh.snapshot.services) == services
    return {
        "services": services,
        "endpoints": services * 10,
        "capture_ms": median(captures) * 1e3,
        "encode_ms": median(encodes) * 1e3,
        "encode_cpu_ms": median(encode_cpu) * 1e3,
        "write_ms": median(writes) * 1e3,
        "file_mb": len(data) / 2**20,
        "load_restore_ms": load_s * 1e3,
    }


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _first_cds(port: int, deadline: float, pid: int | None = None) -> tuple[float, int, float]:
    """Retry until a CDS response arrives: (monotonic time it arrived, clusters in it, the CPU time
    process `pid` had used by then)."""
    while time.monotonic() < deadline:
        try:
            # Own subchannel pool: a shared one keeps the reconnect backoff of refused connections.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stream = Stream(channel)
                await stream.send(CLUSTER)
                response = await stream.recv(timeout=max(0.1, deadline - time.monotonic()))
                at = time.monotonic()
                cpu = _cpu_seconds(pid) if pid is not None else 0.0
                await stream.close()
                return at, len(names(response)), cpu
        except (grpc.aio.AioRpcError, TimeoutError, AssertionError):
            await asyncio.sleep(0.02)
    raise TimeoutError("no CDS response")


def restart_time(server: EtcdServer, keys: int, rounds: int) -> dict[str, Any]:
    prefix = f"/state-bench-{os.getpid()}/"

    async def fill() -> None:
        async with aetcd.Client(host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1])) as client:
            await _load(client, prefix, keys)

    asyncio.run(fill())
    expected = keys // ENDPOINTS_PER_SERVICE + 4
    results: dict[str, Any] = {"keys": keys, "clusters": expected}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "se").mkdir()
        for i in range(1, 5):
            (base / "se" / f"se-{i}.yaml").write_text(SE.format(i=i))
        admin, xds, dns = free_port(), free_port(), free_port()
        (base / "discoveryd.yaml").write_text(
            "registries:\n"
            "  - kind: files\n    name: local\n    paths: [se/]\n"
            f"  - kind: etcd\n    name: main\n    endpoints: [{server.url}]\n    prefix: {prefix}\n"
            "    domain: mesh.local\n"
            f"xds:\n  listen: 127.0.0.1:{xds}\n"
            f"dns:\n  listen: [127.0.0.1:{dns}]\n"
            f"admin:\n  listen: 127.0.0.1:{admin}\n"
            "state_dir: state\n"
        )
        cmd = [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(base / "discoveryd.yaml")]
        log = (base / "daemon.log").open("w")

        def start() -> tuple[subprocess.Popen[bytes], float]:
            log.write(f"{datetime.datetime.now().isoformat(' ', 'milliseconds')} bench: starting the daemon\n")
            log.flush()
            t = time.monotonic()
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), t

        def kill(p: subprocess.Popen[bytes]) -> None:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)

        state_file = base / "state" / state.FILE_NAME
        try:
            _rounds(start, kill, xds, expected, state_file, base, rounds, results)
        except Exception:
            log.flush()
            print((base / "daemon.log").read_text()[-4000:], file=sys.stderr)
            raise
        log.close()
        if os.environ.get("STATE_BENCH_LOG"):
            print((base / "daemon.log").read_text(), file=sys.stderr)
    return results


def _rounds(
    start: Any, kill: Any, xds: int, expected: int, state_file: Path, base: Path, rounds: int, results: dict[str, Any]
) -> None:
    for mode in ("with state", "without state"):
        samples: list[tuple[float, int, float]] = []
        for _ in range(rounds):
            proc, _ = start()
            try:
                at, count, _ = asyncio.run(_first_cds(xds, time.monotonic() + 120))
                assert count == expected, f"warm-up run served {count} of {expected}"
                wait_sync(lambda: state_file.exists(), timeout=30, what="state saved")
                time.sleep(2.5)  # past the save throttle: the file holds the synced world
            finally:
                kill(proc)
            if mode == "without state":
                shutil.rmtree(base / "state")
            proc, t_start = start()
            try:
                at, count, cpu = asyncio.run(_first_cds(xds, time.monotonic() + 120, proc.pid))
                samples.append((at - t_start, count, cpu))
            finally:
                kill(proc)
        results[mode] = {
            "first_cds_s": [round(s, 3) for s, _, _ in samples],
            "clusters_in_first": [c for _, c, _ in samples],
            "daemon_cpu_s": [round(c, 2) for _, _, c in samples],
            "load_average": os.getloadavg()[0],
        }


def main(argv: list[str]) -> None:
    opts = _args(argv)
    cost = save_cost(opts["services"])
    print(
        table(
            [
                [
                    cost["services"],
                    cost["endpoints"],
                    f"{cost['capture_ms']:.1f} ms",
                    f"{cost['encode_ms']:.0f} ms ({cost['encode_cpu_ms']:.0f} ms CPU)",
                    f"{cost['write_ms']:.0f} ms",
                    f"{cost['file_mb']:.1f} MiB",
                    f"{cost['load_restore_ms']:.0f} ms",
                ]
            ],
            ["services", "endpoints", "capture (loop)", "encode (thread)", "write+fsync", "file", "load+restore"],
        )
    )
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="state-bench-etcd-")))
    server.start()
    try:
        restart = restart_time(server, opts["keys"], opts["rounds"])
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)
    rows = []
    for mode in ("with state", "without state"):
        r = restart[mode]
        rows.append(
            [
                mode,
                ", ".join(f"{s:.2f} s" for s in r["first_cds_s"]),
                ", ".join(f"{c}/{restart['clusters']}" for c in r["clusters_in_first"]),
                ", ".join(f"{c:.2f} s" for c in r["daemon_cpu_s"]),
            ]
        )
    print()
    print(f"restart after kill -9, {restart['keys']} etcd keys + 4 ServiceEntries:")
    print(table(rows, ["", "process start → first CDS response", "clusters in it", "daemon CPU by then"]))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    write_results("state", {"save": cost, "restart": restart}, "python -m bench state " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
