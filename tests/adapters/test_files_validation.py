"""Every validation rule of the files adapter has a failing example here.

Each case is a ServiceEntry `spec` (or a whole document) with one mistake. The
line holding the mistake is marked `# <-`; the reported problem must point at
that line of the file, name the field, and say what is wrong. An entry with a
problem is rejected as a whole: it contributes no service.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from adapters.files import FilesConfig, FilesRegistry
from adapters.files.registry import FileSet
from discoveryd.model import Problem
from discoveryd.registry import AdapterContext

HEADER = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: case
spec:
"""

# (id, spec, field, part of the message)
SPEC_CASES = [
    ("no-hosts", "hosts: []  # <-\nresolution: NONE", "spec.hosts", "at least one host is required"),
    ("hosts-missing", "resolution: NONE", "spec.hosts", "at least one host is required"),
    ("hosts-not-a-list", "hosts: a.example.com  # <-", "spec.hosts", "must be a list"),
    ("ports-not-a-list", "hosts: [a.example.com]\nports: true  # <-", "spec.ports", "must be a list"),
    ("star-alone", 'hosts: ["*"]  # <-', "spec.hosts[0]", "'*' alone is not allowed"),
    ("bad-host", "hosts: [bad_host.example.com]  # <-", "spec.hosts[0]", "invalid host 'bad_host.example.com'"),
    (
        "partial-wildcard",
        'hosts: ["*foo.example.com"]  # <-',
        "spec.hosts[0]",
        "wildcard must be the whole first label",
    ),
    ("duplicate-host", "hosts:\n- a.example.com\n- A.example.com  # <-", "spec.hosts[1]", "duplicate host"),
    (
        "endpoints-and-selector",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]\n"
        "workloadSelector:  # <-\n  labels: {app: a}",
        "spec.workloadSelector",
        "only one of workloadSelector or endpoints can be set",
    ),
    (
        "cidr-with-dns",
        "hosts: [a.example.com]\nresolution: DNS\naddresses:\n- 10.0.0.0/24  # <-",
        "spec.addresses[0]",
        "CIDR address '10.0.0.0/24' is allowed only with resolution NONE or STATIC, not DNS",
    ),
    ("bad-address", "hosts: [a.example.com]\naddresses: [10.0.0.300]  # <-", "spec.addresses[0]", "not an IP address"),
    (
        "duplicate-port-name",
        "hosts: [a.example.com]\nports:\n- {number: 80, name: http}\n- {number: 81, name: http}  # <-",
        "spec.ports[1].name",
        "port name 'http' is already used by ports[0]",
    ),
    (
        "duplicate-port-number",
        "hosts: [a.example.com]\nports:\n- {number: 80, name: http}\n- {number: 80, name: web}  # <-",
        "spec.ports[1].number",
        "port 80 is already defined by ports[0]",
    ),
    (
        "port-name-not-dns1123",
        "hosts: [a.example.com]\nports:\n- number: 80\n  name: http_web  # <-",
        "spec.ports[0].name",
        "invalid port name 'http_web': must be a DNS-1123 label",
    ),
    (
        "unknown-protocol",
        "hosts: [a.example.com]\nports:\n- number: 25\n  name: smtp\n  protocol: SMTP  # <-",
        "spec.ports[0].protocol",
        "unsupported protocol 'SMTP'",
    ),
    (
        "port-zero",
        "hosts: [a.example.com]\nports:\n- number: 0  # <-\n  name: http",
        "spec.ports[0].number",
        "must be between 1 and 65535, not 0",
    ),
    (
        "port-too-big",
        "hosts: [a.example.com]\nports:\n- number: 70000  # <-\n  name: http",
        "spec.ports[0].number",
        "must be between 1 and 65535, not 70000",
    ),
    (
        "port-not-a-number",
        "hosts: [a.example.com]\nports:\n- number: '80'  # <-\n  name: http",
        "spec.ports[0].number",
        "must be an integer, not a string ('80')",
    ),
    (
        "target-port-too-big",
        "hosts: [a.example.com]\nports:\n- number: 80\n  name: http\n  targetPort: 65536  # <-",
        "spec.ports[0].targetPort",
        "must be between 1 and 65535",
    ),
    (
        "port-number-missing",
        "hosts: [a.example.com]\nports:\n- name: http  # <-",
        "spec.ports[0]",
        "number is required",
    ),
    (
        "port-name-missing",
        "hosts: [a.example.com]\nports:\n- number: 80  # <-",
        "spec.ports[0]",
        "name is required",
    ),
    (
        "static-endpoint-hostname",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: db.example.com  # <-",
        "spec.endpoints[0].address",
        "'db.example.com' is not an IP address (resolution STATIC)",
    ),
    (
        "static-unix-relative",
        "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
        "endpoints:\n- address: unix://run/a.sock  # <-",
        "spec.endpoints[0].address",
        "a unix address needs an absolute path",
    ),
    (
        "unix-with-ports",
        "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
        "endpoints:\n- address: unix:///run/a.sock\n  ports: {http: 8080}  # <-",
        "spec.endpoints[0].ports",
        "must not have ports",
    ),
    (
        "unix-needs-one-port",
        "hosts: [a.example.com]\nresolution: STATIC\nports:  # <-\n- {number: 80, name: http}\n"
        "- {number: 81, name: http-alt}\nendpoints:\n- address: unix:///run/a.sock",
        "spec.ports",
        "unix endpoints need exactly 1 service port, not 2",
    ),
    (
        "dns-round-robin-two-endpoints",
        "hosts: [a.example.com]\nresolution: DNS_ROUND_ROBIN\nendpoints:  # <-\n"
        "- address: a1.example.com\n- address: a2.example.com",
        "spec.endpoints",
        "resolution DNS_ROUND_ROBIN allows at most 1 endpoint, not 2",
    ),
    (
        "dns-endpoint-not-fqdn",
        "hosts: [a.example.com]\nresolution: DNS\nendpoints:\n- address: not_a_name  # <-",
        "spec.endpoints[0].address",
        "'not_a_name' is not an IP address or a FQDN",
    ),
    (
        "dns-wildcard-without-endpoints",
        'hosts: ["*.example.com"]  # <-\nresolution: DNS',
        "spec.hosts[0]",
        "wildcard host '*.example.com' needs endpoints with resolution DNS",
    ),
    (
        "endpoint-port-not-declared",
        "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
        "endpoints:\n- address: 10.0.0.1\n  ports:\n    grpc: 9090  # <-",
        "spec.endpoints[0].ports.grpc",
        "port 'grpc' is not one of the ServiceEntry's ports (http)",
    ),
    (
        "endpoint-port-too-big",
        "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
        "endpoints:\n- address: 10.0.0.1\n  ports:\n    http: 100000  # <-",
        "spec.endpoints[0].ports.http",
        "must be between 1 and 65535",
    ),
    (
        "endpoints-with-resolution-none",
        "hosts: [a.example.com]\nresolution: NONE\nendpoints:  # <-\n- address: 10.0.0.1",
        "spec.endpoints",
        "endpoints are not allowed with resolution NONE",
    ),
    (
        "several-hosts-tcp",
        "hosts:  # <-\n- a.example.com\n- b.example.com\nresolution: DNS\n"
        "ports: [{number: 5432, name: tcp, protocol: TCP}]",
        "spec.hosts",
        "several hosts need HTTP or TLS ports with resolution DNS, but port 'tcp' is TCP",
    ),
    (
        "negative-weight",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  weight: -1  # <-",
        "spec.endpoints[0].weight",
        "must be between 0 and 4294967295, not -1",
    ),
    (
        "weight-not-a-number",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  weight: heavy  # <-",
        "spec.endpoints[0].weight",
        "must be an integer",
    ),
    (
        "locality-too-deep",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  locality: a/b/c/d  # <-",
        "spec.endpoints[0].locality",
        "must be region[/zone[/subzone]]",
    ),
    (
        "endpoint-address-missing",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- labels: {app: a}  # <-",
        "spec.endpoints[0]",
        "address is required",
    ),
    (
        "endpoint-null",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n-  # <-",
        "spec.endpoints[1]",
        "must not be null",
    ),
    (
        "label-value-invalid",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  labels:\n"
        "    app: 'has spaces'  # <-",
        "spec.endpoints[0].labels.app",
        "invalid label value 'has spaces'",
    ),
    (
        "label-value-not-a-string",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  labels:\n    version: 2  # <-",
        "spec.endpoints[0].labels.version",
        "must be a string, not a number (2) (quote it)",
    ),
    (
        "label-key-invalid",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints:\n- address: 10.0.0.1\n  labels:\n    -bad-: x  # <-",
        'spec.endpoints[0].labels["-bad-"]',
        "invalid label key '-bad-'",
    ),
    (
        "unknown-resolution",
        "hosts: [a.example.com]\nresolution: STATIK  # <-",
        "spec.resolution",
        "unknown value 'STATIK' (known: STATIC, DNS, DNS_ROUND_ROBIN, NONE)",
    ),
    (
        "unknown-location",
        "hosts: [a.example.com]\nlocation: INTERNAL  # <-",
        "spec.location",
        "unknown value 'INTERNAL' (known: MESH_INTERNAL, MESH_EXTERNAL)",
    ),
    (
        "unknown-field",
        "hosts: [a.example.com]\nresolution: STATIC\nendpoint:  # <-\n- address: 10.0.0.1",
        "spec.endpoint",
        "unknown field (did you mean 'endpoints'?)",
    ),
    (
        "unknown-port-field",
        "hosts: [a.example.com]\nports:\n- number: 80\n  name: http\n  target_port: 8080  # <-",
        "spec.ports[0].target_port",
        "unknown field (did you mean 'targetPort'?)",
    ),
    (
        "export-to-invalid",
        "hosts: [a.example.com]\nexportTo:\n- Not_A_Namespace  # <-",
        "spec.exportTo[0]",
        "must be '.', '*', '~' or a namespace name",
    ),
    (
        "export-to-star-and-more",
        'hosts: [a.example.com]\nexportTo:  # <-\n- "*"\n- shop',
        "spec.exportTo",
        "'*' (every namespace) cannot be combined",
    ),
    (
        "export-to-duplicate",
        'hosts: [a.example.com]\nexportTo:\n- "."\n- "."  # <-',
        "spec.exportTo[1]",
        "duplicate entry '.'",
    ),
    (
        "selector-wildcard",
        'hosts: [a.example.com]\nresolution: STATIC\nworkloadSelector:\n  labels:\n    app: "*"  # <-',
        "spec.workloadSelector.labels.app",
        "wildcards are not supported in a selector",
    ),
    (
        "subject-alt-name-not-a-string",
        "hosts: [a.example.com]\nsubjectAltNames:\n- 42  # <-",
        "spec.subjectAltNames[0]",
        "must be a string, not a number (42)",
    ),
    ("spec-not-a-mapping", None, "spec", "must be an object, not a list"),
]


