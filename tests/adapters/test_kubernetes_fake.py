"""The fake Kubernetes API server, checked with the official client (`kubernetes.aio`).

If the official client reads the fake the way it reads a real API server
(models deserialize, pages join up, watches stream, 410 surfaces as the
client's ApiException or as an ERROR event), then what the adapter tests
prove against the fake holds for a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes.aio import client, config, watch
from kubernetes.aio.client.exceptions import ApiException

from tests.fakes.kubernetes import FakeApiServer, endpoint, endpoint_slice, kubeconfig, service
from tests.helpers import eventually


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="s3cret", bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
async def api(fake: FakeApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    path = tmp_path / "kubeconfig"
    path.write_text(kubeconfig(fake))
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    async with client.ApiClient(configuration) as api_client:
        yield api_client


async def test_list_deserializes_into_models(fake: FakeApiServer, api: client.ApiClient) -> None:
    fake.apply("services", service("web", "shop", cluster_ips=["10.96.0.10", "fd00::10"], labels={"app": "web"}))
    ep = endpoint("10.1.0.1", zone="a", node="n1", pod="web-1")
    fake.apply("endpointslices", endpoint_slice("web", [ep], namespace="shop"))
    services = await client.CoreV1Api(api).list_service_for_all_namespaces()
    assert [s.metadata.name for s in services.items] == ["web"]
    assert services.items[0].spec.cluster_ips == ["10.96.0.10", "fd00::10"]
    assert int(services.metadata.resource_version) >= int(services.items[0].metadata.resource_version)
    slices = await client.DiscoveryV1Api(api).list_namespaced_endpoint_slice("shop")
    got = slices.items[0].endpoints[0]
    assert (got.addresses, got.zone, got.node_name, got.target_ref.name, got.conditions.ready) == (
        ["10.1.0.1"],
        "a",
        "n1",
        "web-1",
        True,
    )


async def test_wrong_token_is_refused(fake: FakeApiServer, tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_text(kubeconfig(fake, token="wrong"))
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    async with client.ApiClient(configuration) as api_client:
        with pytest.raises(ApiException) as caught:
            await client.CoreV1Api(api_client).list_service_for_all_namespaces()
    assert caught.value.status == 401


async def test_pages_join_into_one_consistent_list(fake: FakeApiServer, api: client.ApiClient) -> None:
    for i in range(7):
        fake.apply("services", service(f"s{i}"))
    core = client.CoreV1Api(api)
    first = await core.list_namespaced_service("default", limit=3)
    assert len(first.items) == 3 and first.metadata.var_continue and first.metadata.remaining_item_count == 4
    # Changes after the first page do not show in later pages: they are read at the first page's version.
    fake.apply("services", service("s9"))
    fake.delete("services", "default", "s6")
    names = [s.metadata.name for s in first.items]
    token = first.metadata.var_continue
    while token:
        page = await core.list_namespaced_service("default", limit=3, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [s.metadata.name for s in page.items]
        token = page.metadata.var_continue
    assert names == [f"s{i}" for i in range(7)]


async def test_expired_continue_token_is_410(fake: FakeApiServer, api: client.ApiClient) -> None:
    for i in range(4):
        fake.apply("services", service(f"s{i}"))
    core = client.CoreV1Api(api)
    first = await core.list_service_for_all_namespaces(limit=2)
    fake.expire_continue_tokens()
    with pytest.raises(ApiException) as caught:
        await core.list_service_for_all_namespaces(limit=2, _continue=first.metadata.var_continue)
    assert caught.value.status == 410 and '"reason":"Expired"' in caught.value.body.replace(" ", "")


async def test_watch_streams_changes_and_bookmarks_from_a_version(fake: FakeApiServer, api: client.ApiClient) -> None:
    fake.apply("services", service("a"))
    listed = await client.CoreV1Api(api).list_service_for_all_namespaces()
    fake.apply("services", service("b"))
    fake.apply("services", service("a", labels={"v": "2"}))
    fake.delete("services", "default", "b")
    seen: list[tuple[str, str]] = []
    w = watch.Watch()
    async with asyncio.timeout(10):
        async for event in w.stream(
            client.CoreV1Api(api).list_service_for_all_namespaces,
            resource_version=listed.metadata.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        ):
            if event["type"] == "BOOKMARK":
                bookmark = event["raw_object"]["metadata"]["resourceVersion"]
                break
            seen.append((event["type"], event["object"].metadata.name))
    await w.close()
    assert seen == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert int(bookmark) == fake.rv


async def test_timeout_seconds_ends_the_stream(fake: FakeApiServer, api: client.ApiClient) -> None:
    w = watch.Watch()
    start = asyncio.get_running_loop().time()
    async with asyncio.timeout(10):
        events = [e async for e in w.stream(client.CoreV1Api(api).list_service_for_all_namespaces, timeout_seconds=1)]
    await w.close()
    assert events == [] and asyncio.get_running_loop().time() - start >= 0.9


async def test_compacted_version_is_410_as_event_or_status(fake: FakeApiServer, api: client.ApiClient) -> None:
    fake.apply("services", service("a"))
    old = str(fake.rv)
    fake.apply("services", service("b"))
    fake.compact()
    core = client.CoreV1Api(api)
    # The watch cache's way: 200, then an ERROR event carrying a 410 Status (the client raises it).
    w = watch.Watch()
    with pytest.raises(ApiException) as caught:
        async with asyncio.timeout(10):
            async for _ in w.stream(core.list_service_for_all_namespaces, resource_version=old, timeout_seconds=5):
                pass
    await w.close()
    assert caught.value.status == 410
    fake.gone_as = "status"
    with pytest.raises(ApiException) as caught:
        await core.list_service_for_all_namespaces(watch=True, resource_version=old, timeout_seconds=5)
    assert caught.value.status == 410


async def test_label_selected_watch_sees_objects_enter_and_leave(fake: FakeApiServer, api: client.ApiClient) -> None:
    listed = await client.CoreV1Api(api).list_service_for_all_namespaces(label_selector="tier in (web, api),!skip")
    fake.apply("services", service("x", labels={"tier": "web"}))
    fake.apply("services", service("x", labels={"tier": "db"}))
    fake.apply("services", service("y", labels={"tier": "api", "skip": ""}))
    fake.bookmark()
    seen = []
    w = watch.Watch()
    async with asyncio.timeout(10):
        async for event in w.stream(
            client.CoreV1Api(api).list_service_for_all_namespaces,
            label_selector="tier in (web, api),!skip",
            resource_version=listed.metadata.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        ):
            if event["type"] == "BOOKMARK":
                break
            seen.append((event["type"], event["object"].metadata.name))
    await w.close()
    assert seen == [("ADDED", "x"), ("DELETED", "x")]


async def test_crds_absent_then_installed(fake: FakeApiServer, api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as caught:
        await custom.list_cluster_custom_object("networking.istio.io", "v1", "serviceentries")
    assert caught.value.status == 404
    fake.install_crds()
    entry = {"metadata": {"name": "ext", "namespace": "ns1"}, "spec": {"hosts": ["api.example.com"]}}
    fake.apply("serviceentries", entry)
    listed = await custom.list_cluster_custom_object("networking.istio.io", "v1", "serviceentries")
    assert [i["spec"]["hosts"] for i in listed["items"]] == [["api.example.com"]]


async def test_restart_ends_watches_and_old_versions_become_gone(
    fake: FakeApiServer, api: client.ApiClient, tmp_path: Path
) -> None:
    fake.apply("services", service("a"))
    rv = str(fake.rv)
    core = client.CoreV1Api(api)
    w = watch.Watch()

    async def follow() -> list[str]:
        stream = w.stream(core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30)
        return [e["type"] async for e in stream]

    task = asyncio.create_task(follow())
    await eventually(lambda: fake.watches == 1, what="the watch is open")
    fake.apply("services", service("b"))
    await fake.restart()
    # The open watch ends when the server goes away (with an error or a short read, as on a real restart).
    async with asyncio.timeout(10):
        await asyncio.gather(task, return_exceptions=True)
    await w.close()  # closes `api` too (the client's Watch owns its ApiClient)
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(tmp_path / "kubeconfig"), client_configuration=configuration)
    async with client.ApiClient(configuration) as fresh:
        await _after_restart(fake, client.CoreV1Api(fresh), rv)


async def _after_restart(fake: FakeApiServer, core: client.CoreV1Api, rv: str) -> None:
    # After the restart the data is still there, and a watch from before it is 410.
    assert [s.metadata.name for s in (await core.list_service_for_all_namespaces()).items] == ["a", "b"]
    fake.gone_as = "status"
    with pytest.raises(ApiException) as caught:
        await core.list_service_for_all_namespaces(watch=True, resource_version=rv, timeout_seconds=1)
    assert caught.value.status == 410
