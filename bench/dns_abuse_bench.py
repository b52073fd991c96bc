"""The DNS server under abuse: TCP slot exhaustion by one source; the cost of response rate limiting.

TCP slots: a discoveryd DNS server (child process, uvloop, default TCP
limits: 1024 connections, 10 s idle) is attacked by another child process
that tries to hold `--hold` connections from 127.0.0.2, writing two zero bytes
(an empty message) on each every 4 s and reopening any connection the server
closes after 0.1 s. Meanwhile a legitimate client on 127.0.0.1 sends
`--queries` A queries, each on a fresh TCP connection (as a stub resolver
does after a truncated UDP answer), with a 2 s timeout. Figures: the share
of those queries answered and their median/p99 latency, without and with the
attack, and how many connections the attacker held at the end.

RRL overhead: dnsperf (`-c 4 -q 100`, pinned to one CPU, the server to the
other) against three servers of `--names` names in alternating rounds: RRL
off; RRL on at a rate no client reaches (every response passes the bucket
check); and RRL on at 1000 responses/s, where dnsperf's one source is
limited and most queries go unanswered or slip (that row's QPS counts
answers, so it shows what the limiter withholds, not a slowdown). Figures:
QPS and the server's CPU microseconds per received query (from /proc,
over the queries dnsperf sent). Skipped without dnsperf.

Run: `python -m bench dns_abuse` or `python -m bench.dns_abuse_bench [--hold 1024] [--queries 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import percentile, table, write_results

ZONE = "bench.local"
NAMES = 100
ATTACKER = "127.0.0.2"
CLIENT = "127.0.0.1"


def serve(port: int, rrl_rate: float = 0.0, names: int = NAMES) -> None:
    """Child process: a DnsServer with its default TCP limits over `names` services, RRL at `rrl_rate` (0: off)."""
    from discoveryd.config import DnsConfig
    from discoveryd.dns import DnsServer
    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Hostname, Service, SourceId, Zone

    async def run() -> None:
        index = Index()
        shard = index.writer(SourceId("etcd/bench"))
        shard.replace(
            Service(Hostname(f"svc-{i}.{ZONE}"), endpoints=(Endpoint(f"10.0.{i // 250}.{i % 250 + 1}"),))
            for i in range(names)
        )
        shard.mark_synced()
        config: dict[str, Any] = {"listen": [f"127.0.0.1:{port}"]}
        if rrl_rate:
            config["rrl"] = {"responses_per_second": rrl_rate}
        server = DnsServer(DnsConfig(**config), index, [Zone(Hostname(ZONE))])
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.serve())
            await server.started.wait()
            print("ready", flush=True)

    _run(run())


def attack(port: int, hold: int) -> None:
    """Child process: try to hold `hold` TCP connections from `ATTACKER`, each kept 'busy' with empty messages."""
    held = 0

    async def holder(stagger: float) -> None:
        nonlocal held
        await asyncio.sleep(stagger)
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            held += 1
            try:
                while not reader.at_eof():
                    writer.write(b"\x00\x00")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(512), 4.0)
            except OSError:
                pass
            finally:
                held -= 1
                writer.close()
            await asyncio.sleep(0.1)

    async def run() -> None:
        tasks = [asyncio.create_task(holder(i / hold)) for i in range(hold)]
        print("attacking", flush=True)
        while True:
            await asyncio.sleep(0.5)
            print(f"held {held}", flush=True)
        await asyncio.gather(*tasks)

    _run(run())


def _run(main: Any) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


@contextlib.contextmanager
def _child(*args: str, ready: str, cpus: set[int] | None = None) -> Iterator[subprocess.Popen[str]]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.dns_abuse_bench", *args],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != ready:
            raise RuntimeError(f"{args[0]} child did not start (exit {proc.poll()})")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _legitimate(port: int, queries: int) -> dict[str, Any]:
    import dns.asyncquery
    import dns.exception
    import dns.message

    answered, latencies = 0, []
    for i in range(queries):
        query = dns.message.make_query(f"svc-{i % NAMES}.{ZONE}.", "A")
        started = time.perf_counter()
        try:
            reply = await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=2.0, source=CLIENT)
        except (OSError, EOFError, dns.exception.Timeout):
            continue
        if reply.answer:
            answered += 1
            latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    return {
        "answered": answered,
        "queries": queries,
        "answered_share": round(answered / queries, 3),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def tcp_slots(hold: int, queries: int, ramp: float) -> dict[str, Any]:
    from tests.helpers import free_port

    port = free_port()
    figures: dict[str, Any] = {"attacker_connections_tried": hold}
    with _child("--serve", str(port), ready="ready"):
        figures["no_attack"] = asyncio.run(_legitimate(port, queries))
        with _child("--attack", str(port), str(hold), ready="attacking") as attacker:
            watcher = _Held(attacker)
            watcher.start()
            time.sleep(ramp)
            figures["under_attack"] = asyncio.run(_legitimate(port, queries))
            figures["attacker_held_at_end"] = watcher.last
    return figures


class _Held(threading.Thread):
    """Reads the attacker's 'held N' lines (one every 0.5 s) and keeps the last N."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.last: int | None = None

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("held "):
                self.last = int(line.split()[1])


