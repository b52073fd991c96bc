"""DNS answer side: record build under shared names, the answer cache under a distinct-query attack,
CPU per packet of many-question packets, and query latency while 100k services change.

`python -m bench dns_answer [--sizes 2000,20000] [--attack 50000] [--change 100000]`

- load: `RecordTable.load` of N services sharing one IP (their reverse name has N PTR records),
  best of 3, and the same through `DnsServer.sync` (the off-loop build, in steps).
- attack: RSS of this process before and after N TCP queries (through `DnsServer.handle`, what the
  TCP reader calls) for a name with 100 addresses, each differing only in 4 bytes of an unknown
  EDNS option and in the name's case.
- cpu: process CPU per packet of a 4 KB UDP packet of chained questions, of 4 KB garbage, of a
  64 KB TCP message of chained questions, and of a plain cached query.
- change: a real server on 127.0.0.1; a client process sends one UDP query every millisecond and
  records each round trip while the index replaces N services at once; max and p99 latency over
  the whole run (the index's own `replace` runs on the same loop) and over the queries sent after
  the index published, while the DNS sync task applies the change.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import time
from typing import Any

import dns.edns
import dns.message

from bench.common import percentile, rss_bytes, table, write_results
from discoveryd.config import DnsConfig
from discoveryd.dns import DnsServer
from discoveryd.dns.records import RecordTable
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, Service, SourceId, Zone

ZONE = Zone(Hostname("mesh.local"))
SOURCE = SourceId("etcd/bench")


def _on_one_ip(n: int) -> dict[Hostname, Service]:
    hosts = [Hostname(f"s{i}.mesh.local") for i in range(n)]
    return {h: Service(h, addresses=("10.0.0.1",), ports=(Port(80, "http"),)) for h in hosts}


def bench_load(sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        services = _on_one_ip(n)
        best = float("inf")
        for _ in range(3):
            t = RecordTable([ZONE], 30, ["127.0.0.1"], 1)
            start = time.perf_counter()
            t.load(services)
            best = min(best, time.perf_counter() - start)
        index = Index()
        index.writer(SOURCE).replace(services.values())
        server = DnsServer(DnsConfig(), index, [ZONE])
        start = time.perf_counter()
        asyncio.run(server.sync())
        synced = time.perf_counter() - start
        out.append(
            {
                "services": n,
                "load_s": round(best, 3),
                "sync_s": round(synced, 3),
                "sync_longest_step_ms": round(server.sync_steps.longest * 1000, 2),
            }
        )
    return out


def _server_with(services: list[Service]) -> DnsServer:
    index = Index()
    shard = index.writer(SOURCE)
    shard.replace(services)
    shard.mark_synced()
    server = DnsServer(DnsConfig(), index, [ZONE])
    asyncio.run(server.sync())
    return server


def bench_attack(queries: int) -> dict[str, Any]:
    big = Service(Hostname("big.mesh.local"), endpoints=tuple(Endpoint(f"10.5.0.{i}") for i in range(1, 101)))
    server = _server_with([big])
    name = "big.mesh.local."
    before = rss_bytes()
    start = time.perf_counter()
    for i in range(queries):
        qname = "".join(c.upper() if (i >> k) & 1 else c for k, c in enumerate(name))
        option = dns.edns.GenericOption(65001, i.to_bytes(4, "big"))
        query = dns.message.make_query(qname, "A", use_edns=0, payload=1232, options=[option])
        out = server.handle(query.to_wire(), "127.0.0.1", True)
        assert isinstance(out, bytes) and len(out) > 1600
    elapsed = time.perf_counter() - start
    after = rss_bytes()
    return {
        "queries": queries,
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "rss_growth_mb": round((after - before) / 2**20, 1),
        "cache_bytes_mb": round(server._authority.cache_bytes() / 2**20, 2),
        "seconds": round(elapsed, 1),
    }


def _chained(size: int) -> bytes:
    body = b"\x03big\x04mesh\x05local\x00" + struct.pack("!HH", 1, 1)
    count = 1
    while 12 + len(body) + 6 <= size:
        body += b"\xc0\x0c" + struct.pack("!HH", 1, 1)
        count += 1
    return struct.pack("!HHHHHH", 1, 0x0100, count, 0, 0, 0) + body


def bench_cpu(rounds: int = 2000) -> list[dict[str, Any]]:
    server = _server_with([Service(Hostname("big.mesh.local"), endpoints=(Endpoint("10.5.0.1"),))])
    plain = dns.message.make_query("big.mesh.local.", "A").to_wire()
    cases = [
        ("4 KB UDP, chained questions", _chained(4096), False),
        ("4 KB UDP, garbage", struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xff" * 4084, False),
        ("64 KB TCP, chained questions", _chained(65535), True),
        ("plain query, cached", plain, False),
    ]
    out = []
    for label, packet, tcp in cases:
        server.handle(packet, "127.0.0.1", tcp)
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(rounds):
                server.handle(packet, "127.0.0.1", tcp)
            best = min(best, (time.process_time() - start) / rounds)
        out.append({"packet": label, "bytes": len(packet), "cpu_us": round(best * 1e6, 2)})
    return out


_CLIENT = r"""
import socket, struct, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
name = b"\x02s0\x04mesh\x05local\x00"
lat = []
qid = 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    qid = (qid + 1) & 0xFFFF
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    sent = time.monotonic()
    t = time.perf_counter()
    s.sendto(q, ("127.0.0.1", port))
    try:
        while True:
            data = s.recv(2048)
            if data[:2] == q[:2]:
                break
        lat.append((sent, time.perf_counter() - t))
    except socket.timeout:
        lat.append((sent, 2.0))
    time.sleep(0.001)
