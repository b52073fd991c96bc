"""xDS push benchmark: convergence, CPU and bytes per push, memory per client, against a floor.

`python -m bench xds [--clients=1,100,1000] [--pushes=N] [--services=1000] [--endpoints=10]`
`python -m bench xds --scoped [--namespaces=10] [--rules] ...`: the same with exportTo and clients spread over
namespaces (see `_measure_scoped`); `--rules` adds a DestinationRule exported to `.` in every namespace.
`python -m bench xds --policy [--services=1000] [--endpoints=9]`: CDS/EDS/RDS bytes and build time without and
with a DestinationRule of 3 subsets and a VirtualService 80/20 split per service (see `_measure_policy`).
`python -m bench xds --policy --locality [--services=1000] [--endpoints=9]`: locality failover per client:
the shared build, the variants of 3 client localities over every service, 1000 clients served from the
variant cache, and one changed assignment (see `_measure_locality`).
`python -m bench xds --rule-change [--clients=100,1000] [--services=100]`: convergence of SotW and delta
clients after one DestinationRule change, against a floor writing the same responses (see `_measure_rule_change`).
`python -m bench xds --wildcard [--services=100000]`: a `*.example.com` DestinationRule over every service: the
rebuild when it appears, changes and goes (built in steps, as the server does: CPU, wall, and the longest the
event loop went unserved), a small wildcard rule flipping, the name tree's memory (see `_measure_wildcard`).

The daemon's `XdsServer` runs in this process on a loopback port with an index
of `--services` services of `--endpoints` endpoints each. A client subprocess
opens one ADS stream per client (each on its own channel, hence its own TCP
connection), subscribes to every cluster (CDS wildcard, EDS by name) and ACKs
every response. A push is one service's endpoints changing in the index;
its convergence time runs from that write to the server receiving the ACK of
the last client (server clock, no debounce: `debounce_after` 0, so the
figure is the machinery; the configured debounce adds to it). CPU is this
process's (server) CPU time over the push; bytes are response payload bytes
written. Memory per client is the server's RSS growth with all clients
connected and synced, divided by their number.

The floor is a minimal grpc.aio server measured in the same run with the same
client process: it writes one pre-serialized response (the very bytes of an
EDS push) to every stream and waits for every ACK. discoveryd/floor compares
the two medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from bench.common import median, percentile, rss_bytes, table, write_results
from discoveryd.config import XdsConfig
from discoveryd.index import Index, Shard, Snapshot
from discoveryd.model import Endpoint, Hostname, Locality, Port, PortProtocol, Service, SourceId
from discoveryd.policy import (
    DestinationRule,
    HostPolicy,
    HttpMatch,
    HttpRoute,
    LoadBalancer,
    LocalityLb,
    MatchKind,
    OutlierDetection,
    RouteDestination,
    SimpleLb,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
)
from discoveryd.xds import XdsServer
from discoveryd.xds.connection import varint
from discoveryd.xds.locality import Client
from discoveryd.xds.resources import (
    CLUSTER,
    EMPTY_VIEW,
    ENDPOINT,
    ROUTE,
    SHORT,
    Builder,
    BuildOptions,
    Changes,
    View,
)

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def _service(i: int, endpoints: int, generation: int = 0) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.bench.local"),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=tuple(
            Endpoint(f"10.{generation % 250}.{i % 250}.{e + 1}", labels={"app": f"svc{i}"}) for e in range(endpoints)
        ),
    )


def _cluster_names(services: int) -> list[str]:
    return [f"outbound|8080||svc{i}.bench.local" for i in range(services)]


# -- the client subprocess --------------------------------------------------------------------


async def _client_stream(target: str, i: int, names: list[str]) -> None:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        node = {"id": f"bench-{os.getpid()}-{i}", "cluster": "bench"}
        first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        first.node.id, first.node.cluster = node["id"], node["cluster"]
        await call.write(first)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
        async for response in call:
            subscribed = names if response.type_url == ENDPOINT else []
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=subscribed,
                )
            )


async def _client_main(target: str, streams: int, services: int) -> None:
    names = _cluster_names(services)
    tasks = []
    for i in range(streams):
        tasks.append(asyncio.create_task(_client_stream(target, i, names)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not open a thousand TCP connections in one burst
    print("STARTED", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def _clients(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The client subprocess: `python -m bench.xds_bench <argv>` (`--client TARGET STREAMS SERVICES`, ...)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.xds_bench", *argv, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.002)


def _all_acked(server: XdsServer, clients: int, types: tuple[str, ...] = (CLUSTER, ENDPOINT)) -> Any:
    """A check: `clients` streams are connected and each has ACKed its latest response of every type."""

    def check() -> bool:
        conns = server.connections
        return len(conns) == clients and all(
            c.types[t].acked_nonce and c.types[t].acked_nonce == c.types[t].nonce for c in conns for t in types
        )

    return check


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sent_bytes(server: XdsServer) -> float:
    return sum(float(server.metrics.sent_bytes.labels(t)._value.get()) for t in ("CDS", "EDS", "LDS", "RDS"))


# -- discoveryd --------------------------------------------------------------------------------


def _filled(services: Iterable[Service], policies: Iterable[tuple[Hostname, HostPolicy]] = ()) -> tuple[Index, Shard]:
    """An index with one synced shard holding `services` and the hosts' `policies`, written as one version."""
    index = Index()
    shard: Shard = index.writer(SourceId("bench/b"))
    with shard.batch():
        shard.replace(services)
        for host, policy in policies:
            shard.set_policy(host, policy)
    shard.mark_synced()
    return index, shard


def _changed_by(index: Index, change: Any, *args: Any) -> set[Hostname]:
    """The hostnames `change(*args)` changed in `index`."""
    before = index.snapshot.version
    change(*args)
    return index.changed_between(before, index.snapshot.version)


