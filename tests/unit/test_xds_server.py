"""The server around the protocol: debounce, slow clients, binding, health, shutdown, TLS, status."""

# ruff: noqa: F811 - pytest fixtures imported from tests.fakes.xds are parameters by design

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from discoveryd import config as config_mod
from discoveryd.config import ConfigError
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Service, SourceId
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.resources import CLUSTER, ENDPOINT
from discoveryd.xds.status import render
from tests.fakes.xds import (  # noqa: F401
    RunningXds,
    Stream,
    channel,
    cluster,
    endpoints_of,
    names,
    service,
    start_xds,
    stop,
    xds,
)
from tests.helpers import eventually


def big_service(i: int, endpoints: int = 40, generation: int = 0) -> Service:
    return Service(
        hostname=Hostname(f"svc{i}.test"),
        ports=(Port(8080, "http", PortProtocol.HTTP),),
        endpoints=tuple(
            Endpoint(f"10.{generation}.{i % 250}.{e}", labels={"pod": f"pod-{i}-{e}"}) for e in range(endpoints)
        ),
    )


async def test_a_client_that_never_reads_does_not_hold_back_the_others(xds: RunningXds) -> None:
    count = 150
    xds.put(*(big_service(i) for i in range(count)))
    all_clusters = [cluster(f"svc{i}.test") for i in range(count)]
    stuck_options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)]
    async with (
        grpc.aio.insecure_channel(xds.target, options=stuck_options) as stuck_channel,
        grpc.aio.insecure_channel(xds.target, options=[("grpc.max_receive_message_length", -1)]) as good_channel,
    ):
        stuck = Stream(stuck_channel)
        stuck.node = {"id": "stuck", "cluster": "t"}
        await stuck.send(CLUSTER)
        await stuck.send(ENDPOINT, resource_names=all_clusters)  # and never reads again

        good = Stream(good_channel)
        good.node = {"id": "good", "cluster": "t"}
        await good.send(ENDPOINT, resource_names=all_clusters)
        r = await good.recv()
        assert len(r.resources) == count
        await good.ack(r, all_clusters)
        for generation in range(1, 6):
            xds.put(*(big_service(i, generation=generation) for i in range(count)))
            r = await good.recv()
            assert len(r.resources) == count
            assert endpoints_of(r)[cluster("svc0.test")][0] == f"10.{generation}.0.0:8080"
            await good.ack(r, all_clusters)

        def states() -> dict[str, dict[str, str]]:
            return {
                c["node"]: {t: v["state"] for t, v in c["types"].items()} for c in xds.server.syncz()["connections"]
            }

        await eventually(lambda: states()["good"]["EDS"] == "SYNCED", what="good client synced")
        assert states()["stuck"]["EDS"] == "STALE"
        # Newest state wins: the stuck stream holds a set of dirty names, never a backlog of responses.
        stuck_conn = next(c for c in xds.server.connections if c.node_id == "stuck")
        assert len(stuck_conn.types[ENDPOINT].pending) <= count
        assert stuck_conn.types[ENDPOINT].responses <= 1, "the stuck stream's first EDS write never completed"
        await stuck.close()
        await good.close()


async def test_debounce_coalesces_a_burst_into_one_push(index: Index) -> None:
    shard = index.writer(SourceId("files/t"))
    shard.replace([service("a.test", "10.0.0.1")])
    shard.mark_synced()
    server, task = await start_xds(index, debounce_after=0.2, debounce_max=5.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as ch:
            s = Stream(ch)
            await s.send(ENDPOINT, resource_names=[cluster("a.test")])
            r = await s.recv()
            await s.ack(r, [cluster("a.test")])
            for i in range(2, 8):
                shard.replace([service("a.test", f"10.0.0.{i}")])
                await asyncio.sleep(0.01)
            r = await s.recv()
            assert endpoints_of(r) == {cluster("a.test"): ["10.0.0.7:8080"]}, "one push with the newest state"
            assert r.version_info == str(index.snapshot.version)
            (conn,) = server.connections
            assert conn.types[ENDPOINT].responses == 2, "the initial response and a single push"
            await s.close()
    finally:
        await stop(task)


async def test_debounce_max_bounds_the_delay_under_constant_change(index: Index) -> None:
    shard = index.writer(SourceId("files/t"))
    shard.replace([service("a.test", "10.0.0.1")])
    shard.mark_synced()
    server, task = await start_xds(index, debounce_after=0.3, debounce_max=0.6)
    writer: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as ch:
            s = Stream(ch)
            await s.send(ENDPOINT, resource_names=[cluster("a.test")])
            r = await s.recv()
            await s.ack(r, [cluster("a.test")])

            async def churn() -> None:  # a change every 50 ms: never quiet for debounce_after
                for i in range(2, 250):
                    shard.replace([service("a.test", f"10.0.{i // 250}.{i % 250}")])
                    await asyncio.sleep(0.05)

            writer = asyncio.create_task(churn())
            await s.recv(timeout=10)
            assert not writer.done(), "the push must come while changes keep arriving"
            await s.close()
    finally:
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        await stop(task)


async def test_bind_failure_names_the_address(index: Index) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=re.escape(f"127.0.0.1:{port}")):
            await start_xds(index, listen=f"127.0.0.1:{port}")


