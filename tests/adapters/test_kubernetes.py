"""The Kubernetes registry against the fake API server: convergence, relists, outages, several clusters.

Each test runs the real adapter (`KubernetesRegistry.run`) against a real
`Index`, with a `FakeApiServer` (tests/fakes/kubernetes.py) behind a
kubeconfig on loopback, changes the cluster through the fake and waits, with
a deadline, for the index to agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from adapters.kubernetes import KubernetesConfig, KubernetesRegistry
from discoveryd.index import Index, Snapshot
from discoveryd.model import Health, Hostname, PortProtocol, Resolution, SourceId
from discoveryd.testing import AdapterContract
from tests.fakes.kubernetes import FakeApiServer, endpoint, endpoint_slice, kubeconfig, service
from tests.helpers import eventually, watching_the_loop

WEB = Hostname("web.shop.svc.cluster.local")


def _config(tmp: Path, fake: FakeApiServer, name: str = "c1", **keys: Any) -> KubernetesConfig:
    path = tmp / f"kubeconfig-{name}"
    path.write_text(kubeconfig(fake))
    base = {
        "kind": "kubernetes",
        "name": name,
        "kubeconfig": str(path),
        "backoff_initial": "50ms",
        "backoff_max": "500ms",
    }
    return KubernetesConfig.model_validate(base | keys)


@asynccontextmanager
async def running(index: Index, config: KubernetesConfig, tmp: Path) -> AsyncIterator[KubernetesRegistry]:
    registry = KubernetesRegistry(config, tmp)
    task = asyncio.create_task(registry.run(index.writer(config.source)))
    try:
        yield registry
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(bookmark_interval=0.2) as server:
        yield server


def _eps(index: Index, host: Hostname) -> dict[str, Health] | None:
    svc = index.snapshot.services.get(host)
    return None if svc is None else {ep.address: ep.health for ep in svc.endpoints}


class Recorder:
    """Every snapshot the index publishes, from a task of its own."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.seen: list[Snapshot] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        version = self.index.snapshot.version
        while True:
            snap = await self.index.wait(version)
            self.seen.append(snap)
            version = snap.version

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def every(self, after: int, check: Callable[[Snapshot], bool]) -> bool:
        return all(check(s) for s in self.seen if s.version > after)


