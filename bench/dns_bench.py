"""DNS server throughput and memory: discoveryd against Knot DNS, measured with dnsperf.

Both servers serve the same zone `bench.local` with N names `svc-<i>.bench.local`
(one A record each), in their own processes: discoveryd on uvloop, Knot with one
UDP worker, and a second discoveryd whose index changes 10 times per second.
Each server is pinned to one CPU and dnsperf to another. Rounds alternate
discoveryd, Knot, churned discoveryd, discoveryd, ... with dnsperf cycling over
all N names (shuffled) for `--duration` seconds per round, after one warm-up pass each.

Figures: queries per second and p99 latency (from dnsperf's per-query log, at
saturation: `-c 4 -q 100`), the server's CPU time per answered query (from
/proc; on two cores dnsperf itself can saturate its CPU before a fast server
does, so this is the fairer efficiency figure), the QPS ratio discoveryd /
Knot and the CPU-per-query ratio Knot / discoveryd, discoveryd's QPS
while the index changes 10 times per second, and discoveryd's resident memory
with N and with `--big` names (after loading, and after answering each name once).
Also, in this process: the cost of one answer cache miss (resolving and
encoding an A answer, `Authority.answer`, averaged over all N names once).

Run: `python -m bench dns` or `python -m bench.dns_bench [--duration 8] [--rounds 3]`.
Needs `dnsperf` and `knotd` (Debian: `apt-get install dnsperf knot`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import percentile, rss_bytes, table, write_results

ZONE = "bench.local"
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = {_CPUS[0]}
"""The CPU each server runs on; dnsperf gets another one."""
CLIENT_CPU = {_CPUS[-1]}


def _ip(i: int) -> str:
    return f"10.{(i >> 16) & 0xFF}.{(i >> 8) & 0xFF}.{i & 0xFF}"


# -- discoveryd in a child process ----------------------------------------------------------


def serve(names: int, port: int, churn: float) -> None:
    """Child process: a DnsServer over an index of `names` services, churning `churn` services/s."""
    from discoveryd.config import DnsConfig
    from discoveryd.dns import DnsServer
    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Hostname, Port, Service, SourceId, Zone

    def service(i: int, ip: str) -> Service:
        return Service(Hostname(f"svc-{i}.{ZONE}"), ports=(Port(8080, "http"),), endpoints=(Endpoint(ip),))

    async def run() -> None:
        index = Index()
        shard = index.writer(SourceId("etcd/bench"))
        shard.replace(service(i, _ip(i)) for i in range(names))
        shard.mark_synced()
        server = DnsServer(DnsConfig(listen=[f"127.0.0.1:{port}"]), index, [Zone(Hostname(ZONE))])
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.serve())
            await server.started.wait()
            print("ready", flush=True)
            rng = random.Random(1)
            while churn > 0:
                await asyncio.sleep(1 / churn)
                i = rng.randrange(names)
                shard.upsert(service(i, f"10.255.{rng.randrange(256)}.{rng.randrange(1, 255)}"))

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


@contextlib.contextmanager
def discoveryd(names: int, port: int, churn: float = 0.0) -> Iterator[subprocess.Popen[str]]:
    cmd = [sys.executable, "-m", "bench.dns_bench", "--serve", str(names), str(port), str(churn)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, SERVER_CPU)
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"discoveryd did not start (exit {proc.poll()})")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Knot -----------------------------------------------------------------------------------


@contextlib.contextmanager
def knot(names: int, port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    lines = [
        f"$ORIGIN {ZONE}.",
        "$TTL 30",
        "@ SOA ns.dns hostmaster 1 7200 1800 86400 30",
        "@ NS ns.dns",
        "ns.dns A 127.0.0.1",
    ]
    lines += [f"svc-{i} A {_ip(i)}" for i in range(names)]
    (workdir / f"{ZONE}.zone").write_text("\n".join(lines) + "\n")
    (workdir / "knot.conf").write_text(
        f"""server:
    rundir: {workdir}
    listen: 127.0.0.1@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: {workdir}
log:
  - target: stderr
    any: error
zone:
  - domain: {ZONE}
    storage: {workdir}
    file: {ZONE}.zone
"""
    )
    proc = subprocess.Popen(
        ["knotd", "-c", str(workdir / "knot.conf")], preexec_fn=lambda: os.sched_setaffinity(0, SERVER_CPU)
    )
    try:
        _wait_answering(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_answering(port: int, timeout: float = 30.0) -> None:
    import dns.message
    import dns.query

    query = dns.message.make_query(f"svc-1.{ZONE}.", "A")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5).answer:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer on port {port}")


# -- dnsperf --------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(
    port: int, datafile: Path, *, duration: float | None = None, passes: int | None = None, pid: int | None = None
) -> dict[str, Any]:
    """One dnsperf run; with `pid`, also the server's CPU microseconds per answered query."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-c", "4", "-q", "100", "-v"]
    cmd += ["-l", str(duration)] if duration else ["-n", str(passes or 1)]
    cpu_before = _cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, CLIENT_CPU)
    ).stdout
    cpu = _cpu_seconds(pid) - cpu_before if pid else 0.0
    latencies: list[float] = []
    figures: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith("> "):
            latencies.append(float(line.rsplit(" ", 1)[1]))
        elif "Queries per second:" in line:
            figures["qps"] = float(line.split(":")[1])
        elif "Queries lost:" in line:
            figures["lost"] = int(line.split(":")[1].split()[0])
        elif "Queries completed:" in line:
            figures["completed"] = int(line.split(":")[1].split()[0])
    figures["p99_ms"] = percentile(latencies, 99) * 1000
    figures["p50_ms"] = percentile(latencies, 50) * 1000
    if pid and figures.get("completed"):
        figures["server_cpu_us_per_query"] = cpu / figures["completed"] * 1e6
    return figures