def marked_line(text: str) -> int | None:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if "# <-" in line]
    return lines[0] if lines else None


def check(tmp_path: Path, text: str, name: str = "case.yaml") -> tuple[Path, list[Problem], int]:
    """Write `text`, run `check()`; also count the services it yields."""
    path = tmp_path / name
    path.write_text(text)
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=[str(tmp_path)]), AdapterContext(tmp_path))
    files = FileSet(reg.roots, "default")
    files.refresh()
    services, _ = files.result()
    return path, list(reg.check()), len(services)


@pytest.mark.parametrize(("spec", "field", "message"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_spec_rule(tmp_path: Path, spec: str | None, field: str, message: str) -> None:
    if spec is None:
        text = HEADER.replace("spec:\n", "spec:  # <-\n- hosts: [a.example.com]\n")
    else:
        text = HEADER + textwrap.indent(spec, "  ") + "\n"
    path, problems, services = check(tmp_path, text)
    matching = [p for p in problems if p.field == field]
    assert matching, f"no problem for {field}; got {[str(p) for p in problems]}"
    problem = matching[0]
    assert message in problem.message
    line = marked_line(text) or 5  # a missing field is reported at its parent, `spec:`
    assert problem.where == f"{path}:{line}"
    assert str(problem) == f"{path}:{line}: {field}: {problem.message}"
    assert services == 0, "an entry with a problem must be rejected as a whole"


DOCUMENT_CASES = [
    (
        "unknown-api-version",
        "apiVersion: networking.istio.io/v2  # <-\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {hosts: [a.b]}",
        "apiVersion",
        "unsupported apiVersion 'networking.istio.io/v2' for ServiceEntry",
    ),
    (
        "misspelt-kind",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntri  # <-\nmetadata: {name: a}\nspec: {hosts: [a.b]}",
        "kind",
        "unknown kind 'ServiceEntri' in networking.istio.io (did you mean 'ServiceEntry'?)",
    ),
    (
        "missing-api-version",
        "kind: ServiceEntry  # <-\nmetadata: {name: a}\nspec: {hosts: [a.b]}",
        "kind",
        "missing apiVersion",
    ),
    (
        "missing-kind",
        "apiVersion: networking.istio.io/v1  # <-\nmetadata: {name: a}\nspec: {hosts: [a.b]}",
        "",
        "missing kind",
    ),
    (
        "missing-name",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:  # <-\n  namespace: shop\n"
        "spec: {hosts: [a.b]}",
        "metadata",
        "name is required",
    ),
    (
        "invalid-name",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: Cart_1  # <-\nspec: {hosts: [a.b]}",
        "metadata.name",
        "invalid name 'Cart_1'",
    ),
    (
        "invalid-namespace",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: a\n  namespace: Shop  # <-\n"
        "spec: {hosts: [a.b]}",
        "metadata.namespace",
        "invalid namespace 'Shop'",
    ),
    (
        "unknown-top-level-field",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspecs: {}  # <-",
        "specs",
        "unknown field (did you mean 'spec'?)",
    ),
    (
        "workload-entry-without-address",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec:  # <-\n"
        "  labels: {app: a}",
        "spec",
        "address is required",
    ),
    (
        "workload-entry-bad-address",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec:\n"
        "  address: 10.0.0.1:8080  # <-",
        "spec.address",
        "'10.0.0.1:8080' is not an IP address or a FQDN",
    ),
    (
        "workload-entry-bad-port-name",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec:\n"
        "  address: 10.0.0.1\n  ports:\n    grpc_api: 9090  # <-",
        "spec.ports.grpc_api",
        "invalid port name 'grpc_api'",
    ),
    (
        "list-item-problem",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n"
        "  metadata: {name: a}\n  spec:\n    hosts: ['*']  # <-",
        "items[0].spec.hosts[0]",
        "'*' alone is not allowed",
    ),
    (
        "duplicate-key",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {hosts: [a.b]}\n"
        "spec: {hosts: [c.d]}  # <-",
        "",
        "duplicate key 'spec' (first given on line 4)",
    ),
    ("not-a-mapping", "- just  # <-\n- a list", "", "a document must be an object (a mapping), not a list"),
]


@pytest.mark.parametrize(
    ("text", "field", "message"), [c[1:] for c in DOCUMENT_CASES], ids=[c[0] for c in DOCUMENT_CASES]
)
def test_document_rule(tmp_path: Path, text: str, field: str, message: str) -> None:
    path, problems, services = check(tmp_path, text + "\n")
    matching = [p for p in problems if p.field == field and message in p.message]
    assert matching, f"no problem {field!r}: {message!r}; got {[str(p) for p in problems]}"
    assert matching[0].where == f"{path}:{marked_line(text)}"
    assert services == 0


def test_yaml_syntax_error_points_near_the_mistake(tmp_path: Path) -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: a\n  labels: {a: b\nspec: {}\n"
    path, problems, _ = check(tmp_path, text)
    [problem] = problems
    assert problem.where in (f"{path}:5", f"{path}:6")
    assert problem.message.startswith("invalid YAML")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: \xff}\n")
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=[str(tmp_path)]), AdapterContext(tmp_path))
    assert [str(p) for p in reg.check()] == [f"{path}:3: not UTF-8 text"]