async def test_health_service_and_shutdown_ends_streams(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "envoy.service.discovery.v3.AggregatedDiscoveryService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    s = Stream(channel)
    await s.send(CLUSTER)
    await s.recv()
    xds.task.cancel()
    async with asyncio.timeout(10):
        ended = await s.call.read()
    assert ended is grpc.aio.EOF
    assert await s.call.code() == grpc.StatusCode.OK
    with pytest.raises(asyncio.CancelledError):
        await xds.task


async def test_syncz_and_status_table(xds: RunningXds, channel: grpc.aio.Channel) -> None:
    xds.put(service("a.test", "10.0.0.1"))
    s = Stream(channel)
    await s.send(CLUSTER)
    r = await s.recv()
    await s.ack(r)
    await s.send(ENDPOINT, resource_names=[cluster("a.test")])
    r = await s.recv()
    await eventually(lambda: xds.server.syncz()["connections"][0]["types"]["CDS"]["state"] == "SYNCED")
    doc = xds.server.syncz()
    (conn,) = doc["connections"]
    assert conn["node"] == "test-node" and conn["cluster"] == "test-cluster" and conn["api"] == "ADS"
    assert conn["types"]["EDS"]["state"] == "STALE" and conn["types"]["EDS"]["sent_nonce"] == r.nonce
    table = render(doc, now=conn["connected_since"] + 75)
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "CLUSTER", "API", "CDS", "LDS", "EDS", "RDS", "VERSION", "CONNECTED"]
    assert row.split() == ["test-node", "test-cluster", "ADS", "SYNCED", "-", "STALE", "-", r.version_info, "1m15s"]
    await s.close()


def test_status_renders_errors_and_empty() -> None:
    assert "no xDS clients connected" in render({"version": "3", "connections": []})
    assert "holding every response" in render({"version": "3", "serving": False, "connections": []})
    doc = {
        "version": "9",
        "connections": [
            {
                "node": "envoy-1",
                "cluster": "web",
                "api": "ADS",
                "delta": True,
                "connected_since": 1000.0,
                "types": {
                    "CDS": {"state": "ERROR", "sent_version": "9", "nack": "3: bad cluster"},
                    "EDS": {"state": "NOT SENT", "sent_version": ""},
                },
            }
        ],
    }
    out = render(doc, now=1000.0 + 7200)
    lines = out.splitlines()
    assert lines[1].split() == ["envoy-1", "web", "ADS", "delta", "ERROR", "-", "NOT", "SENT", "-", "9", "2h00m"]
    assert "envoy-1 CDS rejected version 9: 3: bad cluster" in out


# -- TLS ------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}", cwd=d)  # fmt: skip


def make_cert(d: Path, name: str, ca: str) -> None:
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip


async def _tls_call(port: int, d: Path, ca: str, client: str | None) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(d / f"{ca}.crt").read_bytes(),
        private_key=(d / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(d / f"{client}.crt").read_bytes() if client else None,
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0, reason="no openssl")
async def test_tls_listener_requires_client_cert_and_reloads(index: Index, tmp_path: Path) -> None:
    d = tmp_path
    make_ca(d, "ca")
    make_ca(d, "ca2")
    make_cert(d, "server", "ca")
    make_cert(d, "client", "ca")
    make_cert(d, "server2", "ca2")
    tls = {"cert_file": d / "server.crt", "key_file": d / "server.key", "client_ca_file": d / "ca.crt"}
    server, task = await start_xds(index, tls=tls, tls_listen="127.0.0.1:0")
    try:
        plain, secure = server.ports
        assert plain != secure
        assert await _tls_call(secure, d, "ca", "client") == grpc.StatusCode.OK
        assert await _tls_call(secure, d, "ca", None) == grpc.StatusCode.UNAVAILABLE, "mTLS: a client cert is required"
        assert await _tls_call(secure, d, "ca2", "client") == grpc.StatusCode.UNAVAILABLE
        # Replace the server certificate with one from another CA: new handshakes use it.
        (d / "server.key").write_bytes((d / "server2.key").read_bytes())
        (d / "server.crt").write_bytes((d / "server2.crt").read_bytes())

        async def new_cert_served() -> bool:
            return await _tls_call(secure, d, "ca2", "client") == grpc.StatusCode.OK

        await eventually(new_cert_served, timeout=10, what="new certificate served")
        assert await _tls_call(secure, d, "ca", "client") == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop(task)


async def test_tls_missing_file_is_named(index: Index, tmp_path: Path) -> None:
    tls = {"cert_file": tmp_path / "nope.crt", "key_file": tmp_path / "nope.key"}
    with pytest.raises(OSError, match=re.escape("nope.crt")):
        await start_xds(index, tls=tls, tls_listen="127.0.0.1:0")