def miss_cost(names: int) -> float:
    """Microseconds per cache miss: every name answered once by a freshly loaded authority."""
    from discoveryd.dns.answer import Authority
    from discoveryd.dns.message import CLASS_IN, A
    from discoveryd.dns.records import RecordTable
    from discoveryd.model import Endpoint, Hostname, Port, Service, Zone

    services = [
        Service(Hostname(f"svc-{i}.{ZONE}"), ports=(Port(8080, "http"),), endpoints=(Endpoint(_ip(i)),))
        for i in range(names)
    ]
    authority = Authority(RecordTable([Zone(Hostname(ZONE))], 30, ["127.0.0.1"], 1))
    authority.load({s.hostname: s for s in services})
    questions = [(f"svc-{i}".encode(), *(p.encode() for p in ZONE.split("."))) for i in range(names)]
    started = time.perf_counter()
    for qname in questions:
        authority.answer(qname, A, CLASS_IN, None, False, 1, 0x0100)
    return (time.perf_counter() - started) / names * 1e6


def _free_port() -> int:
    from tests.helpers import free_port

    return free_port()


def _datafile(workdir: Path, names: int, name: str) -> Path:
    order = list(range(names))
    random.Random(7).shuffle(order)
    path = workdir / name
    path.write_text("".join(f"svc-{i}.{ZONE} A\n" for i in order))
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_bench")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server, alternating")
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000, help="names for the second memory figure")
    parser.add_argument("--serve", nargs=3, metavar=("NAMES", "PORT", "CHURN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), int(args.serve[1]), float(args.serve[2]))
        return
    missing = [tool for tool in ("dnsperf", "knotd") if shutil.which(tool) is None]
    if missing:
        # Skipped, not failed, so that `python -m bench` still runs the other benchmarks.
        print(f"dns bench skipped: needs {', '.join(missing)}: apt-get install -y dnsperf knot (Debian/Ubuntu)")
        return
    if len(os.sched_getaffinity(0)) < 2:
        print("dns bench skipped: it pins server and client to two different CPUs")
        return

    command = "python -m bench.dns_bench " + " ".join(argv)
    figures: dict[str, Any] = {"names": args.names, "duration_s": args.duration, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="dns-bench-") as tmp:
        work = Path(tmp)
        data = _datafile(work, args.names, "queries.txt")
        runs: dict[str, list[dict[str, Any]]] = {"discoveryd": [], "knot": [], "discoveryd_churn_10_per_s": []}
        d_port, k_port, c_port = _free_port(), _free_port(), _free_port()
        with (
            discoveryd(args.names, d_port) as d_proc,
            knot(args.names, k_port, work) as k_proc,
            discoveryd(args.names, c_port, churn=10.0) as c_proc,
        ):
            servers = [("discoveryd", d_port, d_proc.pid), ("knot", k_port, k_proc.pid)]
            servers.append(("discoveryd_churn_10_per_s", c_port, c_proc.pid))
            for _, port, _ in servers:
                dnsperf(port, data, passes=1)
            for _ in range(args.rounds):
                for server, port, pid in servers:
                    runs[server].append(dnsperf(port, data, duration=args.duration, pid=pid))
        rows = []
        labels = {"discoveryd_churn_10_per_s": "discoveryd, 10 changes/s"}
        for server, results in runs.items():
            qps = sum(r["qps"] for r in results) / len(results)
            p99 = max(r["p99_ms"] for r in results)
            cpu = sum(r["server_cpu_us_per_query"] for r in results) / len(results)
            lost = sum(r.get("lost", 0) for r in results)
            figures[server] = {
                "qps": round(qps),
                "p99_ms": round(p99, 3),
                "server_cpu_us_per_query": round(cpu, 2),
                "lost": lost,
                "runs": results,
            }
            rows.append([labels.get(server, server), f"{qps:,.0f}", f"{p99:.3f}", f"{cpu:.2f}", lost])
        ratio = figures["discoveryd"]["qps"] / figures["knot"]["qps"]
        figures["qps_ratio_discoveryd_over_knot"] = round(ratio, 3)
        cpu_ratio = figures["knot"]["server_cpu_us_per_query"] / figures["discoveryd"]["server_cpu_us_per_query"]
        figures["cpu_efficiency_ratio_discoveryd_over_knot"] = round(cpu_ratio, 3)

        memory = []
        for names in (args.names, args.big):
            port = _free_port()
            started = time.monotonic()
            with discoveryd(names, port) as proc:
                load_s = time.monotonic() - started
                loaded = rss_bytes(proc.pid)
                dnsperf(port, data if names == args.names else _datafile(work, names, "big.txt"), passes=1)
                answered = rss_bytes(proc.pid)
            memory.append([names, f"{loaded / 2**20:.0f}", f"{answered / 2**20:.0f}", f"{load_s:.1f}"])
            figures[f"rss_mib_{names}"] = {
                "loaded": round(loaded / 2**20, 1),
                "after_answering_each_once": round(answered / 2**20, 1),
                "startup_s": round(load_s, 2),
            }

    miss_us = miss_cost(args.names)
    figures["cache_miss_us"] = round(miss_us, 2)

    print(table(rows, ["server", "QPS", "p99 ms", "server CPU us/query", "lost"]))
    print(f"QPS ratio discoveryd / Knot: {ratio:.2f}; CPU per query ratio Knot / discoveryd: {cpu_ratio:.2f}")
    print()
    print(table(memory, ["names", "RSS MiB loaded", "RSS MiB after answering all", "startup s"]))
    print(f"answer cache miss (resolve and encode one A answer): {miss_us:.1f} us")
    write_results("dns", figures, command)


if __name__ == "__main__":
    main(sys.argv[1:])
