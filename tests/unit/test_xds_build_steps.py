"""The xDS build in steps: a big build or change keeps the event loop serving, and clients see whole views."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.policy import DestinationRule, HostPolicy, OutlierDetection, TrafficPolicy
from discoveryd.xds.resources import CLUSTER, EMPTY_VIEW, ENDPOINT, Builder, BuildOptions
from tests.fakes.xds import Stream, start_xds, stop
from tests.helpers import eventually, watching_the_loop

N = 20_000
"""Services: built in one call, their resources hold the loop well over a second of CPU."""


def _service(i: int, generation: int = 0) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.test"),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=(Endpoint(f"10.{generation}.{i // 250 % 250}.{i % 250 + 1}"),),
    )


def _clusters(response: object) -> list[cluster_pb2.Cluster]:
    out = []
    for packed in response.resources:  # type: ignore[attr-defined]
        c = cluster_pb2.Cluster()
        assert isinstance(packed, any_pb2.Any)
        packed.Unpack(c)
        out.append(c)
    return out


def _guarded(clusters: list[cluster_pb2.Cluster]) -> set[bool]:
    """Whether each cluster carries the wildcard rule's outlier detection: {False}, {True}, or both (a mix)."""
    return {c.HasField("outlier_detection") for c in clusters}


async def test_big_builds_keep_the_loop_serving_and_clients_get_whole_views(index: Index) -> None:
    shard = index.writer(SourceId("files/big"))
    await shard.replace_in_steps([_service(i) for i in range(N)])
    shard.mark_synced()

    def built() -> bool:
        return server.view.version == index.snapshot.version

    # The first build, before the listeners are bound.
    async with watching_the_loop(index) as watch:
        server, task = await start_xds(index)
        try:
            await eventually(built, timeout=60, what="the first build")
        except BaseException:
            await stop(task)
            raise
    try:
        assert len(server.view.resources[CLUSTER]) == N
        assert watch.longest < 0.1, f"the first build held the loop for {watch.longest * 1000:.0f} ms of CPU"
        assert len(watch.gaps) > 20, "the first build never yielded to the loop"
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.ports[0]}", options=[("grpc.max_receive_message_length", -1)]
        ) as ch:
            before = Stream(ch)
            await before.send(CLUSTER)
            r = await before.recv()
            assert len(r.resources) == N and _guarded(_clusters(r)) == {False}
            await before.ack(r)

            # A *.test DestinationRule over every service; a client connects while it is being built.
            late_responses: list[object] = []

            async def late_client() -> None:
                late = Stream(ch)
                late.node = {"id": "late", "cluster": "t"}
                await late.send(CLUSTER)
                while True:
                    r = await late.recv(timeout=60)
                    late_responses.append(r)
                    await late.ack(r)

            wild = Hostname("*.test")
            rule = TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx=7, interval=10.0))
            async with watching_the_loop(index) as watch:
                shard.set_policy(wild, HostPolicy(DestinationRule(wild, "default", "wild", rule)))
                late_task = asyncio.create_task(late_client())
                await eventually(built, timeout=60, what="the wildcard rule's build")
            assert watch.longest < 0.1, f"the rule's build held the loop for {watch.longest * 1000:.0f} ms of CPU"
            assert len(watch.gaps) > 20, "the rule's build never yielded to the loop"

            r = await before.recv(timeout=60)
            assert r.version_info == str(index.snapshot.version)
            assert len(r.resources) == N and _guarded(_clusters(r)) == {True}, "the whole new state, in one push"
            await eventually(
                lambda: late_responses and late_responses[-1].version_info == str(index.snapshot.version),  # type: ignore[attr-defined]
                timeout=30,
                what="the late client's last push",
            )
            late_task.cancel()
            for seen in late_responses:  # the old view or the new one, never a mix
                clusters = _clusters(seen)
                assert len(clusters) == N and len(_guarded(clusters)) == 1
            assert _guarded(_clusters(late_responses[-1])) == {True}

            # A relist changing every service's endpoints, written in steps by the index and built in steps.
            relisted = [_service(i, generation=1) for i in range(N)]
            async with watching_the_loop(index) as watch:
                await shard.replace_in_steps(relisted)
                await eventually(built, timeout=60, what="the relist's build")
            assert watch.longest < 0.1, f"the relist's build held the loop for {watch.longest * 1000:.0f} ms of CPU"
            addresses = set()
            for resource in server.view.resources[ENDPOINT].values():
                packed = any_pb2.Any.FromString(resource.body)
                cla = endpoint_pb2.ClusterLoadAssignment()
                packed.Unpack(cla)
                addresses.update(
                    e.endpoint.address.socket_address.address.split(".")[1]
                    for g in cla.endpoints
                    for e in g.lb_endpoints
                )
            assert len(server.view.resources[ENDPOINT]) == N and addresses == {"1"}
    finally:
        await stop(task)


async def test_a_build_stopped_halfway_leaves_the_builder_whole(index: Index) -> None:
    """Cancelled between two steps (the server stopping), the next update of the builder is still right:
    its wildcard state had moved to the unfinished snapshot, so it rebuilds everything."""
    shard = index.writer(SourceId("files/t"))
    shard.replace([_service(i) for i in range(2000)])
    builder = Builder(BuildOptions())
    view, _ = builder.update(EMPTY_VIEW, index.snapshot, None)
    built_from = index.snapshot
    wild = Hostname("*.test")
    rule = TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx=7, interval=10.0))
    shard.set_policy(wild, HostPolicy(DestinationRule(wild, "default", "wild", rule)))
    changed = index.changed_between(built_from.version, index.snapshot.version)
    halfway = asyncio.create_task(builder.update_in_steps(view, index.snapshot, changed, step=0.0))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not halfway.done()
    halfway.cancel()
    with pytest.raises(asyncio.CancelledError):
        await halfway
    # From the view served (built without the rule), the next change: the rule still there, one host moved.
    shard.upsert(_service(0, generation=1))
    changed = index.changed_between(built_from.version, index.snapshot.version)
    got, _ = await builder.update_in_steps(view, index.snapshot, changed)
    want, _ = Builder(BuildOptions()).update(EMPTY_VIEW, index.snapshot, None)
    for type_url, table in want.resources.items():
        assert dict(got.resources[type_url]) == dict(table)
    # And the builder goes on from there incrementally: the rule's removal reaches every host.
    before = index.snapshot.version
    shard.set_policy(wild, None)
    got, changes = builder.update(got, index.snapshot, index.changed_between(before, index.snapshot.version))
    assert len(changes[CLUSTER]) == 2000