async def test_listens_on_ipv6_loopback(index: Index) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server, task = await start_xds(index, listen="[::1]:0")
    try:
        async with grpc.aio.insecure_channel(f"[::1]:{server.ports[0]}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop(task)


async def test_nothing_is_served_until_every_registry_is_ready(index: Index) -> None:
    """A partial state of the world would make a client delete the missing registry's clusters."""
    files = index.writer(SourceId("files/local"))
    files.replace([service("a.test", "10.0.0.1")])
    files.mark_synced()
    etcd = index.writer(SourceId("etcd/main"))  # not synced yet: the index is not ready
    server, task = await start_xds(index)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as ch:
            s = Stream(ch)
            await s.send(CLUSTER)
            await s.send(ENDPOINT, resource_names=[cluster("a.test"), cluster("b.test")])
            await eventually(lambda: len(server.connections) == 1 and server.connections[0].types[ENDPOINT].requested)
            assert server.syncz()["serving"] is False
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, "a balancer can route elsewhere"
            etcd.replace([service("b.test", "10.0.0.2")])  # content, but not synced yet
            await eventually(lambda: cluster("b.test") in server.view.resources[CLUSTER], what="b built")
            etcd.mark_synced()
            cds = await s.recv()
            assert cds.type_url == CLUSTER
            assert sorted(names(cds)) == [cluster("a.test"), cluster("b.test")], "the first CDS response is complete"
            eds = await s.recv()
            assert endpoints_of(eds) == {cluster("a.test"): ["10.0.0.1:8080"], cluster("b.test"): ["10.0.0.2:8080"]}
            assert server.syncz()["serving"] is True
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await s.close()
    finally:
        await stop(task)


# -- listeners ----------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["listen: null", "listen: ~", ""], ids=["null", "tilde", "omitted-with-tls"])
def test_plaintext_listener_can_be_turned_off_when_tls_is_set(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "discoveryd.yaml"
    path.write_text(f"xds:\n  {listen}\n  tls: {{cert_file: a.crt, key_file: a.key}}\n")
    cfg = config_mod.load(path)
    assert cfg.xds.tls is not None
    if listen:
        assert cfg.xds.listen is None
    else:
        assert cfg.xds.listen == "127.0.0.1:15010", "omitted keeps the documented default"


def test_no_listener_at_all_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "discoveryd.yaml"
    path.write_text("admin:\n  listen: 127.0.0.1:15014\nxds:\n  listen: null\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    (problem,) = e.value.problems
    assert problem.startswith(f"{path}:4: xds.listen: ") and "xds.tls" in problem, problem


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0, reason="no openssl")
async def test_tls_only_serves_nothing_in_plaintext(index: Index, tmp_path: Path) -> None:
    make_ca(tmp_path, "ca")
    make_cert(tmp_path, "server", "ca")
    make_cert(tmp_path, "client", "ca")
    tls = {"cert_file": tmp_path / "server.crt", "key_file": tmp_path / "server.key"}
    server, task = await start_xds(index, listen=None, tls=tls, tls_listen="127.0.0.1:0")
    try:
        (secure,) = server.ports
        assert server.plaintext_port is None and server.tls_port == secure
        assert await _tls_call(secure, tmp_path, "ca", "client") == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(f"127.0.0.1:{secure}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
    finally:
        await stop(task)


async def test_two_servers_in_one_process_share_no_counters() -> None:
    """Nonces, connection ids and metrics belong to the server (two daemons can run in one test)."""
    servers = []
    try:
        for _ in range(2):
            index = Index()
            shard = index.writer(SourceId("files/t"))
            shard.replace([service("a.test", "10.0.0.1")])
            shard.mark_synced()
            metrics = XdsMetrics(CollectorRegistry())
            server, task = await start_xds(index, metrics=metrics)
            servers.append((server, task))
        seen = []
        for server, _ in servers:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as ch:
                s = Stream(ch)
                await s.send(CLUSTER)
                r = await s.recv()
                await s.send(CLUSTER, version_info="", response_nonce=r.nonce, error_detail={"message": "no"})
                await eventually(lambda server=server: server.metrics.nacks.labels("CDS")._value.get() == 1)
                seen.append((r.nonce, server.connections[0].id))
                await s.close()
        assert seen == [("1", 1), ("1", 1)], "each server counts from its own start"
        assert [s.metrics.nacks.labels("CDS")._value.get() for s, _ in servers] == [1, 1]
    finally:
        for _, task in servers:
            await stop(task)


async def test_readiness_arriving_during_the_debounce_releases_the_held_streams(index: Index) -> None:
    """A registry writes its content and then says it synced, both within one debounce window."""
    etcd = index.writer(SourceId("etcd/main"))
    server, task = await start_xds(index, debounce_after=0.3, debounce_max=2.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as ch:
            s = Stream(ch)
            await s.send(CLUSTER)
            await eventually(lambda: len(server.connections) == 1 and server.connections[0].types[CLUSTER].requested)
            etcd.replace([service("b.test", "10.0.0.2")])
            for _ in range(10):  # let the push loop take that version and enter its debounce window
                await asyncio.sleep(0)
            etcd.mark_synced()
            r = await s.recv(timeout=5)
            assert names(r) == [cluster("b.test")]
            await s.close()
    finally:
        await stop(task)