print(" ".join(f"{a:.6f}:{b:.6f}" for a, b in lat))
"""


async def _change(n: int, seconds: float) -> dict[str, Any]:
    def services(net: int) -> list[Service]:
        return [
            Service(
                Hostname(f"s{i}.mesh.local"),
                ports=(Port(80, "http"),),
                endpoints=(Endpoint(f"10.{net * 4 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"),),
            )
            for i in range(n)
        ]

    index = Index()
    shard = index.writer(SOURCE)
    shard.replace(services(1)[:10])
    shard.mark_synced()
    second = services(2)
    server = DnsServer(DnsConfig(listen=["127.0.0.1:0"]), index, [ZONE])
    task = asyncio.create_task(server.serve())
    await server.started.wait()
    port = server.addresses[0][1]
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(port), str(seconds), stdout=subprocess.PIPE
    )
    await asyncio.sleep(1.0)
    started = time.perf_counter()
    shard.replace(second)
    published = time.monotonic()
    publish = time.perf_counter() - started
    for _ in range(360_000):  # at most an hour
        if server.version == index.snapshot.version:
            break
        await asyncio.sleep(0.01)
    applied = time.perf_counter() - started
    done = time.monotonic()
    out, _ = await client.communicate()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    pairs = [tuple(map(float, x.split(b":"))) for x in out.split()]
    lat = [b for _, b in pairs]
    during = [b for a, b in pairs if published <= a <= done] or [float("nan")]
    return {
        "services": n,
        "index_publish_s": round(publish, 2),
        "dns_applied_s": round(applied, 2),
        "queries": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "max_ms": round(max(lat) * 1000, 2),
        "queries_during_dns_apply": len(during),
        "max_ms_during_dns_apply": round(max(during) * 1000, 2),
        "p99_ms_during_dns_apply": round(percentile(during, 99) * 1000, 2),
        "longest_step_cpu_ms": round(server.sync_steps.longest * 1000, 2),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench dns_answer")
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--attack", type=int, default=50_000)
    parser.add_argument("--change", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=0.0, help="client duration (default: until applied + 1 s)")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {}
    figures["load"] = bench_load([int(s) for s in args.sizes.split(",")])
    print(table([list(r.values()) for r in figures["load"]], list(figures["load"][0])))
    figures["cpu"] = bench_cpu()
    print(table([list(r.values()) for r in figures["cpu"]], list(figures["cpu"][0])))
    figures["attack"] = bench_attack(args.attack)
    print(table([list(figures["attack"].values())], list(figures["attack"])))
    seconds = args.seconds or max(20.0, args.change / 4000)
    figures["change"] = asyncio.run(_change(args.change, seconds))
    print(table([list(figures["change"].values())], list(figures["change"])))
    path = write_results("dns_answer", figures, "python -m bench dns_answer " + " ".join(argv))
    print(f"results: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