async def _measure_discoveryd(clients: int, pushes: int, services: int, endpoints: int) -> dict[str, Any]:
    index, shard = _filled([_service(i, endpoints) for i in range(services)])
    server = XdsServer(XdsConfig(listen="127.0.0.1:0", debounce_after=0.0, debounce_max=0.0), index)
    serving = asyncio.create_task(server.serve())
    await server.started.wait()
    rss_before = rss_bytes()
    target = f"127.0.0.1:{server.ports[0]}"
    try:
        async with _clients("--client", target, str(clients), str(services)):
            t_connect = time.monotonic()

            await _wait(_all_acked(server, clients), 600, "initial sync of every client")
            initial_sync = time.monotonic() - t_connect
            rss_after = rss_bytes()
            results: list[float] = []
            cpu: list[float] = []
            sent: list[float] = []
            per_client: list[float] = []
            for p in range(1, pushes + 1):
                i = p % services
                conns = server.connections
                before_nonces = {c.id: c.types[ENDPOINT].nonce for c in conns}
                cpu0, bytes0 = _cpu(), _sent_bytes(server)
                t0 = time.monotonic()
                shard.upsert(_service(i, endpoints, generation=p))

                def converged(conns: list[Any] = conns, before_nonces: dict[int, str] = before_nonces) -> bool:
                    return all(
                        c.types[ENDPOINT].nonce != before_nonces[c.id]
                        and c.types[ENDPOINT].acked_nonce == c.types[ENDPOINT].nonce
                        for c in conns
                    )

                await _wait(converged, 120, f"push {p}")
                acks = [c.types[ENDPOINT].acked_at or t0 for c in conns]
                results.append(max(acks) - t0)
                per_client.extend(a - t0 for a in acks)
                cpu.append(_cpu() - cpu0)
                sent.append(_sent_bytes(server) - bytes0)
                await asyncio.sleep(0.02)
            push_body = _push_response(server, _cluster_names(services)[pushes % services])
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    return {
        "clients": clients,
        "initial_sync_s": initial_sync,
        "convergence_median_s": median(results),
        "convergence_p99_s": percentile(results, 99),
        "per_client_ack_median_s": median(per_client),
        "cpu_s_per_push": median(cpu),
        "bytes_per_push": median(sent),
        "rss_per_client_bytes": (rss_after - rss_before) / clients,
        "push_response": push_body,
    }


def _push_response(server: XdsServer, name: str) -> bytes:
    """The bytes of an EDS push of one cluster, as discoveryd writes them."""
    r = server.view.resources[ENDPOINT][name]
    head = discovery_pb2.DiscoveryResponse(version_info=r.version, type_url=ENDPOINT, nonce="1").SerializeToString()
    return head + b"\x12" + varint(len(r.body)) + r.body


# -- the floor ---------------------------------------------------------------------------------


class _Floor:
    """A grpc.aio server that writes pre-serialized responses to every open stream on `push()` and
    counts the ACKs (requests carrying a response nonce) each stream sends back."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.streams: dict[int, asyncio.Queue[bytes | None]] = {}
        self.acks: dict[int, float] = {}
        """Stream → time of its latest ACK since the last push."""
        self.acked: dict[int, int] = {}

    async def handle(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, bytes]) -> None:
        key = id(context)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.streams[key] = queue

        async def read() -> None:
            async for request in requests:
                if request.response_nonce:
                    self.acked[key] = self.acked.get(key, 0) + 1
                    self.acks[key] = time.monotonic()

        reader = asyncio.create_task(read())
        try:
            while (body := await queue.get()) is not None:
                await context.write(body)
        finally:
            reader.cancel()
            self.streams.pop(key, None)

    def push(self) -> None:
        self.acks.clear()
        self.acked.clear()
        for queue in self.streams.values():
            for body in self.bodies:
                queue.put_nowait(body)

    def done(self, clients: int) -> bool:
        """Every one of `clients` streams has ACKed every response of the push."""
        n = len(self.bodies)
        return len(self.acked) == clients and all(v >= n for v in self.acked.values())

    def close(self) -> None:
        """End every stream (the handlers return)."""
        for queue in self.streams.values():
            queue.put_nowait(None)


async def _measure_floor(
    clients: int, pushes: int, bodies: list[bytes], client: tuple[str, ...], *, delta: bool = False
) -> dict[str, Any]:
    """The floor's convergence: `bodies` written to each of `clients` streams of the client subprocess
    (`client`: its mode and arguments; the target is put after the mode), until every one is ACKed."""
    floor = _Floor(bodies)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", -1)])
    request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    handler = grpc.stream_stream_rpc_method_handler(
        floor.handle, request_deserializer=request.FromString, response_serializer=bytes
    )
    service, method = (DELTA_ADS if delta else ADS).strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results: list[float] = []
    cpu: list[float] = []
    try:
        async with _clients(client[0], f"127.0.0.1:{port}", *client[1:]):
            await _wait(lambda: len(floor.streams) == clients, 600, "floor clients connected")
            await asyncio.sleep(0.5)  # their initial requests (unanswered here) have arrived
            for _ in range(pushes):
                cpu0 = _cpu()
                t0 = time.monotonic()
                floor.push()
                await _wait(lambda: floor.done(clients), 300, "floor push")
                results.append(max(floor.acks.values()) - t0)
                cpu.append(_cpu() - cpu0)
                await asyncio.sleep(0.02)
    finally:
        floor.close()
        await server.stop(1.0)
    return {
        "convergence_median_s": median(results),
        "convergence_p99_s": percentile(results, 99),
        "cpu_s_per_push": median(cpu),
    }


# -- exportTo: clients in namespaces -------------------------------------------------------------


def _scoped_service(i: int, namespaces: int, endpoints: int, generation: int = 0, restrict: bool = True) -> Service:
    """svc<i> in namespace ns<i // 2 % namespaces>; every odd one exported to its own namespace only."""
    protocol = PortProtocol.GRPC if generation else PortProtocol.HTTP  # each push changes a fresh service
    return Service(
        hostname=Hostname(f"svc{i}.bench.local"),
        namespace=f"ns{i // 2 % namespaces}",
        export_to=(".",) if restrict and i % 2 else (),
        ports=(Port(8080, protocol.value.lower(), protocol),),
        endpoints=tuple(Endpoint(f"10.0.{i % 250}.{e + 1}") for e in range(endpoints)),
    )


