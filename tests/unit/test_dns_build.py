"""The record build under names many services share: linear growth, and no long step on the event loop.

Timings here are ratios of CPU time between two sizes of the same build (never absolute times), so a slow or
busy machine shifts both sides alike. Absolute figures live in bench/dns_bench.py.
"""

from __future__ import annotations

import time

from discoveryd.dns.records import RecordTable
from discoveryd.model import Hostname, Port, Service, Zone

MESH = Zone(Hostname("mesh.local"))


def _on_one_ip(n: int) -> dict[Hostname, Service]:
    hosts = [Hostname(f"s{i}.mesh.local") for i in range(n)]
    return {h: Service(h, addresses=("10.0.0.1",), ports=(Port(80, "http"),)) for h in hosts}


def _load_seconds(services: dict[Hostname, Service]) -> float:
    best = float("inf")
    for _ in range(3):
        table = RecordTable([MESH], 30, ["127.0.0.1"], 1)
        start = time.process_time()
        table.load(services)
        best = min(best, time.process_time() - start)
    return best


def test_load_grows_linearly_with_services_sharing_one_address() -> None:
    # The reverse name of 10.0.0.1 has one PTR per service: merging must not rescan the others.
    small, large = _on_one_ip(150), _on_one_ip(600)
    ratio = _load_seconds(large) / _load_seconds(small)
    assert ratio < 10, f"4x the services took {ratio:.1f}x the time (linear is ~4x)"
    table = RecordTable([MESH], 30, ["127.0.0.1"], 1)
    table.load(large)
    node = table.node("1.0.0.10.in-addr.arpa")
    assert node is not None and len(node.get(12) or ()) == 600


def test_removing_services_from_a_shared_name_is_linear() -> None:
    small, large = _on_one_ip(300), _on_one_ip(1200)

    def unload(services: dict[Hostname, Service]) -> float:
        best = float("inf")
        for _ in range(5):
            table = RecordTable([MESH], 30, ["127.0.0.1"], 1)
            table.load(services)
            remaining = dict(services)
            start = time.process_time()
            for host in services:
                del remaining[host]
                table.update(remaining, [host])
            best = min(best, time.process_time() - start)
            assert table.node("1.0.0.10.in-addr.arpa") is None
        return best

    ratio = unload(large) / unload(small)
    assert ratio < 10, f"removing 4x the services one by one took {ratio:.1f}x the time"
