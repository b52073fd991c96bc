"""The Istio translation library: both YAML paths, the chunk cache, API objects, Pods, incremental rebuilds."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.istio import (
    FAST_LOADER,
    PURE_LOADER,
    ChunkCache,
    ObjectLocator,
    Pod,
    Translation,
    objects,
    pod_workload,
    read_object,
    read_yaml_objects,
)
from adapters.istio.yamlread import parse_documents, split_chunks
from discoveryd.model import Health, Hostname, Problem, is_ip

FILE = "/etc/mesh/entries.yaml"


def service_entry(name: str, host: str, ip: str, namespace: str = "shop", **spec: Any) -> str:
    extra = "".join(f"  {k}: {v}\n" for k, v in spec.items())
    return (
        textwrap.dedent(
            f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: {name}
          namespace: {namespace}
        spec:
          hosts: [{host}]
          resolution: STATIC
          ports:
          - {{number: 80, name: http, protocol: HTTP}}
          endpoints:
          - address: {ip}
        """
        )
        + extra
    )


MIXED = (
    "# comments before the first marker\n"
    "---\n" + service_entry("a", "a.example.com", "10.0.0.1") + "---\n"
    "base: &base {app: x}\n"  # anchors and merge keys take the composing path
    "kind: Other\n"
    "copy:\n  <<: *base\n  extra: [1, 2.5, true, null, 2001-02-03, '07', 0x1f]\n"
    "--- !!map\n"
    "apiVersion: v1\nkind: List\nitems:\n"
    "- apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n  metadata: {name: b}\n"
    "  spec:\n    hosts: [b.example.com]\n    ports:\n    - {number: 81, name: tcp, protocol: SMTP}\n"
    "---\n"
    "dup: 1\n"
    "dup: 2\n"
    "---\n"
    "- not a mapping\n"
    "...\n"
)


def test_libyaml_and_pure_python_give_the_same_documents_and_problem_lines() -> None:
    assert FAST_LOADER is not PURE_LOADER, "PyYAML here is built with libyaml"
    fast_docs, fast_problems = parse_documents(FILE, MIXED, FAST_LOADER)
    pure_docs, pure_problems = parse_documents(FILE, MIXED, PURE_LOADER)
    assert [d.data for d in fast_docs] == [d.data for d in pure_docs]
    assert [(d.locator.where(("metadata", "name"))) for d in fast_docs] == [
        d.locator.where(("metadata", "name")) for d in pure_docs
    ]
    assert fast_problems == pure_problems
    assert [p.where for p in fast_problems] == [f"{FILE}:34", f"{FILE}:36"]
    assert "duplicate key 'dup' (first given on line 33)" in fast_problems[0].message
    assert "must be an object (a mapping), not a list" in fast_problems[1].message
    copy = fast_docs[1].data["copy"]
    assert copy["app"] == "x" and copy["extra"][:4] == [1, 2.5, True, None] and copy["extra"][5:] == ["07", 31]
    for loader in (FAST_LOADER, PURE_LOADER):
        objects, problems = read_yaml_objects(
            FILE, MIXED.replace("dup: 1\ndup: 2\n", "").replace("- not a mapping\n", ""), "d", loader=loader
        )
        assert objects == []
        assert [(p.where, p.field) for p in problems] == [(f"{FILE}:31", "items[0].spec.ports[0].protocol")]


def test_document_markers_split_chunks_and_lines_follow_them() -> None:
    chunks = split_chunks("a: 1\n---\nb: 2\n--- # c\nc: 3\n---x: 1\n")
    assert chunks == [(0, "a: 1\n"), (1, "---\nb: 2\n"), (3, "--- # c\nc: 3\n---x: 1\n")]
    assert split_chunks("%YAML 1.1\n---\na: 1\n---\nb: 2\n") == [(0, "%YAML 1.1\n---\na: 1\n---\nb: 2\n")]


def test_an_edit_reparses_only_its_document_and_lines_move_with_the_text() -> None:
    docs = [service_entry(f"s{i}", f"s{i}.example.com", f"10.0.0.{i}") for i in range(5)]
    cache = ChunkCache()
    first, problems = read_yaml_objects(FILE, "---\n".join(docs), "d", cache=cache)
    assert not problems and len(first) == 5
    docs[1] = docs[1].replace("10.0.0.1", "10.0.9.1") + "  exportTo: ['.']\n"  # one line longer
    second, problems = read_yaml_objects(FILE, "---\n".join(docs), "d", cache=cache)
    assert not problems
    assert [a is b for a, b in zip(first, second, strict=True)] == [True, False, True, True, True]
    assert second[1].template.endpoints[0].address == "10.0.9.1"
    # The reused object below the edit is located at its new line.
    line = "---\n".join(docs).splitlines().index("  name: s3") + 1
    assert second[3].ref.where == f"{FILE}:{line}"
    third, problems = read_yaml_objects(FILE, "---\n".join([*docs[:2], "kind: [\n", *docs[3:]]), "d", cache=cache)
    assert third == [] and problems[0].where.startswith(f"{FILE}:")