def _visible_names(services: int, namespaces: int, ns: int, restrict: bool) -> list[str]:
    return [
        f"outbound|8080||svc{i}.bench.local"
        for i in range(services)
        if not restrict or i % 2 == 0 or i // 2 % namespaces == ns
    ]


async def _scoped_stream(target: str, i: int, namespaces: int, names: list[str]) -> None:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        first.node.id, first.node.cluster = f"bench-{os.getpid()}-{i}", "bench"
        first.node.metadata.update({"NAMESPACE": f"ns{i % namespaces}"})
        await call.write(first)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
        async for response in call:
            subscribed = names if response.type_url == ENDPOINT else []
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=subscribed,
                )
            )


async def _scoped_client_main(target: str, streams: int, services: int, namespaces: int, restrict: bool) -> None:
    per_ns = [_visible_names(services, namespaces, ns, restrict) for ns in range(namespaces)]
    tasks = []
    for i in range(streams):
        tasks.append(asyncio.create_task(_scoped_stream(target, i, namespaces, per_ns[i % namespaces])))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    print("STARTED", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)


def _namespace_rules(services: int, namespaces: int) -> dict[Hostname, HostPolicy]:
    """Per namespace ns<k>, a DestinationRule exported to `.` for the public service svc<2k>: every namespace
    has a variant of one cluster of its own (`--rules`)."""
    out: dict[Hostname, HostPolicy] = {}
    for k in range(min(namespaces, (services + 1) // 2)):
        host = Hostname(f"svc{2 * k}.bench.local")
        policy = TrafficPolicy(load_balancer=LoadBalancer(simple=SimpleLb.LEAST_REQUEST))
        out[host] = HostPolicy(DestinationRule(host, f"ns{k}", f"own-{k}", policy, export_to=(".",)))
    return out


async def _measure_scoped(
    clients: int,
    pushes: int,
    services: int,
    endpoints: int,
    namespaces: int,
    restrict: bool,
    rules: bool = False,
) -> dict[str, Any]:
    """Cluster changes pushed to `clients` wildcard SotW CDS clients spread over `namespaces`.

    A push changes one unrestricted service's cluster (its port protocol), so
    every client gets a full CDS response and the changed assignment; with
    `restrict`, half the services are exported to their own namespace only,
    so each namespace sees a different cluster set.
    """
    index, shard = _filled(
        [_scoped_service(i, namespaces, endpoints, restrict=restrict) for i in range(services)],
        _namespace_rules(services, namespaces).items() if rules else (),
    )
    server = XdsServer(XdsConfig(listen="127.0.0.1:0", debounce_after=0.0, debounce_max=0.0), index)
    serving = asyncio.create_task(server.serve())
    await server.started.wait()
    target = f"127.0.0.1:{server.ports[0]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.xds_bench", "--scoped-client", target, str(clients), str(services),
        str(namespaces), "1" if restrict else "0",
    )  # fmt: skip
    results: list[float] = []
    cpu: list[float] = []
    sent: list[float] = []
    builds: list[int] = []
    build_s: list[float] = []
    body_s: list[float] = []
    try:
        await _wait(_all_acked(server, clients), 600, "initial sync of every client")
        for p in range(1, pushes + 1):
            i = (2 * p) % services  # even: exported to every namespace
            conns = server.connections
            before = {c.id: c.types[CLUSTER].nonce for c in conns}
            builds0 = _count(server.metrics.build_seconds)
            sum0 = _sum(server.metrics.build_seconds)
            cpu0, bytes0 = _cpu(), _sent_bytes(server)
            t0 = time.monotonic()
            shard.upsert(_scoped_service(i, namespaces, endpoints, generation=p, restrict=restrict))

            def converged(conns: list[Any] = conns, before: dict[int, str] = before) -> bool:
                return all(
                    c.types[CLUSTER].nonce != before[c.id] and c.types[CLUSTER].acked_nonce == c.types[CLUSTER].nonce
                    for c in conns
                )

            await _wait(converged, 120, f"push {p}")
            results.append(max(c.types[CLUSTER].acked_at or t0 for c in conns) - t0)
            cpu.append(_cpu() - cpu0)
            sent.append(_sent_bytes(server) - bytes0)
            builds.append(len(server.view.cached_scopes(CLUSTER)))
            if _count(server.metrics.build_seconds) > builds0:
                build_s.append(
                    (_sum(server.metrics.build_seconds) - sum0) / (_count(server.metrics.build_seconds) - builds0)
                )
            view = server.view
            t1 = time.perf_counter()
            for ns in range(namespaces):  # the per-scope body, measured on a copy with an empty memo
                dataclasses.replace(view, _bodies={}).sotw_body(CLUSTER, f"ns{ns}")
            body_s.append((time.perf_counter() - t1) / namespaces)
            await asyncio.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    return {
        "clients": clients,
        "namespaces": namespaces,
        "restricted": restrict,
        "rules": rules,
        "pushes": pushes,
        "convergence_median_s": median(results),
        "convergence_p99_s": percentile(results, 99),
        "cpu_s_per_push": median(cpu),
        "bytes_per_push": median(sent),
        "cds_bodies_built_per_push": median([float(b) for b in builds]),
        "rebuild_s_per_push": median(build_s) if build_s else 0.0,
        "cds_body_s_per_scope": median(body_s),
    }


def _count(histogram: Any) -> float:
    return float(next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count")))


def _sum(histogram: Any) -> float:
    return float(next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_sum")))


async def _run_scoped(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"services": args.services, "endpoints": args.services * args.endpoints, "runs": []}
    for clients in args.clients:
        for restrict in (False, True):
            run = await _measure_scoped(
                clients, args.pushes, args.services, args.endpoints, args.namespaces, restrict, args.rules
            )
            figures["runs"].append(run)
            print(f"  {clients} clients, restricted={restrict}, rules={args.rules} done", flush=True)
    return figures


def _main_scoped(args: argparse.Namespace, argv: list[str]) -> None:
    figures = asyncio.run(_run_scoped(args))
    ms = 1000.0
    rows = [
        [
            run["clients"],
            run["namespaces"],
            ("half '.'" if run["restricted"] else "none") + (" + a rule per ns" if run.get("rules") else ""),
            f"{run['cds_bodies_built_per_push']:.0f}",
            f"{run['cds_body_s_per_scope'] * ms:.2f}",
            f"{run['rebuild_s_per_push'] * ms:.2f}",
            f"{run['convergence_median_s'] * ms:.1f}",
            f"{run['convergence_p99_s'] * ms:.1f}",
            f"{run['cpu_s_per_push'] * ms:.1f}",
            f"{run['bytes_per_push'] / 1024:.0f}",
        ]
        for run in figures["runs"]
    ]
    header = [
        "clients", "namespaces", "exportTo", "CDS bodies/push", "ms/body", "rebuild ms/push",
        "conv p50 ms", "conv p99 ms", "cpu ms/push", "KiB/push",
    ]  # fmt: skip
    print(f"{figures['services']} services, {figures['endpoints']} endpoints; CDS wildcard SotW clients; no debounce")
    print(table(rows, header))
    name = "xds_scoped_rules" if args.rules else "xds_scoped"
    write_results(name, figures, ("python -m bench xds " + " ".join(argv)).strip())


# -- rebuild cost by index size -----------------------------------------------------------------


def _measure_rebuild(sizes: list[int], changes: int) -> dict[str, Any]:
    """`Builder.update` for one changed service, at each index size (in-process, no clients)."""
    runs = []
    for size in sizes:
        index, shard = _filled([_service(i, 2) for i in range(size)])
        builder = Builder(BuildOptions())
        view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
        times = []
        for p in range(1, changes + 1):
            changed = _changed_by(index, shard.upsert, _service(p % size, 2, generation=p))
            t0 = time.perf_counter()
            view, _ = builder.update(view, index.snapshot, changed)
            times.append(time.perf_counter() - t0)
        runs.append({"services": size, "update_median_s": median(times), "update_p99_s": percentile(times, 99)})
        print(f"  {size} services done", flush=True)
    return {"changes": changes, "runs": runs}


def _main_rebuild(args: argparse.Namespace, argv: list[str]) -> None:
    figures = _measure_rebuild(args.sizes, args.pushes)
    rows = [
        [r["services"], f"{r['update_median_s'] * 1e6:.0f}", f"{r['update_p99_s'] * 1e6:.0f}"] for r in figures["runs"]
    ]
    print("Builder.update for one changed service (2 endpoints, one port: 4 resources)")
    print(table(rows, ["services", "p50 us", "p99 us"]))
    write_results("xds_rebuild", figures, ("python -m bench xds " + " ".join(argv)).strip())


# -- wildcard rule hosts ----------------------------------------------------------------------------------


def _wild_service(i: int, domain: str = "example.com", generation: int = 0) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.{domain}"),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=(Endpoint(f"10.{i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}", weight=1 + generation),),
    )


def _wild_rule(host: str, generation: int) -> HostPolicy:
    traffic = TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx=5 + generation, interval=10.0))
    return HostPolicy(DestinationRule(Hostname(host), "default", "wild", traffic))


