"""What the files adapter makes of valid input: documents, kinds, defaults, selectors, merging, the demo."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapters.files import FilesConfig, FilesRegistry
from adapters.files.registry import EMPTY_GRACE, FileSet
from discoveryd.index import Index
from discoveryd.model import (
    Endpoint,
    Hostname,
    Locality,
    Location,
    Port,
    PortProtocol,
    Problem,
    Resolution,
    Service,
    SourceId,
)
from discoveryd.registry import AdapterContext
from tests.helpers import eventually

DEMO = Path(__file__).resolve().parents[2] / "config"


def load(directory: Path, namespace: str = "default") -> tuple[dict[Hostname, Service], list[Problem]]:
    files = FileSet(FilesConfig(kind="files", name="t", paths=["."]).resolved_paths(directory), namespace)
    files.refresh()
    services, problems = files.result()
    return services, [p for ps in problems.values() for p in ps]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_demo_checks_clean_and_serves_the_shop() -> None:
    reg = FilesRegistry(FilesConfig(kind="files", name="local", paths=["serviceentries/"]), AdapterContext(DEMO))
    assert list(reg.check()) == []
    services, _ = load(DEMO / "serviceentries")
    assert set(services) == {
        "frontend.shop.internal",
        "catalog.shop.internal",
        "cart.shop.internal",
        "checkout.shop.internal",
        "api.payments.example.com",
    }
    catalog = services[Hostname("catalog.shop.internal")]
    assert catalog.port(9090) == Port(9090, "grpc", PortProtocol.GRPC)
    assert {ep.locality.zone for ep in catalog.endpoints} == {"us-east-1a", "us-east-1b"}
    assert len(services[Hostname("checkout.shop.internal")].endpoints) == 2  # selected WorkloadEntries
    external = services[Hostname("api.payments.example.com")]
    assert (external.location, external.resolution) == (Location.MESH_EXTERNAL, Resolution.DNS)
    assert [ep.address for ep in external.endpoints] == ["api.payments.example.com"]


def test_multi_document_all_api_versions_and_other_kinds_ignored(tmp_path: Path) -> None:
    docs = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway", "metadata": {"name": "gw"}},
    ]
    for i, version in enumerate(("v1", "v1beta1", "v1alpha3")):
        docs.append(
            {
                "apiVersion": f"networking.istio.io/{version}",
                "kind": "ServiceEntry",
                "metadata": {"name": f"se-{i}"},
                "spec": {
                    "hosts": [f"s{i}.example.com"],
                    "resolution": "STATIC",
                    "endpoints": [{"address": "10.0.0.1"}],
                },
            }
        )
    write(tmp_path, "all.yaml", "\n---\n".join(json.dumps(d) for d in docs) + "\n---\n")
    services, problems = load(tmp_path)
    assert problems == []
    assert set(services) == {"s0.example.com", "s1.example.com", "s2.example.com"}


def test_kind_list_and_json_files(tmp_path: Path) -> None:
    items = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"hosts": ["a.example.com"], "resolution": "STATIC", "endpoints": [{"address": "10.0.0.1"}]},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": "vm", "namespace": "shop"},
            "spec": {"address": "10.0.0.2", "labels": {"app": "b"}},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "b", "namespace": "shop"},
            "spec": {"hosts": ["b.example.com"], "resolution": "STATIC", "workloadSelector": {"labels": {"app": "b"}}},
        },
    ]
    write(tmp_path, "list.json", json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    services, problems = load(tmp_path)
    assert problems == []
    assert [ep.address for ep in services[Hostname("a.example.com")].endpoints] == ["10.0.0.1"]
    assert [ep.address for ep in services[Hostname("b.example.com")].endpoints] == ["10.0.0.2"]


def test_every_field_is_carried_into_the_model(tmp_path: Path) -> None:
    write(
        tmp_path,
        "full.yaml",
        """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: db
  namespace: data
  labels: {team: storage}
spec:
  hosts: [DB.Example.COM., db-alias.example.com]
  addresses: [10.96.0.20, 10.200.0.0/16]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {number: 443, name: https, protocol: https, targetPort: 8443}
    - {number: 9090, name: grpc-admin, protocol: GRPC}
  endpoints:
    - address: 10.0.0.1
      ports: {grpc-admin: 19090}
      labels: {version: v1}
      network: net-east
      locality: us-east-1/us-east-1a/rack-7
      weight: 0
      serviceAccount: db
    - address: 2001:db8::1
      weight: 5
  exportTo: [".", "analytics"]
  subjectAltNames: ["spiffe://cluster.local/ns/data/sa/db"]
