"""Bad input never crashes the files adapter: arbitrary text and arbitrary ServiceEntry-shaped documents."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.istio import API_VERSIONS, PURE_LOADER, parse_documents, read_objects, translate

FILE = "/fuzz/entries.yaml"

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
addresses = st.sampled_from(["10.0.0.1", "::1", "a.example.com", "unix:///run/a.sock", "unix://rel", "", "*"])
names = st.sampled_from(["http", "grpc-api", "tcp", "Bad_Name", "", "x" * 70])


def field(options: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Mappings holding any subset of `options`, each with its plausible values or anything at all."""
    return st.fixed_dictionaries({}, optional={k: v | values for k, v in options.items()})


ports = field(
    {
        "number": st.integers(-1, 70000),
        "name": names,
        "protocol": st.sampled_from(["HTTP", "grpc", "TLS", "SMTP", ""]),
        "targetPort": st.integers(0, 70000),
    }
)
endpoints = field(
    {
        "address": addresses,
        "ports": st.dictionaries(names, st.integers(0, 70000), max_size=2),
        "labels": st.dictionaries(st.sampled_from(["app", "version", "-bad"]), st.text(max_size=5), max_size=2),
        "locality": st.sampled_from(["r/z/s", "r", "a/b/c/d", "r//s"]),
        "weight": st.integers(-1, 2**33),
        "network": st.text(max_size=5),
        "serviceAccount": st.text(max_size=5),
    }
)
spec = field(
    {
        "hosts": st.lists(st.sampled_from(["a.example.com", "*", "*.example.com", "A.Example.com.", "bad_host"])),
        "addresses": st.lists(st.sampled_from(["10.0.0.1", "10.0.0.0/8", "bad", "::/0"]), max_size=2),
        "ports": st.lists(ports, max_size=3),
        "location": st.sampled_from(["MESH_INTERNAL", "MESH_EXTERNAL", "x"]),
        "resolution": st.sampled_from(["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "y"]),
        "endpoints": st.lists(endpoints, max_size=3),
        "workloadSelector": field({"labels": st.dictionaries(st.sampled_from(["app", "*"]), st.text(max_size=3))}),
        "exportTo": st.lists(st.sampled_from([".", "*", "~", "shop", "Bad"]), max_size=3),
        "subjectAltNames": st.lists(st.text(max_size=5), max_size=2),
    }
)
objects = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from([*API_VERSIONS, "v1", "networking.istio.io/v9"]),
        "kind": st.sampled_from(["ServiceEntry", "WorkloadEntry", "Deployment"]),
        "metadata": field({"name": st.sampled_from(["a", "b", "Bad_Name"]), "namespace": st.sampled_from(["x", "y"])}),
    },
    optional={"spec": spec | endpoints | values},
)
documents = st.lists(objects, max_size=4).map(lambda docs: [{"apiVersion": "v1", "kind": "List", "items": docs}, *docs])


def run(text: str, *, compare: bool = False) -> None:
    docs, problems = parse_documents(FILE, text)
    objs, more = read_objects(docs, "default")
    _, between = translate((FILE, obj) for obj in objs)
    if compare:
        # Well-formed YAML: libyaml and pure-Python PyYAML read the same documents with the same problems.
        # (On malformed text the two parsers differ in what they accept and where they stop.)
        pure_docs, pure_problems = parse_documents(FILE, text, PURE_LOADER)
        assert [d.data for d in pure_docs] == [d.data for d in docs]
        assert pure_problems == problems
    for problem in [*problems, *more, *(p for ps in between.values() for p in ps)]:
        assert problem.where.startswith(f"{FILE}:"), problem
        assert problem.message


@settings(max_examples=300, deadline=None)
@given(documents)
def test_arbitrary_documents_never_raise(docs: list[dict[str, Any]]) -> None:
    run(yaml.safe_dump_all(docs), compare=True)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}&*!|>'\"#%@`,? \n\t0123456789")), max_size=80))
def test_arbitrary_text_never_raises(text: str) -> None:
    run(text)
