"""A real Envoy, bootstrapped with ADS at discoveryd (state of the world and delta), routing real HTTP traffic.

The index is written directly (a test shard); the files-adapter variant lives in test_envoy_files.py.
"""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

from pathlib import Path

import pytest

from discoveryd.index import Index
from discoveryd.model import Endpoint, Health, Hostname, Locality, Port, PortProtocol, Resolution, Service, SourceId
from tests.fakes.xds import (  # noqa: F401
    Envoy,
    RunningXds,
    assert_no_rejections,
    cluster,
    http_backend,
    nacks,
    run_envoy,
    service,
    start_xds,
    stop,
    xds,
)
from tests.helpers import eventually

pytestmark = pytest.mark.integration

WEB = "web.test"


def web(port: int, health: str = "HEALTHY") -> Service:
    """web.test:8080, one loopback endpoint serving port `http` on `port`."""
    return Service(
        hostname=Hostname(WEB),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=(Endpoint("127.0.0.1", ports={"http": port}),),
    )


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_envoy_clusters_traffic_moves_and_deletes(xds: RunningXds, tmp_path: Path, api_type: str) -> None:
    before = nacks()
    async with http_backend("alpha") as alpha, http_backend("beta") as beta:
        xds.put(web(alpha), service("other.test", "10.0.0.7", "10.0.0.8", port=9090))
        async with run_envoy(tmp_path, xds.port, api_type, route_to=cluster(WEB)) as envoy:
            # /clusters shows both clusters and their endpoints, as sent over CDS + EDS.
            async def clusters() -> str:
                return await envoy.get("/clusters")

            text = await eventually(
                lambda: _all_in(clusters(), [f"{cluster(WEB)}::127.0.0.1:{alpha}::", "10.0.0.8:9090"]),
                timeout=20,
                what="clusters and endpoints in envoy",
            )
            assert f"{cluster('other.test', 9090)}::10.0.0.7:9090::health_flags::healthy" in text

            # Real traffic through the static listener reaches the backend chosen via EDS.
            assert await eventually(lambda: _answers(envoy, "alpha"), timeout=20, what="traffic to alpha")

            # Moving the endpoint moves the traffic.
            xds.put(web(beta), service("other.test", "10.0.0.7", "10.0.0.8", port=9090))
            assert await eventually(lambda: _answers(envoy, "beta"), timeout=20, what="traffic moved to beta")
            # That push carried only web's assignment; the other cluster keeps its endpoints.
            assert f"{cluster('other.test', 9090)}::10.0.0.7:9090" in await clusters()

            # Deleting a service removes its cluster.
            xds.put(web(beta))
            await eventually(
                lambda: _none_in(clusters(), [cluster("other.test", 9090)]), timeout=20, what="cluster removed"
            )
            assert (await envoy.request()) == (200, "beta")

            # The stream is in sync and nothing was rejected, by either side's account.
            conns = [c for c in xds.server.syncz()["connections"] if c["node"] == f"envoy-{api_type.lower()}"]
            assert len(conns) == 1 and conns[0]["delta"] == (api_type == "DELTA_GRPC")
            await eventually(
                lambda: all(t["state"] == "SYNCED" for t in xds.server.syncz()["connections"][0]["types"].values()),
                what="envoy synced",
            )
            await assert_no_rejections(envoy, before)


async def _all_in(text: object, needles: list[str]) -> str | None:
    body = await text  # type: ignore[misc]
    return body if all(n in body for n in needles) else None


async def _none_in(text: object, needles: list[str]) -> bool:
    body = await text  # type: ignore[misc]
    return not any(n in body for n in needles)


async def _answers(envoy: Envoy, expected: str) -> bool:
    return (await envoy.request()) == (200, expected)