def rrl_overhead(names: int, duration: float, rounds: int) -> dict[str, Any] | None:
    from bench.dns_bench import SERVER_CPU, _cpu_seconds, _datafile, dnsperf
    from tests.helpers import free_port

    if shutil.which("dnsperf") is None:
        print("rrl overhead skipped: needs dnsperf (apt-get install -y dnsperf)")
        return None
    setups = {"rrl off": 0.0, "rrl on, under the rate": 1e9, "rrl on, 1000/s (limiting)": 1000.0}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in setups}
    with tempfile.TemporaryDirectory(prefix="dns-abuse-") as tmp, contextlib.ExitStack() as stack:
        data = _datafile(Path(tmp), names, "queries.txt")
        servers = []
        for label, rate in setups.items():
            port = free_port()
            proc = stack.enter_context(
                _child("--serve", str(port), str(rate), str(names), ready="ready", cpus=SERVER_CPU)
            )
            servers.append((label, port, proc.pid))
        for _, port, _ in servers:
            dnsperf(port, data, passes=1)
        for _ in range(rounds):
            for label, port, pid in servers:
                before = _cpu_seconds(pid)
                result = dnsperf(port, data, duration=duration)
                sent = result.get("completed", 0) + result.get("lost", 0)
                result["server_cpu_us_per_query_sent"] = (_cpu_seconds(pid) - before) / max(sent, 1) * 1e6
                runs[label].append(result)
    figures: dict[str, Any] = {"names": names, "duration_s": duration, "rounds": rounds}
    for label, results in runs.items():
        figures[label] = {
            "qps": round(sum(r["qps"] for r in results) / len(results)),
            "server_cpu_us_per_query_sent": round(
                sum(r["server_cpu_us_per_query_sent"] for r in results) / len(results), 2
            ),
            "lost": sum(r.get("lost", 0) for r in results),
            "runs": results,
        }
    return figures


def verdict_cost(calls: int = 1_000_000) -> dict[str, float]:
    """Nanoseconds per `RateLimiter.verdict()` in this process: 256 sources under the rate, and one over it."""
    from discoveryd.dns.rrl import RateLimiter, RrlSettings

    out = {}
    for label, rate, sources in (("passing", 1e9, 256), ("limiting", 1.0, 1)):
        rrl = RateLimiter(RrlSettings(responses_per_second=rate, slip=2))
        ips = [bytes((10, i % 7, i, 1)) for i in range(sources)] * (calls // sources)
        verdict = rrl.verdict
        started = time.perf_counter()
        for ip in ips:
            verdict(ip)
        out[f"verdict_ns_{label}"] = round((time.perf_counter() - started) / len(ips) * 1e9, 1)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_abuse_bench")
    parser.add_argument("--hold", type=int, default=1024, help="connections the attacker tries to hold")
    parser.add_argument("--queries", type=int, default=200, help="legitimate TCP queries per phase")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds the attacker gets before measuring")
    parser.add_argument("--names", type=int, default=10_000, help="names served in the RRL overhead runs")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per dnsperf round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server, alternating")
    parser.add_argument("--skip-tcp", action="store_true", help="only the RRL overhead")
    parser.add_argument("--serve", nargs="+", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--attack", nargs=2, metavar=("PORT", "HOLD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        rate = float(args.serve[1]) if len(args.serve) > 1 else 0.0
        serve(int(args.serve[0]), rate, int(args.serve[2]) if len(args.serve) > 2 else NAMES)
        return
    if args.attack:
        attack(int(args.attack[0]), int(args.attack[1]))
        return
    command = "python -m bench.dns_abuse_bench " + " ".join(argv)
    figures: dict[str, Any] = {}
    if not args.skip_tcp:
        slots = figures["tcp_slots"] = tcp_slots(args.hold, args.queries, args.ramp)
        rows = [
            [phase, f"{f['answered']}/{f['queries']}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}"]
            for phase, f in (("no attack", slots["no_attack"]), ("one source holding slots", slots["under_attack"]))
        ]
        print(table(rows, ["legitimate TCP client", "answered", "p50 ms", "p99 ms"]))
        print(f"attacker connections held at the end: {slots['attacker_held_at_end']} of {args.hold} tried")
    figures["rrl_verdict"] = costs = verdict_cost()
    print(f"RateLimiter.verdict: {costs['verdict_ns_passing']} ns passing, {costs['verdict_ns_limiting']} ns limiting")
    rrl = rrl_overhead(args.names, args.duration, args.rounds)
    if rrl is not None:
        figures["rrl"] = rrl
        rows = [
            [label, f"{rrl[label]['qps']:,}", f"{rrl[label]['server_cpu_us_per_query_sent']:.2f}", rrl[label]["lost"]]
            for label in ("rrl off", "rrl on, under the rate", "rrl on, 1000/s (limiting)")
        ]
        print(table(rows, ["server", "answered QPS", "server CPU us/query sent", "unanswered"]))
    print(f"results: {write_results('dns_abuse', figures, command)}")


if __name__ == "__main__":
    main(sys.argv[1:])