def _build_in_steps(
    loop: asyncio.AbstractEventLoop,
    builder: Builder,
    view: View,
    snapshot: Snapshot,
    changed: Iterable[Hostname] | None,
) -> tuple[View, Changes, dict[str, float]]:
    """`Builder.update_in_steps` on `loop` with a ticker task, as the xDS server runs it: the view, its changes,
    and its CPU, wall and the longest the loop went without a tick (CPU seconds of this thread).

    The cyclic collector is off from a collection before to the end of the ticker (the build pauses it
    itself; this keeps a collection the ticker's own allocations would start right after out of the
    figure): `gc_after_cpu_s` is the full collection that follows, a cost of the heap's size, not of the build.
    """
    import gc

    async def run() -> tuple[View, Changes, dict[str, float]]:
        longest, done = 0.0, False

        async def ticker() -> None:
            nonlocal longest
            last = time.thread_time()
            while not done:
                await asyncio.sleep(0)
                now = time.thread_time()
                longest = max(longest, now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        cpu, wall = _cpu(), time.perf_counter()
        try:
            new, changes = await builder.update_in_steps(view, snapshot, changed)
        finally:
            figures = {"cpu_s": _cpu() - cpu, "wall_s": time.perf_counter() - wall}
            done = True
            await task
        return new, changes, figures | {"longest_stall_cpu_s": longest}

    gc.collect()
    gc.disable()
    try:
        new, changes, figures = loop.run_until_complete(run())
    finally:
        gc.enable()
    cpu = _cpu()
    gc.collect()
    return new, changes, figures | {"gc_after_cpu_s": _cpu() - cpu}


def _measure_wildcard(services: int, flips: int) -> dict[str, Any]:
    """`Builder.update` when a `*.example.com` DestinationRule (in the services' namespace) appears, changes and
    goes, with `services` matching services and 10 others; then a `*.other.org` rule matching those 10 flipping
    on and off (the name tree is built when the first wildcard rule appears and dropped with the last); and
    the memory of the name tree (tracemalloc) over every hostname. In-process, no clients."""
    import gc
    import tracemalloc

    from discoveryd.policy import HostTree

    index, shard = _filled(
        [_wild_service(i) for i in range(services)] + [_wild_service(i, "other.org") for i in range(10)]
    )
    builder = Builder(BuildOptions())
    out: dict[str, Any] = {"services": services, "load_average": os.getloadavg()}
    loop = asyncio.new_event_loop()
    view, _, out["full_build"] = _build_in_steps(loop, builder, EMPTY_VIEW, index.snapshot, None)

    def step(change: Any) -> dict[str, Any]:
        nonlocal view
        changed = _changed_by(index, change)
        view, touched, figures = _build_in_steps(loop, builder, view, index.snapshot, changed)
        return figures | {"resources_changed": sum(len(n) for n in touched.values())}

    wild = Hostname("*.example.com")
    out["add_wildcard_rule"] = step(lambda: shard.set_policy(wild, _wild_rule(wild, 0)))
    out["change_wildcard_rule"] = step(lambda: shard.set_policy(wild, _wild_rule(wild, 1)))
    out["one_service_changes_under_the_rule"] = step(lambda: shard.upsert(_wild_service(5, "example.com", 1)))
    out["remove_wildcard_rule"] = step(lambda: shard.set_policy(wild, None))
    small = Hostname("*.other.org")
    adds, removes = [], []
    for k in range(flips):
        adds.append(step(lambda k=k: shard.set_policy(small, _wild_rule(small, k))))
        removes.append(step(lambda: shard.set_policy(small, None)))
    out["small_rule_add_cpu_s_median"] = median([a["cpu_s"] for a in adds])
    out["small_rule_remove_cpu_s_median"] = median([r["cpu_s"] for r in removes])
    loop.close()
    names = list(index.snapshot.services)
    gc.collect()
    tracemalloc.start()
    cpu = _cpu()
    tree = HostTree(names)
    out["tree_build_cpu_s"] = _cpu() - cpu
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["tree_bytes"] = held
    out["tree_bytes_per_name"] = held / len(names)
    cpu = _cpu()
    matched = len(tree.matching(wild))
    out["tree_matching_cpu_s"] = _cpu() - cpu
    out["tree_matched"] = matched
    return out


def _main_wildcard(args: argparse.Namespace, argv: list[str]) -> None:
    f = _measure_wildcard(args.services, 5)
    rows = [
        [
            what,
            f"{f[key]['cpu_s']:.2f}",
            f"{f[key]['wall_s']:.2f}",
            f"{f[key]['longest_stall_cpu_s'] * 1e3:.1f}",
            f"{f[key]['gc_after_cpu_s']:.2f}",
            f[key].get("resources_changed", ""),
        ]
        for what, key in (
            ("full build, no rule", "full_build"),
            ("*.example.com rule added", "add_wildcard_rule"),
            ("*.example.com rule changed", "change_wildcard_rule"),
            ("one service under it changed", "one_service_changes_under_the_rule"),
            ("*.example.com rule removed", "remove_wildcard_rule"),
        )
    ]
    print(f"{f['services']} services under example.com; load average {f['load_average']}")
    print(
        table(
            rows,
            ["Builder.update_in_steps", "cpu s", "wall s", "longest stall ms CPU", "gc after s", "resources changed"],
        )
    )
    print(
        f"*.other.org (10 hosts) on/off: add {f['small_rule_add_cpu_s_median'] * 1e3:.1f} ms, "
        f"remove {f['small_rule_remove_cpu_s_median'] * 1e3:.1f} ms CPU (median of 5)"
    )
    print(
        f"name tree: {f['tree_bytes'] / 1e6:.1f} MB ({f['tree_bytes_per_name']:.0f} B/name), built in "
        f"{f['tree_build_cpu_s'] * 1e3:.0f} ms CPU; *.example.com matched {f['tree_matched']} in "
        f"{f['tree_matching_cpu_s'] * 1e3:.1f} ms CPU"
    )
    write_results("xds_wildcard", f, ("python -m bench xds " + " ".join(argv)).strip())


# -- traffic policy: subsets and routes ---------------------------------------------------------------

SUBSETS = ("v0", "v1", "v2")


def _policy_service(i: int, endpoints: int) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.bench.local"),
        namespace="bench",  # the rules' namespace: they apply to every client (Istio's lookup)
        ports=(Port(8080, "grpc", PortProtocol.GRPC),),
        endpoints=tuple(
            Endpoint(f"10.{i // 250 % 250}.{i % 250}.{e + 1}", labels={"version": SUBSETS[e % len(SUBSETS)]})
            for e in range(endpoints)
        ),
    )