async def test_envoy_accepts_every_kind_of_cluster(xds: RunningXds, tmp_path: Path) -> None:
    """STRICT_DNS, LOGICAL_DNS, ORIGINAL_DST, HTTP/2 options, localities, health, pipes: nothing is rejected."""
    before = nacks()
    grpc_port = (Port(50051, "grpc", PortProtocol.GRPC),)
    xds.put(
        Service(
            hostname=Hostname("mixed.test"),
            ports=grpc_port,
            endpoints=(
                Endpoint("10.0.0.1", locality=Locality("us", "east-1", "a"), weight=3),
                Endpoint("10.0.0.2", locality=Locality("us", "west-1"), health=Health.DRAINING),
                Endpoint("::1", health=Health.UNHEALTHY),
                Endpoint("unix:///tmp/mixed.sock"),
            ),
        ),
        # IP literals: Envoy's resolver answers them itself, so no DNS query leaves the machine.
        Service(
            hostname=Hostname("dns.test"),
            ports=grpc_port,
            resolution=Resolution.DNS,
            endpoints=(Endpoint("127.0.0.1"), Endpoint("127.0.0.2")),
        ),
        Service(
            hostname=Hostname("rr.test"),
            ports=grpc_port,
            resolution=Resolution.DNS_ROUND_ROBIN,
            endpoints=(Endpoint("127.0.0.3"),),
        ),
        Service(hostname=Hostname("ext.test"), ports=grpc_port, resolution=Resolution.NONE),
    )
    async with run_envoy(tmp_path, xds.port, "GRPC", route_to=cluster(WEB)) as envoy:
        expected = [cluster(h, 50051) for h in ("mixed.test", "dns.test", "rr.test", "ext.test")]
        text = await eventually(
            lambda: _all_in(envoy.get("/clusters"), [f"{expected[0]}::10.0.0.2:50051", *expected]),
            timeout=20,
            what="every cluster in envoy",
        )
        m = expected[0]
        assert f"{m}::10.0.0.1:50051::weight::3" in text
        assert f"{m}::10.0.0.2:50051::health_flags::/eds_status_draining" in text
        assert f"{m}::[::1]:50051::health_flags::/failed_eds_health" in text
        assert f"{m}::/tmp/mixed.sock::health_flags::healthy" in text
        assert f"{expected[1]}::127.0.0.2:50051" in text and f"{expected[2]}::127.0.0.3:50051" in text
        await assert_no_rejections(envoy, before)


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_envoy_cluster_change_without_endpoint_change_does_not_stall(
    xds: RunningXds, tmp_path: Path, api_type: str
) -> None:
    """An updated EDS cluster warms again in Envoy and needs its assignment, unchanged or not."""
    xds.put(service(WEB, "10.0.0.1"))
    async with run_envoy(tmp_path, xds.port, api_type, route_to=cluster(WEB)) as envoy:
        await eventually(
            lambda: _all_in(envoy.get("/clusters"), [f"{cluster(WEB)}::10.0.0.1:8080"]), timeout=20, what="cluster"
        )
        updated = await envoy.stat("cluster_manager.cluster_modified")
        # The port becomes HTTP/2: a new cluster, the very same assignment.
        xds.put(service(WEB, "10.0.0.1", protocol=PortProtocol.HTTP2))

        async def warmed() -> bool:
            return (
                await envoy.stat("cluster_manager.cluster_modified") > updated
                and await envoy.stat("cluster_manager.warming_clusters") == 0
            )

        # Envoy's own fetch timeout is 15 s; well before it, the update must be active.
        await eventually(warmed, timeout=5, what="updated cluster active")


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_envoy_reconnects_to_a_restarted_server_and_converges(
    xds: RunningXds, tmp_path: Path, api_type: str
) -> None:
    """A replica going away: Envoy keeps serving what it has, reconnects to the new one and converges."""
    before = nacks()
    async with http_backend("alpha") as alpha, http_backend("beta") as beta:
        xds.put(web(alpha), service("other.test", "10.0.0.7"))
        async with run_envoy(tmp_path, xds.port, api_type, route_to=cluster(WEB)) as envoy:
            assert await eventually(lambda: _answers(envoy, "alpha"), timeout=20, what="traffic to alpha")
            await stop(xds.task)
            assert await _answers(envoy, "alpha"), "Envoy keeps its last configuration while the server is away"
            xds.put(web(beta), service("third.test", "10.0.0.9"))
            server, task = await start_xds(xds.index, listen=f"127.0.0.1:{xds.port}")
            try:
                assert await eventually(lambda: _answers(envoy, "beta"), timeout=30, what="converged after reconnect")
                await eventually(
                    lambda: _none_in(envoy.get("/clusters"), [cluster("other.test")]), timeout=10, what="stale gone"
                )
                assert cluster("third.test") in await envoy.get("/clusters")
                (conn,) = server.syncz()["connections"]
                assert conn["node"] == f"envoy-{api_type.lower()}"
                await assert_no_rejections(envoy, before)
            finally:
                await stop(task)