def test_api_objects_are_located_by_namespace_name_and_field_path() -> None:
    data = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"hosts": ["api.example.com"], "ports": [{"number": 80, "name": "http", "protocol": "SMTP"}]},
    }
    obj, problems = read_object(data, ObjectLocator("ServiceEntry", "shop", "api"), "default")
    assert obj is None
    assert problems == [
        Problem("ServiceEntry shop/api", problems[0].message, "spec.ports[0].protocol"),
    ]
    assert "unsupported protocol 'SMTP'" in problems[0].message
    data["spec"]["ports"][0]["protocol"] = "HTTP"
    obj, problems = read_object(data, ObjectLocator("ServiceEntry", "shop", "api"), "default")
    assert not problems and obj is not None and obj.ref.where == "ServiceEntry shop/api"


def pod_json(name: str, ip: str, labels: dict[str, str], ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"serviceAccountName": "cart", "nodeName": "node-1"},
        "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def selector_entry() -> Any:
    data = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {
            "hosts": ["cart.example.com"],
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http"}],
            "workloadSelector": {"labels": {"app": "cart"}},
        },
    }
    obj, problems = read_object(data, ObjectLocator("ServiceEntry", "shop", "cart"), "default")
    assert obj is not None, problems
    return obj


def test_pods_are_workloads_for_a_workload_selector() -> None:
    pods = [Pod.from_json(pod_json(f"cart-{i}", f"10.1.0.{i}", {"app": "cart"}, ready=i != 2)) for i in (1, 2)]
    other = Pod.from_json(pod_json("web", "10.1.0.9", {"app": "web"}))
    assert Pod.from_json({"metadata": {"name": "pending"}, "status": {"phase": "Pending"}}) is None
    translation = Translation()
    translation.update("crds", [selector_entry()])
    translation.update("pods", [pod_workload(p) for p in (*pods, other) if p is not None])
    assert translation.build() == {Hostname("cart.example.com")}
    endpoints = translation.services[Hostname("cart.example.com")].endpoints
    assert [(e.address, e.health, e.node_name, e.target_ref) for e in endpoints] == [
        ("10.1.0.1", Health.HEALTHY, "node-1", "Pod/shop/cart-1"),
        ("10.1.0.2", Health.UNHEALTHY, "node-1", "Pod/shop/cart-2"),
    ]


def entries(text: str) -> list[Any]:
    objects, problems = read_yaml_objects(FILE, text, "default")
    assert not problems, problems
    return objects


def test_translation_rebuilds_only_what_changed_and_settles_hosts_across_namespaces() -> None:
    translation = Translation()
    a = entries(service_entry("a", "a.example.com", "10.0.0.1", namespace="one"))
    b = entries(service_entry("b", "b.example.com", "10.0.0.2", namespace="two"))
    translation.update("/f/1.yaml", a)
    translation.update("/f/2.yaml", b)
    assert translation.build() == {"a.example.com", "b.example.com"}
    kept = translation.services[Hostname("a.example.com")]

    # The same host declared later in another namespace: ignored and reported against the later file.
    clash = entries(service_entry("c", "a.example.com", "10.0.0.3", namespace="two"))
    translation.update("/f/2.yaml", b + clash)
    assert translation.build() == set()
    assert translation.services[Hostname("a.example.com")] is kept
    problems = translation.problems()
    assert list(problems) == ["/f/2.yaml"]
    assert "already declared in namespace one" in problems["/f/2.yaml"][0].message
    assert problems["/f/2.yaml"][0].field == "spec.hosts[0]"

    # The first declaration goes away: the other namespace's service takes the host, the problem clears.
    translation.remove("/f/1.yaml")
    assert translation.build() == {"a.example.com"}
    assert translation.services[Hostname("a.example.com")].namespace == "two"
    assert translation.problems() == {}

    # Nothing changed: nothing is rebuilt.
    translation.update("/f/2.yaml", b + clash)
    assert translation.build() == set()


@pytest.mark.parametrize("loader", [FAST_LOADER, PURE_LOADER], ids=["libyaml", "pure"])
def test_duplicate_object_and_merged_host_problems_point_at_their_lines(loader: Any) -> None:
    text = (
        service_entry("a", "a.example.com", "10.0.0.1")
        + "---\n"
        + service_entry("a", "x.example.com", "10.0.0.2")
        + "---\n"
        + service_entry("b", "a.example.com", "10.0.0.3").replace("STATIC", "DNS")
    )
    objects, problems = read_yaml_objects(FILE, text, "default", loader=loader)
    assert not problems
    translation = Translation()
    translation.update(FILE, objects)
    translation.build()
    found = sorted((p.where, p.field) for p in translation.problems()[FILE])
    assert found == [(f"{FILE}:17", "metadata.name"), (f"{FILE}:33", "spec.hosts[0]")]
    endpoints = translation.services[Hostname("a.example.com")].endpoints
    assert [e.address for e in endpoints] == ["10.0.0.1", "10.0.0.3"]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789.:abcdef%x \n", max_size=20) | st.ip_addresses().map(str))
def test_the_fast_ip_check_agrees_with_the_model(text: str) -> None:
    assert objects._is_ip(text) == is_ip(text)