def _host_policy(i: int, generation: int = 0) -> HostPolicy:
    host = Hostname(f"svc{i}.bench.local")
    rule = DestinationRule(
        host,
        "bench",
        f"svc{i}",
        TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx=5 + generation, interval=10.0)),
        tuple(Subset(name, {"version": name}) for name in SUBSETS),
    )
    split = HttpRoute(destinations=(RouteDestination(host, "v0", None, 80), RouteDestination(host, "v1", None, 20)))
    canary = HttpRoute(
        matches=(HttpMatch(headers=(("x-canary", StringMatch(MatchKind.EXACT, "yes")),)),),
        destinations=(RouteDestination(host, "v2"),),
    )
    return HostPolicy(rule, VirtualService((host,), "bench", f"svc{i}", (canary, split)))


def _measure_policy(services: int, endpoints: int, changes: int) -> dict[str, Any]:
    """Full build and per-type bytes without/with policies, then one DestinationRule change (in-process)."""
    out: dict[str, Any] = {"services": services, "endpoints_per_service": endpoints, "subsets": len(SUBSETS)}
    for with_policy in (False, True):
        index, shard = _filled(
            [_policy_service(i, endpoints) for i in range(services)],
            ((Hostname(f"svc{i}.bench.local"), _host_policy(i)) for i in range(services if with_policy else 0)),
        )
        builder = Builder(BuildOptions())
        t0 = time.perf_counter()
        view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
        build_s = time.perf_counter() - t0
        sizes = {
            SHORT[t]: {
                "resources": len(view.resources[t]),
                "bytes": sum(len(r.body) for r in view.resources[t].values()),
            }
            for t in (CLUSTER, ENDPOINT, ROUTE)
        }
        key = "with_policy" if with_policy else "without_policy"
        out[key] = {"build_s": build_s, "types": sizes}
        if with_policy:
            times = []
            for p in range(1, changes + 1):
                host = Hostname(f"svc{p % services}.bench.local")
                changed = _changed_by(index, shard.set_policy, host, _host_policy(p % services, p))
                t0 = time.perf_counter()
                view, touched = builder.update(view, index.snapshot, changed)
                times.append(time.perf_counter() - t0)
            out["rule_change_median_s"] = median(times)
            out["rule_change_p99_s"] = percentile(times, 99)
            out["rule_change_resources"] = sum(len(n) for n in touched.values())
    return out


