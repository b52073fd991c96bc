"""The DNS server under abuse: TCP slot exhaustion by one source.

TCP slots: a discoveryd DNS server (child process, uvloop, default TCP
limits: 1024 connections, 10 s idle) is attacked by another child process
that tries to hold `--hold` connections from 127.0.0.2, writing two zero bytes
(an empty message) on each every 4 s and reopening any connection the server
closes after 0.1 s. Meanwhile a legitimate client on 127.0.0.1 sends
`--queries` A queries, each on a fresh TCP connection (as a stub resolver
does after a truncated UDP answer), with a 2 s timeout. Figures: the share
of those queries answered and their median/p99 latency, without and with the
attack, and how many connections the attacker held at the end.

Run: `python -m bench dns_abuse` or `python -m bench.dns_abuse_bench [--hold 1024] [--queries 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
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


def serve(port: int) -> None:
    """Child process: a DnsServer with its default TCP limits over `NAMES` services."""
    from discoveryd.config import DnsConfig
    from discoveryd.dns import DnsServer
    from discoveryd.index import Index
    from discoveryd.model import Endpoint, Hostname, Service, SourceId, Zone

    async def run() -> None:
        index = Index()
        shard = index.writer(SourceId("etcd/bench"))
        shard.replace(
            Service(Hostname(f"svc-{i}.{ZONE}"), endpoints=(Endpoint(f"10.0.{i // 250}.{i % 250 + 1}"),))
            for i in range(NAMES)
        )
        shard.mark_synced()
        server = DnsServer(DnsConfig(listen=[f"127.0.0.1:{port}"]), index, [Zone(Hostname(ZONE))])
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
def _child(*args: str, ready: str) -> Iterator[subprocess.Popen[str]]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.dns_abuse_bench", *args], cwd=root, stdout=subprocess.PIPE, text=True
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_abuse_bench")
    parser.add_argument("--hold", type=int, default=1024, help="connections the attacker tries to hold")
    parser.add_argument("--queries", type=int, default=200, help="legitimate TCP queries per phase")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds the attacker gets before measuring")
    parser.add_argument("--serve", nargs=1, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--attack", nargs=2, metavar=("PORT", "HOLD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]))
        return
    if args.attack:
        attack(int(args.attack[0]), int(args.attack[1]))
        return
    command = "python -m bench.dns_abuse_bench " + " ".join(argv)
    figures: dict[str, Any] = {"tcp_slots": tcp_slots(args.hold, args.queries, args.ramp)}
    slots = figures["tcp_slots"]
    rows = [
        [phase, f"{f['answered']}/{f['queries']}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}"]
        for phase, f in (("no attack", slots["no_attack"]), ("one source holding slots", slots["under_attack"]))
    ]
    print(table(rows, ["legitimate TCP client", "answered", "p50 ms", "p99 ms"]))
    print(f"attacker connections held at the end: {slots['attacker_held_at_end']} of {args.hold} tried")
    print(f"results: {write_results('dns_abuse', figures, command)}")


if __name__ == "__main__":
    main(sys.argv[1:])