async def test_services_and_slices_converge(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.apply(
        "services",
        service(
            "web",
            "shop",
            cluster_ips=["10.96.0.10"],
            labels={"app": "web"},
            ports=[
                {"name": "http-api", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "metrics", "port": 9090, "appProtocol": "grpc", "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        ),
    )
    slice_ports = [{"name": "http-api", "port": 8080}, {"name": "metrics", "port": 9091}, {"name": "dns", "port": 5353}]
    fake.apply(
        "endpointslices",
        endpoint_slice(
            "web",
            [endpoint("10.1.0.1", zone="z1", node="n1", pod="web-1", namespace="shop")],
            namespace="shop",
            name="web-a",
            ports=slice_ports,
        ),
    )
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: index.snapshot.ready, what="first sync")
        svc = index.snapshot.services[WEB]
        assert svc.addresses == ("10.96.0.10",) and svc.labels == {"app": "web"} and svc.namespace == "shop"
        assert [(p.number, p.name, p.protocol, p.target_port) for p in svc.ports] == [
            (80, "http-api", PortProtocol.HTTP, 8080),
            (9090, "metrics", PortProtocol.GRPC, None),
            (53, "dns", PortProtocol.UDP, None),
        ]
        (ep,) = svc.endpoints
        assert (ep.address, ep.locality.zone, ep.node_name, ep.target_ref) == ("10.1.0.1", "z1", "n1", "Pod/shop/web-1")
        assert [ep.port_for(p) for p in svc.ports] == [8080, 9091, 5353]
        assert ep.source == SourceId("kubernetes/c1")

        # A second slice, an update, a delete, a new service, a deleted service.
        fake.apply("endpointslices", endpoint_slice("web", [endpoint("10.1.0.2")], namespace="shop", name="web-b"))
        await eventually(lambda: _eps(index, WEB) == {"10.1.0.1": Health.HEALTHY, "10.1.0.2": Health.HEALTHY})
        fake.apply(
            "endpointslices",
            endpoint_slice("web", [endpoint("10.1.0.1", ready=False)], namespace="shop", name="web-a"),
        )
        await eventually(lambda: _eps(index, WEB) == {"10.1.0.1": Health.UNHEALTHY, "10.1.0.2": Health.HEALTHY})
        fake.delete("endpointslices", "shop", "web-b")
        await eventually(lambda: _eps(index, WEB) == {"10.1.0.1": Health.UNHEALTHY})
        fake.apply("services", service("db", "shop", cluster_ips=["10.96.0.11"]))
        db = Hostname("db.shop.svc.cluster.local")
        await eventually(lambda: db in index.snapshot.services, what="new service")
        fake.delete("services", "shop", "web")
        await eventually(lambda: WEB not in index.snapshot.services, what="deleted service")
        # The slice of a deleted Service is kept: the Service coming back gets its endpoints at once.
        fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10"]))
        await eventually(lambda: _eps(index, WEB) == {"10.1.0.1": Health.UNHEALTHY}, what="service back")


async def test_kinds_of_services(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.apply("services", service("ext", "shop", external_name="db.example.com."))
    fake.apply("services", service("dual", "shop", cluster_ips=["10.96.0.20", "fd00::20"]))
    fake.apply("services", service("hl", "shop", cluster_ips=["None"]))
    fake.apply("services", service("pnr", "shop", cluster_ips=["None"], publish_not_ready=True))
    eps = [
        endpoint("10.2.0.1", hostname="hl-0"),
        endpoint("10.2.0.2", ready=False, serving=True, terminating=True),
        endpoint("10.2.0.3", ready=False, serving=False, terminating=True),
        endpoint("10.2.0.4", ready=None),
    ]
    fake.apply("endpointslices", endpoint_slice("hl", eps, namespace="shop"))
    fake.apply("endpointslices", endpoint_slice("pnr", [endpoint("10.3.0.1", ready=False)], namespace="shop"))
    fake.apply("endpointslices", endpoint_slice("dual", [endpoint("10.4.0.1")], namespace="shop"))
    fake.apply("endpointslices", endpoint_slice("dual", [endpoint("fd00::4:1")], namespace="shop", address_type="IPv6"))
    fqdn = endpoint_slice("dual", [endpoint("node.example.com")], namespace="shop", address_type="FQDN")
    fake.apply("endpointslices", fqdn)
    async with running(index, _config(tmp_path, fake), tmp_path) as registry:
        await eventually(lambda: index.snapshot.ready, what="first sync")
        services = index.snapshot.services
        ext = services[Hostname("ext.shop.svc.cluster.local")]
        assert ext.resolution is Resolution.DNS and ext.addresses == ()
        assert [ep.address for ep in ext.endpoints] == ["db.example.com"]
        dual = services[Hostname("dual.shop.svc.cluster.local")]
        assert dual.addresses == ("10.96.0.20", "fd00::20")
        assert {ep.address for ep in dual.endpoints} == {"10.4.0.1", "fd00::4:1"}
        assert registry.view is not None and registry.view.skipped_slices == 1
        hl = services[Hostname("hl.shop.svc.cluster.local")]
        assert hl.addresses == ()
        assert {ep.address: (ep.health, ep.hostname) for ep in hl.endpoints} == {
            "10.2.0.1": (Health.HEALTHY, "hl-0"),
            "10.2.0.2": (Health.DRAINING, ""),
            "10.2.0.3": (Health.UNHEALTHY, ""),
            "10.2.0.4": (Health.HEALTHY, ""),
        }
        assert _eps(index, Hostname("pnr.shop.svc.cluster.local")) == {"10.3.0.1": Health.HEALTHY}


def _web(fake: FakeApiServer, n: int = 3) -> None:
    for i in range(n):
        fake.apply("services", service(f"s{i}", "shop", cluster_ips=[f"10.96.1.{i}"]))
        fake.apply("endpointslices", endpoint_slice(f"s{i}", [endpoint(f"10.5.0.{i}")], namespace="shop", name=f"s{i}"))


def _host(i: int) -> Hostname:
    return Hostname(f"s{i}.shop.svc.cluster.local")


@pytest.mark.parametrize("gone_as", ["event", "status"])
async def test_410_relists_without_a_transient_delete(
    fake: FakeApiServer, index: Index, tmp_path: Path, gone_as: str
) -> None:
    """Changes made while the watch could not follow (the server restarted, its history gone) arrive by a
    relist: what vanished is deleted, what changed is updated, and what still exists is never removed."""
    fake.gone_as = gone_as
    _web(fake, 4)
    async with running(index, _config(tmp_path, fake), tmp_path) as registry:
        await eventually(lambda: index.snapshot.ready and _host(3) in index.snapshot.services, what="first sync")
        recorder = Recorder(index)
        start = index.snapshot.version
        await fake.stop()
        fake.delete("services", "shop", "s1")
        fake.delete("endpointslices", "shop", "s2")
        fake.apply("endpointslices", endpoint_slice("s3", [endpoint("10.5.9.9")], namespace="shop", name="s3"))
        await fake.restart()  # the new watch cache starts now: older versions are 410 Gone
        try:
            await eventually(
                lambda: (
                    _host(1) not in index.snapshot.services
                    and _eps(index, _host(2)) == {}
                    and _eps(index, _host(3)) == {"10.5.9.9": Health.HEALTHY}
                ),
                timeout=10,
                what="relisted",
            )
        finally:
            await recorder.stop()
        assert sum(r.lists for r in registry.reflectors) >= 4  # each kind listed again
        assert recorder.every(start, lambda s: _host(0) in s.services and _host(3) in s.services)
        assert recorder.every(start, lambda s: _host(2) in s.services)
        assert recorder.every(start, lambda s: {e.address for e in s.services[_host(0)].endpoints} == {"10.5.0.0"})


async def test_expired_continue_token_lists_again(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    _web(fake, 7)
    expired = []

    def expire_once(plural: str) -> None:
        if plural == "services" and not expired:
            expired.append(True)
            fake.expire_continue_tokens()

    fake.after_page = expire_once
    async with running(index, _config(tmp_path, fake, page_size=2), tmp_path):
        await eventually(lambda: index.snapshot.ready, what="first sync")
        assert {h for h in index.snapshot.services} == {_host(i) for i in range(7)}
    continued = [q for p, q in fake.requests if p.endswith("/services") and "continue" in q]
    assert expired and len(continued) >= 4


async def test_outage_keeps_content_marked_stale_then_converges(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    _web(fake, 2)
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: index.snapshot.ready and _host(1) in index.snapshot.services, what="first sync")
        before = dict(index.snapshot.services)
        await fake.stop()
        await eventually(lambda: index.snapshot.shards[source].stale, timeout=10, what="stale")
        assert dict(index.snapshot.services) == before
        assert index.snapshot.shards[source].parts["services"].last_error
        fake.delete("services", "shop", "s0")
        fake.apply("services", service("s5", "shop", cluster_ips=["10.96.1.5"]))
        await fake.start()
        await eventually(
            lambda: (
                not index.snapshot.shards[source].stale
                and _host(0) not in index.snapshot.services
                and _host(5) in index.snapshot.services
            ),
            timeout=10,
            what="converged after the outage",
        )


async def test_two_clusters_merge_by_hostname(index: Index, tmp_path: Path) -> None:
    async with FakeApiServer() as east, FakeApiServer() as west:
        for fake, ip, vip in ((east, "10.10.0.1", "10.96.0.1"), (west, "10.20.0.1", "10.97.0.1")):
            fake.apply("services", service("web", "shop", cluster_ips=[vip]))
            fake.apply("endpointslices", endpoint_slice("web", [endpoint(ip)], namespace="shop"))
        index.set_order([SourceId("kubernetes/east"), SourceId("kubernetes/west")])
        e = _config(tmp_path, east, "east", network="net-east")
        w = _config(tmp_path, west, "west", network="net-west")
        async with running(index, e, tmp_path), running(index, w, tmp_path):
            await eventually(lambda: len(_eps(index, WEB) or {}) == 2, what="merged")
            svc = index.snapshot.services[WEB]
            assert {(ep.address, ep.source, ep.network) for ep in svc.endpoints} == {
                ("10.10.0.1", "kubernetes/east", "net-east"),
                ("10.20.0.1", "kubernetes/west", "net-west"),
            }
            (slice_key,) = west.objects["endpointslices"]
            west.delete("endpointslices", *slice_key)
            await eventually(lambda: _eps(index, WEB) == {"10.10.0.1": Health.HEALTHY}, what="west's endpoint gone")
            assert index.snapshot.services[WEB].addresses == ("10.96.0.1",)


async def test_filters_namespaces_and_label_selector(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.apply("services", service("a", "one", cluster_ips=["10.96.2.1"], labels={"expose": "yes"}))
    fake.apply("services", service("b", "one", cluster_ips=["10.96.2.2"]))
    fake.apply("services", service("c", "two", cluster_ips=["10.96.2.3"], labels={"expose": "yes"}))
    fake.apply("services", service("d", "three", cluster_ips=["10.96.2.4"], labels={"expose": "yes"}))
    config = _config(tmp_path, fake, namespaces=["one", "two"], label_selector="expose=yes", domain="corp.internal")
    async with running(index, config, tmp_path):
        await eventually(lambda: index.snapshot.ready, what="first sync")
        assert set(index.snapshot.services) == {"a.one.svc.corp.internal", "c.two.svc.corp.internal"}
        fake.apply("services", service("b", "one", cluster_ips=["10.96.2.2"], labels={"expose": "yes"}))
        fake.apply("services", service("a", "one", cluster_ips=["10.96.2.1"]))
        await eventually(
            lambda: set(index.snapshot.services) == {"b.one.svc.corp.internal", "c.two.svc.corp.internal"},
            what="selector followed",
        )
    watched = {p for p, q in fake.requests if q.get("watch") == "true"}
    assert "/api/v1/namespaces/one/services" in watched and "/api/v1/services" not in watched


async def test_node_regions_when_nodes_are_watched(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.apply("nodes", {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/region": "eu"}}})
    fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10"]))
    fake.apply(
        "endpointslices", endpoint_slice("web", [endpoint("10.1.0.1", zone="eu-1", node="n1")], namespace="shop")
    )
    async with running(index, _config(tmp_path, fake, watch_nodes=True), tmp_path):
        await eventually(lambda: index.snapshot.ready, what="first sync")
        locality = index.snapshot.services[WEB].endpoints[0].locality
        assert (locality.region, locality.zone) == ("eu", "eu-1")
        fake.apply("nodes", {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/region": "us"}}})
        await eventually(lambda: index.snapshot.services[WEB].endpoints[0].locality.region == "us", what="region")


async def test_nodes_are_not_read_unless_asked(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    _web(fake, 1)
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: index.snapshot.ready, what="first sync")
    assert not any(p.endswith("/nodes") for p, _ in fake.requests)


async def test_a_burst_of_slice_updates_makes_few_versions(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    _web(fake, 1)
    async with running(index, _config(tmp_path, fake, coalesce="200ms"), tmp_path):
        await eventually(lambda: index.snapshot.ready and _host(0) in index.snapshot.services, what="first sync")
        start = index.snapshot.version
        for i in range(300):
            fake.apply(
                "endpointslices",
                endpoint_slice("s0", [endpoint(f"10.6.{i // 250}.{i % 250}")], namespace="shop", name="s0"),
            )
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # the events arrive over several chunks
        await eventually(lambda: _eps(index, _host(0)) == {"10.6.1.49": Health.HEALTHY}, what="last update")
        versions = index.snapshot.version - start
        assert 1 <= versions <= 10, versions


async def test_bad_service_is_reported_and_the_last_good_one_kept(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    _web(fake, 1)
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: _host(0) in index.snapshot.services, what="first sync")
        fake.apply("services", service("s0", "shop", cluster_ips=["10.96.1.0"], ports=[{"name": "x", "port": 0}]))
        problems = await eventually(lambda: index.snapshot.shards[source].problems, what="problem")
        assert [str(p) for p in problems] == ["Service shop/s0: spec.ports[0].port: expected a port number, got 0"]
        assert index.snapshot.services[_host(0)].addresses == ("10.96.1.0",)
        fake.apply("services", service("s0", "shop", cluster_ips=["10.96.1.0"]))
        await eventually(lambda: not index.snapshot.shards[source].problems, what="problem cleared")


async def test_unreachable_at_start_fails_readiness_then_syncs(index: Index, tmp_path: Path) -> None:
    fake = FakeApiServer()
    await fake.start()
    port = fake.port
    await fake.stop()
    config = _config(tmp_path, fake)
    async with running(index, config, tmp_path):
        await eventually(lambda: index.snapshot.shards[config.source].failed, what="the first failure reported")
        assert index.snapshot.shards[config.source].stale and not index.snapshot.ready  # a failure alone is not ready
        fake2 = FakeApiServer(port=port)
        _web(fake2, 1)
        async with fake2:
            await eventually(lambda: _host(0) in index.snapshot.services, timeout=10, what="synced later")
            await eventually(lambda: not index.snapshot.shards[config.source].stale, what="not stale")


class KubernetesHarness:
    """The contract suite's view of a cluster: a Service `<name>` in namespace `contract` and one slice."""

    def __init__(self, fake: FakeApiServer, tmp: Path) -> None:
        self.fake, self.tmp = fake, tmp

    def registry(self) -> KubernetesRegistry:
        return KubernetesRegistry(_config(self.tmp, self.fake), self.tmp)

    async def put(self, name: str, endpoints: list[tuple[str, int]]) -> Hostname:
        self.fake.apply("services", service(name, "contract", cluster_ips=["10.96.9.9"]))
        ports = sorted({p for _, p in endpoints})
        for port in ports:
            eps = [endpoint(ip) for ip, p in endpoints if p == port]
            slice_ports = [{"name": "http", "port": port}]
            self.fake.apply(
                "endpointslices",
                endpoint_slice(name, eps, namespace="contract", name=f"{name}-{port}", ports=slice_ports),
            )
        for (ns, slice_name), obj in list(self.fake.objects["endpointslices"].items()):
            owner = obj["metadata"]["labels"]["kubernetes.io/service-name"]
            if ns == "contract" and owner == name and int(slice_name.rsplit("-", 1)[1]) not in ports:
                self.fake.delete("endpointslices", ns, slice_name)
        return Hostname(f"{name}.contract.svc.cluster.local")

    async def remove(self, name: str) -> None:
        self.fake.delete("services", "contract", name)

    async def put_broken(self, name: str) -> None:
        self.fake.apply("services", service(name, "contract", ports=[{"name": "http", "port": 70000}]))

    async def outage(self) -> None:
        await self.fake.stop()

    async def restore(self) -> None:
        await self.fake.restart()  # a restarted API server: its new watch cache answers 410 to older versions


class TestContract(AdapterContract):
    @pytest.fixture
    async def harness(self, fake: FakeApiServer, tmp_path: Path) -> KubernetesHarness:
        return KubernetesHarness(fake, tmp_path)


async def test_a_replaced_cluster_with_lower_versions_is_listed_again(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    """A new cluster at the same address (a new etcd: versions start over) answers the old version with
    "Too large resource version"; the registry lists again instead of retrying that watch forever.
    (One whose versions have already caught up with the old one cannot be told apart, as with client-go.)"""
    _web(fake, 3)
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: _host(2) in index.snapshot.services, what="first sync")
        await fake.stop()
        fake.reset()
        fake.apply("services", service("fresh", "shop", cluster_ips=["10.96.7.7"]))
        await fake.start()
        await eventually(
            lambda: set(index.snapshot.services) == {"fresh.shop.svc.cluster.local"}, timeout=10, what="relisted"
        )


def _entry(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


async def test_istio_crds_absent_then_installed(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    """Without the CRDs the registry is ready (the istio part empty, reported once, looked at again slowly);
    once installed, a ServiceEntry and a WorkloadEntry selected by another arrive in the `istio` part."""
    _web(fake, 1)
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake, crd_retry="200ms"), tmp_path):
        await eventually(lambda: index.snapshot.ready and _host(0) in index.snapshot.services, what="first sync")
        parts = index.snapshot.shards[source].parts
        assert set(parts) == {"services", "istio"} and parts["istio"].synced and parts["istio"].services == 0
        fake.install_crds()
        fake.apply(
            "serviceentries",
            _entry(
                "ext",
                "shop",
                {
                    "hosts": ["api.example.com"],
                    "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
                    "resolution": "DNS",
                    "location": "MESH_EXTERNAL",
                },
            ),
        )
        fake.apply(
            "serviceentries",
            _entry(
                "vms",
                "shop",
                {
                    "hosts": ["billing.vms.internal"],
                    "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                    "resolution": "STATIC",
                    "workloadSelector": {"labels": {"app": "billing"}},
                },
            ),
        )
        fake.apply("workloadentries", _entry("vm-1", "shop", {"address": "10.30.0.1", "labels": {"app": "billing"}}))
        fake.apply("workloadentries", _entry("vm-2", "shop", {"address": "10.30.0.2", "labels": {"app": "other"}}))
        fake.apply(
            "workloadentries", _entry("vm-3", "elsewhere", {"address": "10.30.0.3", "labels": {"app": "billing"}})
        )
        billing = Hostname("billing.vms.internal")
        await eventually(lambda: _eps(index, billing) == {"10.30.0.1": Health.HEALTHY}, timeout=10, what="selected")
        ext = index.snapshot.services[Hostname("api.example.com")]
        assert ext.resolution is Resolution.DNS and ext.ports[0].protocol is PortProtocol.TLS
        assert index.snapshot.shards[source].parts["istio"].services == 2
        # The selection follows the workloads' labels.
        fake.apply("workloadentries", _entry("vm-2", "shop", {"address": "10.30.0.2", "labels": {"app": "billing"}}))
        await eventually(lambda: len(_eps(index, billing) or {}) == 2, what="second workload selected")
        fake.delete("serviceentries", "shop", "ext")
        await eventually(lambda: Hostname("api.example.com") not in index.snapshot.services, what="entry deleted")
    listed = [p for p, q in fake.requests if p.endswith("/serviceentries") and q.get("watch") != "true"]
    assert 2 <= len(listed) < 60  # looked at again slowly, not polled in a loop


async def test_invalid_crd_is_reported_by_name_and_field(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.install_crds()
    good = {"hosts": ["a.example.com"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
    fake.apply("serviceentries", _entry("good", "ns1", good | {"resolution": "DNS"}))
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: Hostname("a.example.com") in index.snapshot.services, what="first sync")
        bad = {"hosts": ["b.example.com"], "ports": [{"number": 99999, "name": "http", "protocol": "HTTP"}]}
        fake.apply("serviceentries", _entry("bad", "ns1", bad | {"resolution": "DNS"}))
        problems = await eventually(lambda: index.snapshot.shards[source].problems, what="problem reported")
        assert [(p.where, p.field) for p in problems] == [("ServiceEntry ns1/bad", "spec.ports[0].number")]
        assert Hostname("b.example.com") not in index.snapshot.services
        # The watch goes on: a later change to the good entry arrives, the fix clears the report.
        fake.apply("serviceentries", _entry("good", "ns1", good | {"resolution": "DNS", "hosts": ["c.example.com"]}))
        await eventually(lambda: Hostname("c.example.com") in index.snapshot.services, what="watch continues")
        fake.apply("serviceentries", _entry("bad", "ns1", good | {"resolution": "DNS", "hosts": ["b.example.com"]}))
        await eventually(
            lambda: Hostname("b.example.com") in index.snapshot.services and not index.snapshot.shards[source].problems,
            what="fixed",
        )


async def test_a_service_and_a_serviceentry_for_one_host_coexist(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    fake.install_crds()
    fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10"]))
    fake.apply("endpointslices", endpoint_slice("web", [endpoint("10.1.0.1")], namespace="shop"))
    spec = {
        "hosts": [WEB],
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "resolution": "STATIC",
        "endpoints": [{"address": "10.40.0.1"}],
    }
    fake.apply("serviceentries", _entry("web-vms", "shop", spec))
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: len(_eps(index, WEB) or {}) == 2, what="both parts merged")
        conflict = index.snapshot.conflicts[WEB]
        assert {key.part for key in conflict.shards} == {"services", "istio"}


async def test_pods_selected_as_workloads_when_enabled(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    fake.install_crds()
    spec = {
        "hosts": ["legacy.shop.internal"],
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "resolution": "STATIC",
        "workloadSelector": {"labels": {"app": "legacy"}},
    }
    fake.apply("serviceentries", _entry("legacy", "shop", spec))
    pod = {
        "metadata": {"name": "legacy-1", "namespace": "shop", "labels": {"app": "legacy"}},
        "spec": {"nodeName": "n1", "serviceAccountName": "legacy"},
        "status": {"podIP": "10.50.0.1", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    fake.apply("pods", pod)
    host = Hostname("legacy.shop.internal")
    async with running(index, _config(tmp_path, fake, pods=True), tmp_path):
        await eventually(lambda: _eps(index, host) == {"10.50.0.1": Health.HEALTHY}, what="pod selected")
        ep = index.snapshot.services[host].endpoints[0]
        assert (ep.service_account, ep.target_ref) == ("legacy", "Pod/shop/legacy-1")
        fake.delete("pods", "shop", "legacy-1")
        await eventually(lambda: _eps(index, host) == {}, what="pod gone")


async def test_forbidden_crds_do_not_stop_the_services(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    """An RBAC without the Istio rules (403 on serviceentries) leaves the istio part empty and looked at
    again slowly; the Services are read and followed as usual, the registry ready and not stale."""
    fake.install_crds()
    fake.forbidden.add("serviceentries")
    _web(fake, 1)
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake, crd_retry="100ms"), tmp_path):
        await eventually(lambda: index.snapshot.ready and _host(0) in index.snapshot.services, what="first sync")
        fake.apply("services", service("s9", "shop", cluster_ips=["10.96.1.9"]))
        await eventually(lambda: _host(9) in index.snapshot.services, what="followed")
        assert not index.snapshot.shards[source].stale
        fake.forbidden.clear()
        fake.apply("serviceentries", _entry("e", "shop", {"hosts": ["e.example.com"], "resolution": "DNS"}))
        await eventually(lambda: Hostname("e.example.com") in index.snapshot.services, what="readable later")


def _rule(name: str, namespace: str, host: str, **spec: Any) -> dict[str, Any]:
    return _entry(name, namespace, {"host": host, **spec})


def _policy(index: Index, host: str) -> Any:
    return index.snapshot.policies.get(Hostname(host))


async def test_destination_rules_and_virtual_services_from_crds(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    """DestinationRule and VirtualService CRDs become the `istio` part's traffic policy: absent CRDs first
    (nothing, ready), then installed; added, modified and deleted objects follow."""
    _web(fake, 1)
    web = "s0.shop.svc.cluster.local"
    async with running(index, _config(tmp_path, fake, crd_retry="200ms"), tmp_path):
        await eventually(lambda: index.snapshot.ready and _host(0) in index.snapshot.services, what="first sync")
        assert not index.snapshot.policies
        fake.install_crds()
        subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
        fake.apply("destinationrules", _rule("s0", "shop", web, subsets=subsets))
        rule = await eventually(
            lambda: (p := _policy(index, web)) is not None and p.destination_rule, timeout=10, what="rule arrives"
        )
        assert (rule.namespace, rule.name) == ("shop", "s0")
        assert [s.name for s in rule.subsets] == ["v1", "v2"]
        split = [
            {"destination": {"host": web, "subset": "v1"}, "weight": 80},
            {"destination": {"host": web, "subset": "v2"}, "weight": 20},
        ]
        fake.apply("virtualservices", _entry("s0", "shop", {"hosts": [web], "http": [{"route": split}]}))
        vs = await eventually(
            lambda: (p := _policy(index, web)) is not None and p.virtual_service, what="virtual service arrives"
        )
        assert [(d.subset, d.weight) for d in vs.http[0].destinations] == [("v1", 80), ("v2", 20)]
        # Modified: the rule's load balancer; the route stays.
        fake.apply(
            "destinationrules",
            _rule("s0", "shop", web, subsets=subsets, trafficPolicy={"loadBalancer": {"simple": "LEAST_REQUEST"}}),
        )
        await eventually(
            lambda: (
                (p := _policy(index, web)) is not None
                and p.destination_rule.traffic_policy is not None
                and p.virtual_service is not None
            ),
            what="rule modified",
        )
        # Deleted: first the route, then the rule.
        fake.delete("virtualservices", "shop", "s0")
        await eventually(lambda: _policy(index, web).virtual_service is None, what="virtual service deleted")
        fake.delete("destinationrules", "shop", "s0")
        await eventually(lambda: _policy(index, web) is None, what="rule deleted")
    listed = [p for p, q in fake.requests if p.endswith("/destinationrules") and q.get("watch") != "true"]
    assert 2 <= len(listed) < 60  # absent at first: looked at again slowly, not polled


async def test_invalid_destination_rule_is_reported_and_the_last_good_one_kept(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    fake.install_crds()
    host = "api.example.com"
    fake.apply("destinationrules", _rule("api", "ns1", host, trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}))
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake), tmp_path):
        await eventually(lambda: _policy(index, host) is not None, what="first sync")
        fake.apply("destinationrules", _rule("api", "ns1", host, trafficPolicy={"loadBalancer": {"simple": "FASTEST"}}))
        route = {"route": [{"destination": {"host": host}}], "timeout": "soon"}
        fake.apply("virtualservices", _entry("api", "ns1", {"hosts": [host], "http": [route]}))
        problems = await eventually(
            lambda: len(index.snapshot.shards[source].problems) == 2 and index.snapshot.shards[source].problems,
            what="problems reported",
        )
        assert sorted((p.where, p.field) for p in problems) == [
            ("DestinationRule ns1/api", "spec.trafficPolicy.loadBalancer.simple"),
            ("VirtualService ns1/api", "spec.http[0].timeout"),
        ]
        assert _policy(index, host).virtual_service is None  # never valid: nothing served
        # The last valid version is still served.
        rule = _policy(index, host).destination_rule
        assert rule.traffic_policy.load_balancer.simple == "RANDOM"
        # Fixed: served, the report cleared; the watch went on meanwhile.
        fake.apply(
            "destinationrules", _rule("api", "ns1", host, trafficPolicy={"loadBalancer": {"simple": "LEAST_REQUEST"}})
        )
        fake.delete("virtualservices", "ns1", "api")
        await eventually(
            lambda: (
                _policy(index, host).destination_rule.traffic_policy.load_balancer.simple == "LEAST_REQUEST"
                and not index.snapshot.shards[source].problems
            ),
            what="fixed",
        )


async def test_short_rule_hosts_resolve_under_the_cluster_domain(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    """A DestinationRule `host: web` in namespace shop of a cluster with `domain: k8s.internal` names
    web.shop.svc.k8s.internal, the Service's own hostname there."""
    fake.install_crds()
    fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10"]))
    fake.apply("destinationrules", _rule("web", "shop", "web", trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}))
    fake.apply(
        "virtualservices",
        _entry("web", "shop", {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "api"}}]}]}),
    )
    async with running(index, _config(tmp_path, fake, domain="k8s.internal"), tmp_path):
        host = "web.shop.svc.k8s.internal"
        await eventually(
            lambda: (
                Hostname(host) in index.snapshot.services
                and (p := _policy(index, host)) is not None
                and p.virtual_service is not None
            ),
            what="rule under the cluster domain",
        )
        policy = _policy(index, host)
        assert policy.destination_rule.host == host
        assert policy.virtual_service.http[0].destinations[0].host == "api.shop.svc.k8s.internal"
        assert _policy(index, "web.shop.svc.cluster.local") is None


async def test_the_oldest_rule_comes_first(fake: FakeApiServer, index: Index, tmp_path: Path) -> None:
    """Two public VirtualServices for one host: the older one (creationTimestamp) is the one clients get,
    whatever the namespaces' names, as in Istio."""
    fake.install_crds()
    host = "api.example.com"

    def vs(namespace: str, created: str, timeout: str) -> dict[str, Any]:
        route = {"route": [{"destination": {"host": host}}], "timeout": timeout}
        doc = _entry("api", namespace, {"hosts": [host], "http": [route]})
        doc["metadata"]["creationTimestamp"] = created
        return doc

    fake.apply("virtualservices", vs("a-newer", "2026-01-02T00:00:00Z", "1s"))
    fake.apply("virtualservices", vs("b-older", "2025-06-01T00:00:00Z", "2s"))
    async with running(index, _config(tmp_path, fake), tmp_path):
        policy = await eventually(
            lambda: (p := _policy(index, host)) is not None and len(p.routes) == 2 and p, what="both routes"
        )
        assert [r.namespace for r in policy.routes] == ["b-older", "a-newer"]
        assert policy.select("elsewhere", "x", "istio-system").virtual_service.namespace == "b-older"


async def test_forbidden_rules_do_not_stop_the_service_entries(
    fake: FakeApiServer, index: Index, tmp_path: Path
) -> None:
    """An RBAC without destinationrules (403): the other Istio kinds are read and followed, the registry is
    ready; once readable, the rules arrive."""
    fake.install_crds()
    fake.forbidden.add("destinationrules")
    fake.apply("serviceentries", _entry("e", "shop", {"hosts": ["e.example.com"], "resolution": "DNS"}))
    fake.apply(
        "destinationrules", _rule("e", "shop", "e.example.com", trafficPolicy={"loadBalancer": {"simple": "RANDOM"}})
    )
    source = SourceId("kubernetes/c1")
    async with running(index, _config(tmp_path, fake, crd_retry="100ms"), tmp_path):
        await eventually(
            lambda: index.snapshot.ready and Hostname("e.example.com") in index.snapshot.services, what="first sync"
        )
        assert _policy(index, "e.example.com") is None and not index.snapshot.shards[source].stale
        fake.forbidden.clear()
        await eventually(lambda: _policy(index, "e.example.com") is not None, what="readable later")


async def test_the_first_publication_of_a_large_cluster_keeps_the_loop_serving(index: Index) -> None:
    # The sync path alone (the view fed as the reflectors feed it, then the coalescer's flush): a one-shot
    # replace of 60k Services holds the loop for 0.2 s or more of CPU; the stepwise one aims at 2 ms steps.
    from adapters.kubernetes.registry import SERVICES_PART, _ServiceView

    config = KubernetesConfig.model_validate({"kind": "kubernetes", "name": "big"})
    view = _ServiceView(config, index.writer(config.source).part(SERVICES_PART))
    n = 60_000
    view.expected = {"services", "endpointslices"}
    view.services_replace(None, [service(f"s{i}", f"ns{i % 50}") for i in range(n)])
    view.slices_replace(
        None,
        [
            endpoint_slice(f"s{i}", [endpoint(f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}")], namespace=f"ns{i % 50}")
            for i in range(n)
        ],
    )
    view.listed = set(view.expected)
    async with watching_the_loop(index) as watch:
        await view.flush()
    assert watch.longest < 0.1, f"the loop was held for {watch.longest * 1000:.0f} ms of CPU"
    assert len(watch.gaps) > 20, "the flush never yielded to the loop"
    # One world: readers saw the empty part, then every Service at once, synced.
    assert [len(s.services) for s in watch.seen] == [0, n]
    assert watch.seen[1].version == watch.seen[0].version + 1 and watch.seen[1].ready
    svc = index.snapshot.services[Hostname("s7.ns7.svc.cluster.local")]
    assert [ep.address for ep in svc.endpoints] == ["10.0.0.7"]


async def test_the_first_publication_of_many_service_entries_keeps_the_loop_serving(index: Index) -> None:
    # 2000 ServiceEntries of 50 hosts: 100k services that the `istio` part's first flush replaces in steps.
    # The translation is built before: its build is a step of its own (per namespace), not the replace's.
    from adapters.kubernetes.crds import ISTIO_PART, IstioView

    view = IstioView(index.writer(SourceId("kubernetes/big")).part(ISTIO_PART))
    view.expected = {"serviceentries"}
    spec = {"ports": [{"number": 80, "name": "http", "protocol": "HTTP"}], "resolution": "DNS"}
    n, hosts = 2000, 50
    entries = [
        _entry(f"e{i}", f"ns{i % 50}", spec | {"hosts": [f"h{i}-{k}.example.com" for k in range(hosts)]})
        for i in range(n)
    ]
    view.replace(
        "serviceentries", None, [{"kind": "ServiceEntry", "apiVersion": "networking.istio.io/v1"} | e for e in entries]
    )
    view.listed = set(view.expected)
    assert len(view._translation.build()) == n * hosts
    async with watching_the_loop(index) as watch:
        await view.flush()
    assert watch.longest < 0.1, f"the loop was held for {watch.longest * 1000:.0f} ms of CPU"
    assert len(watch.gaps) > 20, "the flush never yielded to the loop"
    assert [len(s.services) for s in watch.seen] == [0, n * hosts]
    assert watch.seen[1].version == watch.seen[0].version + 1 and watch.seen[1].ready


async def test_a_session_lost_during_a_stepwise_first_publication_leaves_the_part_failing(index: Index) -> None:
    # What a session's end does (KubernetesRegistry._failing, then the session loop's mark_failing) while the
    # coalescer's flush is between two steps: the content is published, the part is not marked synced.
    from adapters.kubernetes.registry import SERVICES_PART, _ServiceView

    config = KubernetesConfig.model_validate({"kind": "kubernetes", "name": "big"})
    shard = index.writer(config.source).part(SERVICES_PART)
    view = _ServiceView(config, shard)
    n = 20_000
    view.expected = {"services"}
    view.services_replace(None, [service(f"s{i}", "ns") for i in range(n)])
    view.listed = set(view.expected)
    flush = asyncio.create_task(view.flush())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not flush.done(), "the flush did not yield"
    view.stale = True
    shard.mark_failing("connection lost")
    await flush
    part = index.snapshot.shards[config.source].parts[SERVICES_PART]
    assert part.services == n and part.failed and not part.synced and part.last_error == "connection lost"
    assert view.stale  # the watches coming back mark it synced (flush's `back`)


async def test_a_session_lost_during_the_istio_parts_stepwise_first_publication_leaves_it_failing(
    index: Index,
) -> None:
    from adapters.kubernetes.crds import ISTIO_PART, IstioView

    shard = index.writer(SourceId("kubernetes/big")).part(ISTIO_PART)
    view = IstioView(shard)
    view.expected = {"serviceentries"}
    spec = {"ports": [{"number": 80, "name": "http", "protocol": "HTTP"}], "resolution": "DNS"}
    typed = {"kind": "ServiceEntry", "apiVersion": "networking.istio.io/v1"}
    entries = [
        typed | _entry(f"e{i}", "ns", spec | {"hosts": [f"h{i}-{k}.example.com" for k in range(50)]})
        for i in range(400)
    ]
    view.replace("serviceentries", None, entries)
    view.listed = set(view.expected)
    flush = asyncio.create_task(view.flush())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not flush.done(), "the flush did not yield"
    view.stale = True  # what KubernetesRegistry._failing does, with mark_failing, when a session ends
    shard.mark_failing("connection lost")
    await flush
    part = index.snapshot.shards[SourceId("kubernetes/big")].parts[ISTIO_PART]
    assert part.services == 20_000 and part.failed and not part.synced and view.stale