def _main_policy(args: argparse.Namespace, argv: list[str]) -> None:
    f = _measure_policy(args.services, args.endpoints, args.pushes)
    rows = []
    for key in ("without_policy", "with_policy"):
        run = f[key]
        row: list[Any] = [key.replace("_", " "), f"{run['build_s']:.2f}"]
        for t in ("CDS", "EDS", "RDS"):
            row += [run["types"][t]["resources"], f"{run['types'][t]['bytes'] / 1024:.0f}"]
        rows.append(row)
    header = ["", "build s", "CDS n", "CDS KiB", "EDS n", "EDS KiB", "RDS n", "RDS KiB"]
    print(f"{f['services']} services x {f['subsets']} subsets, {f['endpoints_per_service']} endpoints each")
    print(table(rows, header))
    print(
        f"one DestinationRule change: Builder.update p50 {f['rule_change_median_s'] * 1e3:.2f} ms, "
        f"p99 {f['rule_change_p99_s'] * 1e3:.2f} ms, {f['rule_change_resources']} resources touched"
    )
    write_results("xds_policy", f, ("python -m bench xds " + " ".join(argv)).strip())


# -- traffic policy: locality failover per client ------------------------------------------------

ZONES = ("a", "b", "c")


def _located_service(i: int, endpoints: int, generation: int = 0) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.bench.local"),
        namespace="bench",  # the rules' namespace: they apply to every client (Istio's lookup)
        ports=(Port(8080, "grpc", PortProtocol.GRPC),),
        endpoints=tuple(
            Endpoint(
                f"10.{i // 250 % 250}.{i % 250}.{e + 1}",
                locality=Locality("r1", ZONES[e % len(ZONES)]),
                weight=1 + generation % 2 if e == 0 else 1,
            )
            for e in range(endpoints)
        ),
    )


def _located_policy(i: int) -> HostPolicy:
    host = Hostname(f"svc{i}.bench.local")
    policy = TrafficPolicy(
        load_balancer=LoadBalancer(locality=LocalityLb(enabled=True)),
        outlier_detection=OutlierDetection(consecutive_5xx=5, interval=10.0),
    )
    return HostPolicy(DestinationRule(host, "bench", f"svc{i}", policy))


def _timed(run: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of `run()`."""
    w0, c0 = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - w0, time.process_time() - c0


def _measure_locality(services: int, endpoints: int, changes: int) -> dict[str, Any]:
    """Shared build with and without the setting; variants of 3 client localities; 1000 clients; one change."""
    out: dict[str, Any] = {"services": services, "endpoints_per_service": endpoints, "zones": len(ZONES)}
    clients = [Client("r1", ZONES[c % len(ZONES)], f"node-{c}") for c in range(1000)]
    for located in (False, True):
        index, shard = _filled(
            [_located_service(i, endpoints) for i in range(services)],
            ((Hostname(f"svc{i}.bench.local"), _located_policy(i)) for i in range(services if located else 0)),
        )
        builder = Builder(BuildOptions(locality_variants=4 * services))
        w0, c0 = time.perf_counter(), time.process_time()
        view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        key = "located" if located else "plain"
        out[key] = {"build_s": wall, "build_cpu_s": cpu}
        if not located:
            continue
        table_ = view.resources[ENDPOINT]
        names = sorted(table_)

        def variants(view: Any = view, table_: Any = table_, names: list[str] = names) -> None:
            for client in clients[: len(ZONES)]:
                for n in names:
                    view.localize(table_[n], client)

        wall, cpu = _timed(variants)
        out[key].update(
            variants_s=wall,
            variants_cpu_s=cpu,
            variants_built=builder.variants.builds,
            variant_bytes=builder.variants.held_bytes(),
            shared_eds_bytes=sum(len(r.body) for r in table_.values()),
        )
        sample = names[: min(100, len(names))]

        def served(view: Any = view, table_: Any = table_, sample: list[str] = sample) -> None:
            for client in clients:
                for n in sample:
                    view.localize(table_[n], client)

        builds = builder.variants.builds
        wall, cpu = _timed(served)
        out[key].update(
            cached_lookup_us=wall / (len(clients) * len(sample)) * 1e6,
            cached_lookup_cpu_us=cpu / (len(clients) * len(sample)) * 1e6,
            builds_for_1000_clients=builder.variants.builds - builds,
        )
        times, cpus, built = [], [], []
        for p in range(1, changes + 1):
            i = p % services
            changed = _changed_by(index, shard.upsert, _located_service(i, endpoints, p))
            b0 = builder.variants.builds
            w0, c0 = time.perf_counter(), time.process_time()
            view, touched = builder.update(view, index.snapshot, changed)
            for client in clients:  # every client asks for the changed assignment
                for n in touched.get(ENDPOINT, ()):
                    view.localize(view.resources[ENDPOINT][n], client)
            times.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            built.append(builder.variants.builds - b0)
        out[key].update(
            change_median_s=median(times),
            change_cpu_median_s=median(cpus),
            change_builds=max(built),
        )
    out["loadavg"] = os.getloadavg()
    return out


def _main_locality(args: argparse.Namespace, argv: list[str]) -> None:
    f = _measure_locality(args.services, args.endpoints, args.pushes)
    p, loc = f["plain"], f["located"]
    ms = 1000.0
    print(f"{f['services']} services, {f['endpoints_per_service']} endpoints each over {f['zones']} zones")
    print(
        f"shared build: without the setting {p['build_s']:.2f} s wall / {p['build_cpu_s']:.2f} s CPU, "
        f"with {loc['build_s']:.2f} / {loc['build_cpu_s']:.2f} s"
    )
    print(
        f"variants of 3 client localities x {f['services']} assignments: {loc['variants_s'] * ms:.0f} ms wall / "
        f"{loc['variants_cpu_s'] * ms:.0f} ms CPU, {loc['variants_built']} built, "
        f"{loc['variant_bytes'] / 1024:.0f} KiB (shared EDS {loc['shared_eds_bytes'] / 1024:.0f} KiB)"
    )
    print(
        f"1000 clients in 3 zones: {loc['cached_lookup_us']:.2f} us wall / {loc['cached_lookup_cpu_us']:.2f} us CPU "
        f"per (client, assignment) from the cache, {loc['builds_for_1000_clients']} builds"
    )
    print(
        f"one changed assignment, served to 1000 clients: p50 {loc['change_median_s'] * ms:.2f} ms wall / "
        f"{loc['change_cpu_median_s'] * ms:.2f} ms CPU, {loc['change_builds']} variant builds"
    )
    print(f"load average {f['loadavg']}")
    write_results("xds_locality", f, ("python -m bench xds " + " ".join(argv)).strip())


# -- convergence after a DestinationRule change ------------------------------------------------------


def _policy_cluster_names(services: int) -> list[str]:
    return [f"outbound|8080|{s}|svc{i}.bench.local" for i in range(services) for s in ("", *SUBSETS)]


async def _delta_client_stream(target: str, i: int, names: list[str]) -> None:
    """A delta ADS client: CDS wildcard, EDS by name, ACKing every response."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.stream_stream(
            DELTA_ADS,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )()
        first = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)
        first.node.id, first.node.cluster = f"bench-{os.getpid()}-{i}", "bench"
        await call.write(first)
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
        async for response in call:
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
            )