""",
    )
    services, problems = load(tmp_path)
    assert problems == []
    db = services[Hostname("db.example.com")]
    assert db == Service(
        hostname=Hostname("db.example.com"),
        namespace="data",
        ports=(Port(443, "https", PortProtocol.HTTPS, 8443), Port(9090, "grpc-admin", PortProtocol.GRPC)),
        addresses=("10.96.0.20", "10.200.0.0/16"),
        resolution=Resolution.STATIC,
        location=Location.MESH_INTERNAL,
        labels={"team": "storage"},
        endpoints=(
            Endpoint(
                address="10.0.0.1",
                ports={"grpc-admin": 19090},
                labels={"version": "v1"},
                locality=Locality("us-east-1", "us-east-1a", "rack-7"),
                weight=1,
                network="net-east",
                service_account="db",
            ),
            Endpoint(address="2001:db8::1", weight=5),
        ),
        name="db",
        export_to=(".", "analytics"),
        subject_alt_names=("spiffe://cluster.local/ns/data/sa/db",),
    )
    assert services[Hostname("db-alias.example.com")].endpoints == db.endpoints


def test_istio_defaults_and_the_configured_namespace(tmp_path: Path) -> None:
    write(
        tmp_path,
        "min.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
        "spec:\n  hosts: [ext.example.com]\n  ports: [{number: 5432, name: tcp-postgres}]\n",
    )
    services, _ = load(tmp_path, namespace="ops")
    ext = services[Hostname("ext.example.com")]
    assert (ext.namespace, ext.resolution, ext.location) == ("ops", Resolution.NONE, Location.MESH_EXTERNAL)
    assert ext.endpoints == ()
    assert ext.ports == (Port(5432, "tcp-postgres", PortProtocol.TCP),)  # unset protocol: from the name


def test_dns_resolution_without_endpoints_resolves_each_host(tmp_path: Path) -> None:
    write(
        tmp_path,
        "dns.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec:\n"
        "  hosts: [a.example.com, b.example.com]\n  resolution: DNS\n"
        "  ports: [{number: 443, name: https, protocol: HTTPS}]\n"
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: via-proxy}\nspec:\n"
        "  hosts: [c.example.com]\n  resolution: DNS\n  endpoints: [{address: egress.example.com}]\n",
    )
    services, problems = load(tmp_path)
    assert problems == []
    assert [ep.address for ep in services[Hostname("a.example.com")].endpoints] == ["a.example.com"]
    assert [ep.address for ep in services[Hostname("b.example.com")].endpoints] == ["b.example.com"]
    assert [ep.address for ep in services[Hostname("c.example.com")].endpoints] == ["egress.example.com"]


WORKLOADS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.shop.internal]
  resolution: STATIC
  ports: [{number: 80, name: http, targetPort: 8080}]
  workloadSelector: {labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: api, version: v1}, locality: eu/eu-1a}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: api, version: v2}, ports: {http: 9000}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-app, namespace: shop}
spec: {address: 10.0.0.3, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-namespace, namespace: staging}
spec: {address: 10.0.0.4, labels: {app: api}}
"""


def test_workload_selector_picks_matching_entries_of_the_same_namespace(tmp_path: Path) -> None:
    write(tmp_path, "api.yaml", WORKLOADS)
    services, problems = load(tmp_path)
    assert problems == []
    api = services[Hostname("api.shop.internal")]
    assert [ep.address for ep in api.endpoints] == ["10.0.0.1", "10.0.0.2"]
    port = api.ports[0]
    assert [ep.port_for(port) for ep in api.endpoints] == [8080, 9000]  # targetPort, or the entry's own port
    assert api.endpoints[0].locality == Locality("eu", "eu-1a")


async def test_workload_entries_in_other_files_follow_the_selector(tmp_path: Path) -> None:
    write(tmp_path, "api.yaml", WORKLOADS.split("---\n")[0])
    index = Index()
    source = SourceId("files/t")
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=["."]), AdapterContext(tmp_path))
    task = asyncio.create_task(reg.run(index.writer(source)))
    try:
        await eventually(lambda: index.snapshot.ready)
        host = Hostname("api.shop.internal")
        assert index.snapshot.services[host].endpoints == ()
        write(tmp_path, "vms.yaml", "---\n".join(WORKLOADS.split("---\n")[1:]))
        await eventually(lambda: len(index.snapshot.services[host].endpoints) == 2, 1.0, what="selected")
        (tmp_path / "vms.yaml").unlink()
        await eventually(lambda: index.snapshot.services[host].endpoints == (), 1.0, what="unselected")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def se(name: str, host: str, ip: str, namespace: str = "shop", port: int = 80) -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  hosts: [{host}]\n  resolution: STATIC\n  ports: [{{number: {port}, name: http}}]\n"
        f"  endpoints: [{{address: {ip}}}]\n"
    )