def api_entry(port: dict[str, Any], labels: dict[str, Any], locality: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "api", "namespace": "shop", "labels": labels},
        "spec": {
            "hosts": ["api.example.com"],
            "resolution": "STATIC",
            "ports": [port],
            "endpoints": [{"address": "10.0.0.1", "labels": labels, "locality": locality}],
        },
    }


def test_values_found_valid_before_do_not_hide_problems_of_lookalikes_or_repeats() -> None:
    """Validation remembers valid ports, label maps and localities: a bad object read twice, or one that
    differs from a valid one only in a value's type, still gets all its problems every time."""
    locator = ObjectLocator("ServiceEntry", "shop", "api")
    good = api_entry({"number": 1, "name": "http"}, {"app": "api"}, "r1/z1")
    obj, problems = read_object(good, locator, "default")
    assert obj is not None and not problems
    cases = [
        (api_entry({"number": True, "name": "http"}, {"app": "api"}, "r1/z1"), "spec.ports[0].number"),
        (api_entry({"number": 1, "name": "http", "target_port": 8080}, {"app": "api"}, "r1/z1"), "spec.ports[0]"),
        (api_entry({"number": 1, "name": "http"}, {"app": "a" * 64}, "r1/z1"), "metadata.labels.app"),
        (api_entry({"number": 1, "name": "http"}, {"app": 1}, "r1/z1"), "metadata.labels.app"),
        (api_entry({"number": 1, "name": "http"}, {"app": "api"}, "r1//z1"), "spec.endpoints[0].locality"),
    ]
    for data, field in cases:
        for _ in range(2):
            obj, problems = read_object(data, locator, "default")
            assert obj is None
            assert any(p.field.startswith(field) for p in problems), (field, problems)
    obj, problems = read_object(good, locator, "default")
    assert obj is not None and not problems


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789abefnorstuxyENOTY.:+-_~=<!*&@ ", min_size=0, max_size=12))
def test_plain_scalars_resolve_as_pyyaml_resolves_them(scalar: str) -> None:
    import yaml

    text = f"key: {scalar}\nlist: [{scalar}]\n"
    for loader in (FAST_LOADER, PURE_LOADER):
        try:
            expected = yaml.load(text, Loader=loader)
        except yaml.YAMLError:
            continue
        docs, problems = parse_documents(FILE, text, loader)
        if problems:
            continue
        assert repr(docs[0].data) == repr(expected)


def test_reading_pauses_the_collector_and_leaves_it_as_it_was() -> None:
    import gc

    from adapters.istio.yamlread import collector_paused, read_documents

    seen: list[bool] = []

    def derive(documents: list[Any]) -> tuple[None, list[Problem]]:
        seen.append(gc.isenabled())
        return None, []

    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            read_documents(FILE, "a: 1\n---\nb: 2\n", derive=derive)
            assert gc.isenabled() is enabled
            with collector_paused():
                assert not gc.isenabled()
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [False, False, False, False]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abcXYZ019-.*_ \n", max_size=70))
def test_the_one_pattern_host_check_agrees_with_is_fqdn(name: str) -> None:
    from adapters.toolkit.names import is_fqdn

    if objects._SIMPLE_FQDN.fullmatch(name) is not None and len(name) <= 255:
        assert is_fqdn(name)
    rest = name[2:] if name.startswith("*.") else name
    valid = name != "*" and "*" not in rest and is_fqdn(rest)
    assert (objects._host_problem(name) is None) is valid


def test_derived_chunks_keep_no_raw_data_and_still_locate_their_lines() -> None:
    from adapters.istio.yamlread import read_documents

    docs = [service_entry(f"s{i}", f"s{i}.example.com", f"10.0.0.{i}") for i in range(3)]
    text = "---\n".join(docs)
    cache = ChunkCache()
    results, problems = read_documents(FILE, text, cache=cache, derive=lambda d: objects.read_objects(d, "shop"))
    assert not problems
    assert [documents for documents, _ in results] == [[], [], []]
    assert all(documents == [] for _, documents, _ in cache.chunks.values())
    found = [obj for _, objs in results for obj in objs]
    assert [o.ref.where for o in found] == [
        f"{FILE}:{i + 1}" for i, line in enumerate(text.splitlines()) if line.startswith("  name: s")
    ]


def test_a_checker_subclass_that_checks_more_is_not_answered_from_the_memos() -> None:
    class Strict(objects._Checker):
        def mapping(self, value: Any, path: Any, fields: Any = None) -> dict[str, Any] | None:
            found = super().mapping(value, path, fields)
            if found is not None and ("app" in found or "number" in found):
                self.fail(path, "checked more")
            return found

    locator = ObjectLocator("ServiceEntry", "shop", "api")
    good = api_entry({"number": 1, "name": "http"}, {"app": "api"}, "r1/z1")
    assert read_object(good, locator, "default")[0] is not None  # the memos now know this port and labels
    strict = Strict(good, locator)
    assert strict.object("default") is None
    fields = {p.field for p in strict.problems if p.message == "checked more"}
    assert {"metadata.labels", "spec.ports[0]", "spec.endpoints[0].labels"} <= fields