async def _rule_client_main(target: str, streams: int, services: int, delta: bool) -> None:
    names = _policy_cluster_names(services)
    stream = _delta_client_stream if delta else _client_stream
    tasks = []
    for i in range(streams):
        tasks.append(asyncio.create_task(stream(target, i, names)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not open a thousand TCP connections in one burst
    await asyncio.gather(*tasks, return_exceptions=True)


async def _measure_rule_change(clients: int, pushes: int, services: int, endpoints: int, delta: bool) -> dict[str, Any]:
    """`clients` ADS clients subscribed to every cluster (subsets included) and its endpoints; a push
    changes one host's DestinationRule (its outlier detection), so its 4 clusters change. Convergence runs
    from the index write to the last client's ACK of the new clusters and of the assignments re-sent
    after them."""
    index, shard = _filled(
        [_policy_service(i, endpoints) for i in range(services)],
        ((Hostname(f"svc{i}.bench.local"), _host_policy(i)) for i in range(services)),
    )
    server = XdsServer(XdsConfig(listen="127.0.0.1:0", debounce_after=0.0, debounce_max=0.0), index)
    serving = asyncio.create_task(server.serve())
    await server.started.wait()
    rss_before = rss_bytes()
    target = f"127.0.0.1:{server.ports[0]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.xds_bench", "--rule-client", target, str(clients), str(services),
        "1" if delta else "0",
    )  # fmt: skip
    results: list[float] = []
    cpu: list[float] = []
    sent: list[float] = []
    bodies: list[bytes] = []
    try:
        t_connect = time.monotonic()
        await _wait(_all_acked(server, clients), 600, "initial sync of every client")
        initial_sync = time.monotonic() - t_connect
        rss_after = rss_bytes()
        for p in range(1, pushes + 1):
            i = p % services
            conns = server.connections
            before = {c.id: (c.types[CLUSTER].nonce, c.types[ENDPOINT].nonce) for c in conns}
            cpu0, bytes0 = _cpu(), _sent_bytes(server)
            t0 = time.monotonic()
            shard.set_policy(Hostname(f"svc{i}.bench.local"), _host_policy(i, p))

            def converged(conns: list[Any] = conns, before: dict[int, tuple[str, str]] = before) -> bool:
                return all(
                    c.types[t].nonce != before[c.id][k] and c.types[t].acked_nonce == c.types[t].nonce
                    for c in conns
                    for k, t in enumerate((CLUSTER, ENDPOINT))
                )

            await _wait(converged, 300, f"push {p}")
            results.append(max(max(c.types[t].acked_at or t0 for t in (CLUSTER, ENDPOINT)) for c in conns) - t0)
            cpu.append(_cpu() - cpu0)
            sent.append(_sent_bytes(server) - bytes0)
            await asyncio.sleep(0.02)
        bodies = _rule_push_bodies(server, pushes % services, delta)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    rule_client = ("--rule-client", str(clients), str(services), "1" if delta else "0")
    floor = await _measure_floor(clients, pushes, bodies, rule_client, delta=delta)
    return {
        "clients": clients,
        "delta": delta,
        "pushes": pushes,
        "initial_sync_s": initial_sync,
        "convergence_median_s": median(results),
        "convergence_p99_s": percentile(results, 99),
        "cpu_s_per_push": median(cpu),
        "bytes_per_push": median(sent),
        "rss_per_client_bytes": (rss_after - rss_before) / clients,
        "floor": floor,
        "ratio_median": median(results) / floor["convergence_median_s"],
    }


def _rule_push_bodies(server: XdsServer, i: int, delta: bool) -> list[bytes]:
    """The responses one DestinationRule change of host `i` sends a client: its clusters, then its assignments."""
    view = server.view
    host = f"svc{i}.bench.local"
    changed = [f"outbound|8080|{s}|{host}" for s in ("", *SUBSETS)]
    out = []
    for type_url in (CLUSTER, ENDPOINT):
        table = view.resources[type_url]
        if delta:
            response = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce="1", system_version_info="1")
            for name in changed:
                r = table[name]
                resource = response.resources.add(name=name, version=r.version)
                resource.resource.type_url = type_url
                resource.resource.value = r.body
            out.append(response.SerializeToString())
            continue
        head = discovery_pb2.DiscoveryResponse(version_info="1", type_url=type_url, nonce="1").SerializeToString()
        if type_url == CLUSTER:  # state of the world: every cluster
            out.append(head + view.sotw_body(CLUSTER, None))
        else:
            out.append(head + b"".join(b"\x12" + varint(len(table[n].body)) + table[n].body for n in changed))
    return out