def test_unreadable_file_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapters.files.registry as registry_module

    path = tmp_path / "secret.yaml"
    path.write_text(HEADER + "  hosts: [a.example.com]\n")
    real_open = registry_module.os.open

    def deny(p: str, flags: int, *args: int) -> int:
        if p == str(path):
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, flags, *args)

    monkeypatch.setattr(registry_module.os, "open", deny)
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=[str(tmp_path)]), AdapterContext(tmp_path))
    assert [str(p) for p in reg.check()] == [f"{path}: cannot read: Permission denied"]


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=[str(tmp_path)]), AdapterContext(tmp_path))
    assert [str(p) for p in reg.check()] == [f"{path}: not a regular file"]


def test_missing_path_is_a_problem(tmp_path: Path) -> None:
    reg = FilesRegistry(FilesConfig(kind="files", name="t", paths=["nowhere/"]), AdapterContext(tmp_path))
    [problem] = reg.check()
    assert problem.where == str(tmp_path / "nowhere")
    assert "does not exist" in problem.message


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"paths": []}, "at least 1 item"),
        ({"paths": ["  "]}, "paths[0] is empty"),
        ({"paths": ["a"], "namespace": "Bad_NS"}, "not a namespace name"),
        ({"paths": ["a"], "debounce": "1s"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(raw: dict[str, object], error: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error.replace("[", r"\[").replace("]", r"\]")):
        FilesConfig.model_validate({"kind": "files", "name": "t", **raw})


def test_problems_of_a_file_come_in_line_order(tmp_path: Path) -> None:
    text = HEADER + '  ports: [{number: 0, name: http}]\n  hosts: ["*"]\n  resolution: STATIK\n'
    path, problems, _ = check(tmp_path, text)
    assert [(p.where, p.field) for p in problems] == [
        (f"{path}:6", "spec.ports[0].number"),
        (f"{path}:7", "spec.hosts[0]"),
        (f"{path}:8", "spec.resolution"),
    ]