def test_same_host_in_one_namespace_merges_endpoints(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", se("cart-east", "cart.shop.internal", "10.0.0.1"))
    write(tmp_path, "b.yaml", se("cart-west", "cart.shop.internal", "10.0.0.2"))
    services, problems = load(tmp_path)
    assert problems == []
    assert [ep.address for ep in services[Hostname("cart.shop.internal")].endpoints] == ["10.0.0.1", "10.0.0.2"]


def test_same_host_with_different_attributes_is_reported_on_the_later_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", se("cart-east", "cart.shop.internal", "10.0.0.1"))
    later = write(tmp_path, "b.yaml", se("cart-west", "cart.shop.internal", "10.0.0.2", port=8080))
    services, problems = load(tmp_path)
    cart = services[Hostname("cart.shop.internal")]
    assert cart.ports == (Port(80, "http", PortProtocol.HTTP),)
    assert [ep.address for ep in cart.endpoints] == ["10.0.0.1", "10.0.0.2"]
    [problem] = problems
    assert (problem.where, problem.field) == (f"{later}:5", "spec.hosts[0]")
    assert "also declared by ServiceEntry shop/cart-east" in problem.message
    assert "different ports" in problem.message


def test_same_host_in_another_namespace_is_ignored_and_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", se("cart", "cart.shop.internal", "10.0.0.1"))
    later = write(tmp_path, "b.yaml", se("cart", "cart.shop.internal", "10.0.0.2", namespace="staging"))
    services, problems = load(tmp_path)
    assert [ep.address for ep in services[Hostname("cart.shop.internal")].endpoints] == ["10.0.0.1"]
    [problem] = problems
    assert problem.where == f"{later}:5"
    assert "already declared in namespace shop" in problem.message


def test_same_object_name_twice_is_reported(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", se("cart", "cart.shop.internal", "10.0.0.1"))
    later = write(tmp_path, "b.yaml", se("cart", "basket.shop.internal", "10.0.0.2"))
    services, problems = load(tmp_path)
    assert set(services) == {"cart.shop.internal"}
    [problem] = problems
    assert (problem.where, problem.field) == (f"{later}:3", "metadata.name")
    assert f"ServiceEntry shop/cart is already defined at {first}:3" in problem.message


def test_unix_socket_endpoint(tmp_path: Path) -> None:
    write(
        tmp_path,
        "uds.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: uds}\nspec:\n"
        "  hosts: [uds.local]\n  resolution: STATIC\n  ports: [{number: 80, name: http}]\n"
        "  endpoints: [{address: 'unix:///var/run/app.sock'}]\n",
    )
    services, problems = load(tmp_path)
    assert problems == []
    assert [ep.address for ep in services[Hostname("uds.local")].endpoints] == ["unix:///var/run/app.sock"]


def test_an_emptied_file_keeps_its_content_for_a_short_grace(tmp_path: Path) -> None:
    """An in-place write truncates first; a refresh in between must not drop the file's services."""
    now = [100.0]
    path = write(tmp_path, "cart.yaml", se("cart", "cart.shop.internal", "10.0.0.1"))
    files = FileSet((tmp_path,), "default", clock=lambda: now[0])
    files.refresh()
    host = Hostname("cart.shop.internal")

    path.write_text("")
    refreshed = files.refresh()
    assert not refreshed.changed and refreshed.recheck_in == pytest.approx(EMPTY_GRACE)
    assert host in files.result()[0]

    path.write_text(se("cart", "cart.shop.internal", "10.0.0.2"))  # the writer finishes
    refreshed = files.refresh()
    assert refreshed.changed and refreshed.recheck_in is None
    assert [ep.address for ep in files.result()[0][host].endpoints] == ["10.0.0.2"]

    path.write_text("")  # emptied on purpose
    assert files.refresh().recheck_in is not None
    now[0] += EMPTY_GRACE
    assert files.refresh().changed
    assert files.result() == ({}, {})


def test_a_file_that_becomes_unreadable_keeps_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapters.files.registry as registry_module

    path = write(tmp_path, "cart.yaml", se("cart", "cart.shop.internal", "10.0.0.1"))
    files = FileSet((tmp_path,), "default")
    files.refresh()
    real_open = registry_module.os.open

    def deny(p: str, flags: int, *args: int) -> int:
        if p == str(path):
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, flags, *args)

    monkeypatch.setattr(registry_module.os, "open", deny)
    assert files.refresh(named={str(path)}).changed
    services, problems = files.result()
    assert Hostname("cart.shop.internal") in services
    assert problems == {str(path): (Problem(str(path), "cannot read: Permission denied"),)}


def test_a_file_deleted_and_back_within_the_grace_is_one_change(tmp_path: Path) -> None:
    now = [100.0]
    path = write(tmp_path, "cart.yaml", se("cart", "cart.shop.internal", "10.0.0.1"))
    files = FileSet((tmp_path,), "default", clock=lambda: now[0])
    files.refresh()
    files.take_changed()
    host = Hostname("cart.shop.internal")

    path.unlink()
    refreshed = files.refresh()
    assert not refreshed.changed and refreshed.recheck_in == pytest.approx(EMPTY_GRACE)
    assert host in files.result()[0] and not files.take_changed()

    now[0] += EMPTY_GRACE / 2
    path.write_text(se("cart", "cart.shop.internal", "10.0.0.1"))  # the same content, back
    refreshed = files.refresh()
    assert refreshed.recheck_in is None and not files.take_changed(), "no change reaches the index"

    path.unlink()  # deleted on purpose
    assert files.refresh().recheck_in is not None
    now[0] += EMPTY_GRACE
    assert files.refresh().changed
    assert files.result() == ({}, {}) and files.take_changed() == {host}