def _main_rule_change(args: argparse.Namespace, argv: list[str]) -> None:
    runs = []
    for delta in (False, True):
        for clients in args.clients:
            run = asyncio.run(_measure_rule_change(clients, args.pushes, args.services, args.endpoints, delta))
            runs.append(run)
            print(f"  {clients} {'delta' if delta else 'sotw'} clients done", flush=True)
    ms = 1000.0
    rows = [
        [
            "delta" if r["delta"] else "sotw",
            r["clients"],
            f"{r['convergence_median_s'] * ms:.1f}",
            f"{r['convergence_p99_s'] * ms:.1f}",
            f"{r['floor']['convergence_median_s'] * ms:.1f}",
            f"{r['floor']['convergence_p99_s'] * ms:.1f}",
            f"{r['ratio_median']:.2f}",
            f"{r['cpu_s_per_push'] * ms:.1f}",
            f"{r['floor']['cpu_s_per_push'] * ms:.1f}",
            f"{r['bytes_per_push'] / 1024:.0f}",
            f"{r['initial_sync_s']:.2f}",
        ]
        for r in runs
    ]
    header = [
        "protocol", "clients", "conv p50 ms", "conv p99 ms", "floor p50 ms", "floor p99 ms", "ours/floor",
        "cpu ms/push", "floor cpu ms", "KiB/push", "initial sync s",
    ]  # fmt: skip
    print(
        f"one DestinationRule change; {args.services} services x {len(SUBSETS)} subsets, "
        f"{args.endpoints} endpoints each; no debounce"
    )
    print(table(rows, header))
    figures = {"services": args.services, "endpoints_per_service": args.endpoints, "runs": runs}
    write_results("xds_rule_change", figures, ("python -m bench xds " + " ".join(argv)).strip())


# -- entry points ------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"services": args.services, "endpoints": args.services * args.endpoints, "runs": []}
    for clients in args.clients:
        pushes = args.pushes if clients < 1000 else max(10, args.pushes // 2)
        ours = await _measure_discoveryd(clients, pushes, args.services, args.endpoints)
        body = ours.pop("push_response")
        floor = await _measure_floor(clients, pushes, [body], ("--client", str(clients), str(args.services)))
        ours["floor"] = floor
        ours["pushes"] = pushes
        ours["ratio_median"] = ours["convergence_median_s"] / floor["convergence_median_s"]
        figures["runs"].append(ours)
        print(f"  {clients} clients done", flush=True)
    return figures


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--client":
        target, streams, services = argv[1], int(argv[2]), int(argv[3])
        asyncio.run(_client_main(target, streams, services))
        return
    if argv and argv[0] == "--rule-client":
        target, streams, services, delta = argv[1], int(argv[2]), int(argv[3]), argv[4] == "1"
        asyncio.run(_rule_client_main(target, streams, services, delta))
        return
    if argv and argv[0] == "--scoped-client":
        target, streams, services, namespaces, restrict = argv[1], *map(int, argv[2:6])
        asyncio.run(_scoped_client_main(target, streams, services, namespaces, bool(restrict)))
        return
    parser = argparse.ArgumentParser(prog="python -m bench xds")
    parser.add_argument("--clients", default="1,100,1000", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--pushes", type=int, default=40)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="per service")
    parser.add_argument("--scoped", action="store_true", help="exportTo: clients spread over --namespaces")
    parser.add_argument(
        "--rules", action="store_true", help="with --scoped: a DestinationRule exported to '.' in every namespace"
    )
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--policy", action="store_true", help="DestinationRule subsets and VirtualService routes")
    parser.add_argument("--locality", action="store_true", help="with --policy: locality failover per client")
    parser.add_argument(
        "--rule-change", action="store_true", help="convergence after a DestinationRule change, SotW and delta"
    )
    parser.add_argument("--rebuild", action="store_true", help="Builder.update cost by index size (--sizes)")
    parser.add_argument(
        "--wildcard", action="store_true", help="a *.example.com DestinationRule over --services hosts; the name tree"
    )
    parser.add_argument("--sizes", default="1000,10000,100000", type=lambda s: [int(x) for x in s.split(",")])
    args = parser.parse_args(argv)
    if args.rebuild:
        _main_rebuild(args, argv)
        return
    if args.wildcard:
        _main_wildcard(args, argv)
        return
    if args.policy and args.locality:
        _main_locality(args, argv)
        return
    if args.rule_change:
        _main_rule_change(args, argv)
        return
    if args.policy:
        _main_policy(args, argv)
        return
    if args.scoped:
        _main_scoped(args, argv)
        return
    figures = asyncio.run(_run(args))
    ms = 1000.0
    rows = []
    for run in figures["runs"]:
        f = run["floor"]
        rows.append(
            [
                run["clients"],
                f"{run['convergence_median_s'] * ms:.1f}",
                f"{run['convergence_p99_s'] * ms:.1f}",
                f"{f['convergence_median_s'] * ms:.1f}",
                f"{f['convergence_p99_s'] * ms:.1f}",
                f"{run['ratio_median']:.2f}",
                f"{run['cpu_s_per_push'] * ms:.1f}",
                f"{f['cpu_s_per_push'] * ms:.1f}",
                f"{run['bytes_per_push'] / 1024:.1f}",
                f"{run['rss_per_client_bytes'] / 1024:.0f}",
                f"{run['initial_sync_s']:.2f}",
            ]
        )
    header = [
        "clients", "conv p50 ms", "conv p99 ms", "floor p50 ms", "floor p99 ms", "ours/floor",
        "cpu ms/push", "floor cpu ms", "KiB/push", "RSS KiB/client", "initial sync s",
    ]  # fmt: skip
    print(f"{figures['services']} services, {figures['endpoints']} endpoints; no debounce")
    print(table(rows, header))
    command = "python -m bench xds " + " ".join(argv)
    write_results("xds", figures, command.strip())


if __name__ == "__main__":
    main(sys.argv[1:])