async def test_envoys_in_two_namespaces_see_their_own_exports(xds: RunningXds, tmp_path: Path) -> None:
    """exportTo with real Envoys: one names its namespace in metadata, the other in an Istio node id."""
    xds.put(
        service("public.test", "10.0.0.1"),
        service("shop-only.test", "10.0.0.2", namespace="shop", export_to=(".",)),
        service("for-web.test", "10.0.0.3", namespace="shop", export_to=("web",)),
    )
    shop_node = {"id": "shop-envoy", "cluster": "integration", "metadata": {"NAMESPACE": "shop"}}
    web_node = {"id": "sidecar~127.0.0.1~front-1.web~web.svc.cluster.local", "cluster": "integration"}
    async with (
        run_envoy(tmp_path, xds.port, "GRPC", route_to=cluster("public.test"), node=shop_node) as shop,
        run_envoy(tmp_path, xds.port, "DELTA_GRPC", route_to=cluster("public.test"), node=web_node) as web_envoy,
    ):

        async def dynamic_clusters(envoy: Envoy) -> set[str]:
            dump = await envoy.get_json("/config_dump?resource=dynamic_active_clusters")
            return {c["cluster"]["name"] for c in dump["configs"]}

        async def settled(envoy: Envoy, expected: set[str]) -> bool:
            return await dynamic_clusters(envoy) == expected

        shop_sees = {cluster("public.test"), cluster("shop-only.test")}
        web_sees = {cluster("public.test"), cluster("for-web.test")}
        await eventually(lambda: settled(shop, shop_sees), timeout=20, what="shop envoy's clusters")
        await eventually(lambda: settled(web_envoy, web_sees), timeout=20, what="web envoy's clusters")


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_max_connection_age_makes_envoy_reconnect_and_stay_synced(
    index: Index, tmp_path: Path, api_type: str
) -> None:
    """Connections are closed after xds.max_connection_age (GOAWAY, then the grace): Envoy reconnects with
    what it has and keeps following changes, so clients spread over replicas after a rollout."""
    shard = index.writer(SourceId("files/t"))
    shard.mark_synced()
    server, task = await start_xds(index, max_connection_age=1.0, max_connection_age_grace=0.3)
    try:
        async with http_backend("alpha") as alpha, http_backend("beta") as beta:
            shard.replace([web(alpha)])
            async with run_envoy(tmp_path, server.ports[0], api_type, route_to=cluster(WEB)) as envoy:
                assert await eventually(lambda: _answers(envoy, "alpha"), timeout=20, what="traffic to alpha")
                first = {c.id for c in server.connections}

                def reconnected() -> bool:
                    now = {c.id for c in server.connections}
                    return bool(now) and not now & first and len(now) == 1

                await eventually(reconnected, timeout=20, what="envoy on a new connection after the max age")
                shard.replace([web(beta)])
                assert await eventually(lambda: _answers(envoy, "beta"), timeout=20, what="synced after reconnect")
                await eventually(
                    lambda: all(
                        t["state"] == "SYNCED" for c in server.syncz()["connections"] for t in c["types"].values()
                    ),
                    timeout=20,
                    what="the new stream ACKs what it holds",
                )
                assert await envoy.stat("cluster_manager.cds.update_rejected") == 0
    finally:
        await stop(task)
