"""Istio objects (ServiceEntry, WorkloadEntry, Pods as workloads) → validated values, with Istio's rules.

Entry points:
- `read_object(data, locator, default_namespace)`: one object's plain data
  (a YAML document, or a Kubernetes API object decoded from JSON) →
  `ServiceEntry` / `WorkloadEntry`, or `Problem`s located by `locator`
  (`file:line` and `spec.ports[1].name` for files; `ServiceEntry ns/name`
  and the field path for API objects). Objects of other kinds return
  (None, []): other kinds may share a directory or a list.
- `read_objects(documents, default_namespace)`: the same for every document
  of a file (`yamlread.Document`).
- `Pod` / `pod_workload(pod)`: a Kubernetes Pod (filled from its JSON) as a
  workload that a ServiceEntry's `workloadSelector` can select, the way
  Istio selects Pods and WorkloadEntries alike.

The rules are Istio's (`ValidateServiceEntry`, `validateWorkloadEntry`,
`validateExportTo`), plus what the Kubernetes API server would reject before
Istio saw the object: unknown fields, wrong types, invalid names and labels.
Istio's warnings are not reported.

A ServiceEntry becomes one model `Service` template (every attribute but the
hostname, with its inline endpoints); `translate` makes one `Service` per host
and resolves `workloadSelector` against the workloads of the namespace.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from adapters.istio.locate import FieldPath, Locator, ObjectLocator
from adapters.istio.yamlread import FAST_LOADER, ChunkCache, Document, LoaderClass, read_documents
from adapters.toolkit.names import is_dns1123_label, is_dns1123_subdomain, is_dns_label, is_fqdn
from discoveryd.model import (
    NO_LOCALITY,
    Endpoint,
    Health,
    Hostname,
    Locality,
    Location,
    Port,
    PortProtocol,
    Problem,
    Resolution,
    Service,
    hostname,
    is_ip,
    parse_protocol,
    protocol_from_port_name,
)

API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
SERVICE_ENTRY = "ServiceEntry"
WORKLOAD_ENTRY = "WorkloadEntry"
UNIX_PREFIX = "unix://"
_MAX_UINT32 = 2**32 - 1

# Istio accepts upper case in host labels and port names (matching is case-insensitive).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_ISTIO_NETWORKING_KINDS = (
    "DestinationRule",
    "EnvoyFilter",
    "Gateway",
    "ProxyConfig",
    "ServiceEntry",
    "Sidecar",
    "VirtualService",
    "WorkloadEntry",
    "WorkloadGroup",
)
"""Kinds of Istio's networking API group: skipped quietly; any other kind in that group is a typo."""
_OBJECT_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_SE_FIELDS = (
    "hosts",
    "addresses",
    "ports",
    "location",
    "resolution",
    "endpoints",
    "workloadSelector",
    "exportTo",
    "subjectAltNames",
)
_PORT_FIELDS = ("number", "protocol", "name", "targetPort")
_WE_FIELDS = ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount")
_SELECTOR_FIELDS = ("labels",)
_HTTP = frozenset({PortProtocol.HTTP, PortProtocol.HTTP2, PortProtocol.GRPC, PortProtocol.GRPC_WEB})
_TLS = frozenset({PortProtocol.HTTPS, PortProtocol.TLS})


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Which object, and where it is declared (for messages about it)."""

    kind: str
    namespace: str
    name: str
    locator: Locator = field(compare=False, repr=False)

    @property
    def where(self) -> str:
        """Where `metadata.name` is declared (computed on demand: a file may have to be composed)."""
        return self.locator.where(("metadata", "name"))

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} ({self.where})"


@dataclass(frozen=True, slots=True)
class Host:
    name: Hostname
    path: FieldPath
    """The field path of this host in its ServiceEntry (`("spec", "hosts", 0)`)."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    ref: ObjectRef
    hosts: tuple[Host, ...]
    template: Service
    """All attributes but `hostname`; `endpoints` are the inline ones."""
    selector: Mapping[str, str] | None
    """`workloadSelector.labels`; None when the entry has no selector."""


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """A workload a `workloadSelector` can select: a WorkloadEntry, or a Pod (`ref.kind == "Pod"`)."""

    ref: ObjectRef
    endpoint: Endpoint
    """The workload as an endpoint; `labels` are what selectors match."""


Workload = WorkloadEntry
Object = ServiceEntry | WorkloadEntry

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class _PortDecl:
    port: Port
    declared: PortProtocol | None
    """The protocol as written; None when unset (then `port.protocol` comes from the name)."""


def read_object(
    data: Mapping[str, Any], locator: Locator, default_namespace: str
) -> tuple[Object | None, list[Problem]]:
    """One object's data → a ServiceEntry or WorkloadEntry, or the problems found in it.

    Other kinds give (None, []) — or a problem for an unknown kind of Istio's
    networking group (a typo). Never raises for bad input.
    """
    check = _Checker(data, locator)
    obj = check.object(default_namespace)
    if check.problems:
        return None, check.problems
    return obj, []


def read_objects(documents: Sequence[Document], default_namespace: str) -> tuple[list[Object], list[Problem]]:
    """The ServiceEntries and WorkloadEntries among `documents`, and the problems found in them."""
    objects: list[Object] = []
    problems: list[Problem] = []
    for doc in documents:
        obj, found = read_object(doc.data, doc.locator, default_namespace)
        problems.extend(found)
        if obj is not None:
            objects.append(obj)
    return objects, problems


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class _Checker:
    """Reads one document, collecting problems against its field paths."""

    def __init__(self, data: Mapping[str, Any], locator: Locator) -> None:
        self.data = data
        self.locator = locator
        self.problems: list[Problem] = []

    def fail(self, path: FieldPath, message: str) -> None:
        self.problems.append(self.locator.problem(path, message))

    # -- typed access -------------------------------------------------------------------

    def _typed(self, value: Any, path: FieldPath, check: Callable[[Any], bool], what: str) -> Any:
        if value is None or check(value):
            return value
        self.fail(path, f"must be {what}, not {_describe(value)}")
        return None

    def mapping(self, value: Any, path: FieldPath, fields: Sequence[str] | None = None) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, not {_describe(value)}")
            return None
        if fields is not None:
            for key in value:
                if key not in fields:
                    self.unknown(path, key, fields)
        return value

    def unknown(self, path: FieldPath, key: Any, fields: Sequence[str]) -> None:
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
        self.fail((*path, str(key)), f"unknown field{hint}")

    def string(self, value: Any, path: FieldPath) -> str | None:
        if value is None or isinstance(value, str):
            return value
        self.fail(path, f"must be a string, not {_describe(value)}")
        return None

    def integer(self, value: Any, path: FieldPath, low: int, high: int) -> int | None:
        if value is None:
            return None
        if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
            self.fail(path, f"must be an integer, not {_describe(value)}")
            return None
        if not low <= value <= high:
            self.fail(path, f"must be between {low} and {high}, not {value}")
            return None
        return value

    def port_number(self, value: Any, path: FieldPath) -> int | None:
        return self.integer(value, path, 1, 65535)

    def items(self, value: Any, path: FieldPath, read: Callable[[Any, FieldPath], T | None]) -> list[T]:
        """Each element of a list, read with `read`; elements that fail are left out."""
        if value is not None and not isinstance(value, list):
            self.fail(path, f"must be a list, not {_describe(value)}")
            return []
        found = value
        out: list[T] = []
        for i, item in enumerate(found or ()):
            got = read(item, (*path, i))
            if got is not None:
                out.append(got)
            elif item is None:
                self.fail((*path, i), "must not be null")
        return out

    def string_map(self, value: Any, path: FieldPath) -> dict[str, str]:
        found = self.mapping(value, path) or {}
        out: dict[str, str] = {}
        for k, v in found.items():
            if not isinstance(k, str):
                self.fail(path, f"key {k!r} must be a string")
            elif not isinstance(v, str):
                self.fail((*path, k), f"must be a string, not {_describe(v)} (quote it)")
            else:
                out[k] = v
        return out

    def labels(self, value: Any, path: FieldPath) -> dict[str, str]:
        """Kubernetes labels: qualified-name keys, short values."""
        key = _scalar_items(value) if type(self) is _Checker else None  # a subclass may check more
        if key is not None and key in _VALID_LABEL_MAPS:
            return dict(value)
        errors = len(self.problems)
        found = self._labels(value, path)
        if key is not None and len(self.problems) == errors and len(_VALID_LABEL_MAPS) < _MEMO_MAX:
            _VALID_LABEL_MAPS.add(key)
        return found

    def _labels(self, value: Any, path: FieldPath) -> dict[str, str]:
        found = self.string_map(value, path)
        for k, v in found.items():
            if k not in _VALID_LABEL_KEYS:
                problem = _label_key_problem(k)
                if problem:
                    self.fail((*path, k), problem)
                elif len(_VALID_LABEL_KEYS) < _MEMO_MAX:
                    _VALID_LABEL_KEYS.add(k)
            if len(v) > 63 or not _LABEL_VALUE.match(v):
                self.fail((*path, k), f"invalid label value {v!r}: at most 63 letters, digits, '-', '_' or '.'")
        return found

    # -- objects --------------------------------------------------------------------------

    def object(self, default_namespace: str) -> Object | None:
        data = self.data
        kind = data.get("kind")
        if kind is None:
            self.fail((), "missing kind: not a Kubernetes object")
            return None
        if not isinstance(kind, str):
            self.fail(("kind",), f"must be a string, not {_describe(kind)}")
            return None
        if kind not in (SERVICE_ENTRY, WORKLOAD_ENTRY):
            group = str(data.get("apiVersion", "")).partition("/")[0]
            if group == "networking.istio.io" and kind not in _ISTIO_NETWORKING_KINDS:
                close = difflib.get_close_matches(kind, _ISTIO_NETWORKING_KINDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(("kind",), f"unknown kind {kind!r} in networking.istio.io{hint}")
            return None  # other kinds may share the directory
        api_version = data.get("apiVersion")
        if api_version not in API_VERSIONS:
            if api_version is None:
                self.fail(("kind",), f"missing apiVersion (expected one of {', '.join(API_VERSIONS)})")
            else:
                self.fail(("apiVersion",), f"unsupported apiVersion {api_version!r} for {kind}")
            return None
        self.mapping(data, (), _OBJECT_FIELDS)
        ref, labels = self.metadata(kind, default_namespace)
        spec = self.mapping(data.get("spec"), ("spec",)) or {}
        if ref is None:
            return None
        if kind == SERVICE_ENTRY:
            return self.service_entry(ref, labels, spec)
        return self.workload_entry(ref, spec)

    def metadata(self, kind: str, default_namespace: str) -> tuple[ObjectRef | None, dict[str, str]]:
        path: FieldPath = ("metadata",)
        meta = self.mapping(self.data.get("metadata"), path) or {}
        name = self.string(meta.get("name"), (*path, "name"))
        namespace = self.string(meta.get("namespace"), (*path, "namespace"))
        labels = self.labels(meta.get("labels"), (*path, "labels"))
        if not name:
            self.fail(path, "metadata.name is required")
            return None, labels
        if not is_dns1123_subdomain(name):
            self.fail((*path, "name"), f"invalid name {name!r}: lower-case letters, digits, '-' and '.'")
        if namespace is not None and not is_dns1123_label(namespace):
            self.fail((*path, "namespace"), f"invalid namespace {namespace!r}: lower-case letters, digits and '-'")
        ref = ObjectRef(
            kind=kind,
            namespace=namespace or default_namespace,
            name=name,
            locator=self.locator,
        )
        return ref, labels

    def service_entry(self, ref: ObjectRef, labels: dict[str, str], spec: dict[str, Any]) -> ServiceEntry | None:
        sp: FieldPath = ("spec",)
        self.mapping(spec, sp, _SE_FIELDS)
        resolution = self.enum(spec.get("resolution"), (*sp, "resolution"), Resolution, Resolution.NONE)
        location = self.enum(spec.get("location"), (*sp, "location"), Location, Location.MESH_EXTERNAL)
        hosts = self.hosts(spec.get("hosts"), (*sp, "hosts"))
        addresses = self.addresses(spec.get("addresses"), (*sp, "addresses"), resolution)
        ports = self.ports(spec.get("ports"), (*sp, "ports"))
        # Names of every declared port, valid or not, so that a bad port is reported once, not again per endpoint.
        raw_ports = spec.get("ports")
        declared = raw_ports if isinstance(raw_ports, list) else ()
        port_names = {p["name"] for p in declared if isinstance(p, dict) and isinstance(p.get("name"), str)}
        raw_endpoints = spec.get("endpoints")
        endpoint_count = len(raw_endpoints) if isinstance(raw_endpoints, list) else 0

        selector: dict[str, str] | None = None
        if spec.get("workloadSelector") is not None:
            selector = self.selector(spec["workloadSelector"], (*sp, "workloadSelector"))
            if endpoint_count:
                self.fail((*sp, "workloadSelector"), "only one of workloadSelector or endpoints can be set")
        dns = resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
        endpoints = self.items(
            raw_endpoints, (*sp, "endpoints"), lambda v, p: self.endpoint(v, p, port_names, allow_fqdn=dns)
        )
        self.resolution_rules(raw_endpoints if isinstance(raw_endpoints, list) else [], hosts, ports, resolution)
        export_to = self.export_to(spec.get("exportTo"), (*sp, "exportTo"))
        sans = self.items(spec.get("subjectAltNames"), (*sp, "subjectAltNames"), self.string)

        if self.problems:
            return None
        template = Service(
            hostname=Hostname(""),
            namespace=ref.namespace,
            ports=tuple(decl.port for decl in ports),
            addresses=tuple(addresses),
            resolution=resolution,
            location=location,
            labels=labels,
            endpoints=tuple(endpoints),
            name=ref.name,
            export_to=tuple(export_to),
            subject_alt_names=tuple(sans),
        )
        return ServiceEntry(ref=ref, hosts=tuple(hosts), template=template, selector=selector)

    def workload_entry(self, ref: ObjectRef, spec: dict[str, Any]) -> WorkloadEntry | None:
        endpoint = self.endpoint(spec, ("spec",), None, allow_fqdn=True)
        if endpoint is None or self.problems:
            return None
        return WorkloadEntry(ref=ref, endpoint=endpoint)

    # -- ServiceEntry fields ------------------------------------------------------------------

    def enum(self, value: Any, path: FieldPath, enum: type[E], default: E) -> E:
        if value is None:
            return default
        members = _ENUM_MEMBERS.get(enum)
        if members is None:
            members = _ENUM_MEMBERS[enum] = {m.value: m for m in enum}
        if isinstance(value, str):
            found = members.get(value)
            if found is not None:
                return found  # type: ignore[return-value]
        self.fail(path, f"unknown value {value!r} (known: {', '.join(members)})")
        return default

    def hosts(self, value: Any, path: FieldPath) -> list[Host]:
        if value is None or value == []:
            self.fail(path, "at least one host is required")
        names = self.items(value, path, self.string)
        out: list[Host] = []
        seen: set[Hostname] = set()
        for i, name in enumerate(names):
            problem = _host_problem(name)
            if problem:
                self.fail((*path, i), problem)
                continue
            host = hostname(name)
            if host in seen:
                self.fail((*path, i), f"duplicate host {name!r}")
                continue
            seen.add(host)
            out.append(Host(host, (*path, i)))
        return out

    def addresses(self, value: Any, path: FieldPath, resolution: Resolution) -> list[str]:
        out: list[str] = []
        for i, address in enumerate(self.items(value, path, self.string)):
            address = address.strip()
            try:
                if "/" in address:
                    ipaddress.ip_network(address, strict=False)
                    if resolution not in (Resolution.NONE, Resolution.STATIC):
                        self.fail(
                            (*path, i),
                            f"CIDR address {address!r} is allowed only with resolution NONE or STATIC, "
                            f"not {resolution.value}",
                        )
                elif not _is_ip(address):
                    raise ValueError(address)
            except ValueError:
                self.fail((*path, i), f"{address!r} is not an IP address or CIDR block")
                continue
            out.append(address)
        return out

    def ports(self, value: Any, path: FieldPath) -> list[_PortDecl]:
        ports = self.items(value, path, self.port)
        names: dict[str, int] = {}
        numbers: dict[int, int] = {}
        for i, raw in enumerate(value if isinstance(value, list) else ()):
            if not isinstance(raw, dict):
                continue
            name, number = raw.get("name"), raw.get("number")
            if isinstance(name, str):
                if name in names:
                    self.fail((*path, i, "name"), f"port name {name!r} is already used by ports[{names[name]}]")
                names.setdefault(name, i)
            if isinstance(number, int):
                if number in numbers:
                    self.fail((*path, i, "number"), f"port {number} is already defined by ports[{numbers[number]}]")
                numbers.setdefault(number, i)
        return ports

    def required(
        self, found: dict[str, Any], key: str, path: FieldPath, read: Callable[[Any, FieldPath], T | None]
    ) -> T | None:
        if found.get(key) is None:
            self.fail((*path, key) if key in found else path, f"{key} is required")
            return None
        return read(found[key], (*path, key))

    def port(self, value: Any, path: FieldPath) -> _PortDecl | None:
        key = _scalar_items(value) if type(self) is _Checker else None  # a subclass may check more
        if key is not None:
            known = _VALID_PORTS.get(key)
            if known is not None:  # the same declaration was valid before: it is again (paths aside)
                return known
        errors = len(self.problems)
        decl = self._port(value, path)
        if decl is not None and key is not None and len(self.problems) == errors and len(_VALID_PORTS) < _MEMO_MAX:
            _VALID_PORTS[key] = decl
        return decl

    def _port(self, value: Any, path: FieldPath) -> _PortDecl | None:
        port = self.mapping(value, path, _PORT_FIELDS)
        if port is None:
            return None
        errors = len(self.problems)
        number = self.required(port, "number", path, self.port_number)
        name = self.required(port, "name", path, self.string)
        if name is not None and not is_dns_label(name, upper=True):
            self.fail((*path, "name"), f"invalid port name {name!r}: must be a DNS-1123 label")
        target = self.port_number(port.get("targetPort"), (*path, "targetPort"))
        declared = self.string(port.get("protocol"), (*path, "protocol"))
        protocol: PortProtocol | None = None
        if declared:
            protocol = parse_protocol(declared)
            if protocol is None:
                known = ", ".join(p.value for p in PortProtocol)
                self.fail((*path, "protocol"), f"unsupported protocol {declared!r} (known: {known})")
        if len(self.problems) > errors or number is None or name is None:
            return None
        # Unset protocol: Istio sniffs; without a proxy to sniff, the port name decides (`grpc-api` → GRPC).
        effective = protocol or protocol_from_port_name(name)
        return _PortDecl(Port(number=number, name=name, protocol=effective, target_port=target), protocol)

    def selector(self, value: Any, path: FieldPath) -> dict[str, str] | None:
        found = self.mapping(value, path, _SELECTOR_FIELDS)
        if found is None:
            return None
        labels = self.string_map(found.get("labels"), (*path, "labels"))
        for k, v in labels.items():
            if not k:
                self.fail((*path, "labels"), "an empty label key is not supported in a selector")
            if "*" in k or "*" in v:
                self.fail((*path, "labels", k), "wildcards are not supported in a selector")
        return labels

    def resolution_rules(
        self, endpoints: list[Any], hosts: list[Host], ports: list[_PortDecl], resolution: Resolution
    ) -> None:
        sp: FieldPath = ("spec",)
        if resolution is Resolution.NONE and endpoints:
            self.fail((*sp, "endpoints"), "endpoints are not allowed with resolution NONE")
        if resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
            if not endpoints:
                for i, host in enumerate(hosts):
                    if host.name.startswith("*"):
                        self.fail(
                            (*sp, "hosts", i),
                            f"wildcard host {host.name!r} needs endpoints with resolution {resolution.value} "
                            "(without endpoints each host is resolved itself, so it must be a FQDN)",
                        )
            if resolution is Resolution.DNS_ROUND_ROBIN and len(endpoints) > 1:
                self.fail(
                    (*sp, "endpoints"), f"resolution DNS_ROUND_ROBIN allows at most 1 endpoint, not {len(endpoints)}"
                )
        if resolution is Resolution.STATIC:
            unix = any(isinstance(ep, dict) and str(ep.get("address", "")).startswith(UNIX_PREFIX) for ep in endpoints)
            if unix and len(ports) != 1:
                self.fail((*sp, "ports"), f"unix endpoints need exactly 1 service port, not {len(ports)}")
        if resolution is not Resolution.NONE and len(hosts) > 1:
            # A proxy tells hosts apart by Host header (HTTP) or SNI (TLS); on plain TCP it cannot.
            for decl in ports:
                if decl.declared not in _HTTP | _TLS:
                    shown = decl.declared.value if decl.declared else "of unset protocol"
                    self.fail(
                        (*sp, "hosts"),
                        f"several hosts need HTTP or TLS ports with resolution {resolution.value}, "
                        f"but port {decl.port.name!r} is {shown}",
                    )
                    break

    def export_to(self, value: Any, path: FieldPath) -> list[str]:
        entries = self.items(value, path, self.string)
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if entry in seen:
                self.fail((*path, i), f"duplicate entry {entry!r}")
            seen.add(entry)
            if entry not in (".", "*", "~") and not is_dns1123_label(entry):
                self.fail((*path, i), f"{entry!r} must be '.', '*', '~' or a namespace name")
        if len(entries) > 1 and "*" in seen:
            self.fail(path, "'*' (every namespace) cannot be combined with other entries")
        if len(entries) > 1 and "~" in seen:
            self.fail(path, "'~' (no namespace) cannot be combined with other entries")
        return entries

    # -- endpoints and WorkloadEntries ----------------------------------------------------------

    def endpoint(
        self, value: Any, path: FieldPath, service_ports: set[str] | None, *, allow_fqdn: bool
    ) -> Endpoint | None:
        """An inline endpoint (`service_ports` set) or a WorkloadEntry spec (`service_ports` None)."""
        ep = self.mapping(value, path, _WE_FIELDS)
        if ep is None:
            return None
        errors = len(self.problems)
        address = self.string(ep.get("address"), (*path, "address"))
        if not address:
            if ep.get("address") in (None, ""):
                self.fail((*path, "address") if "address" in ep else path, "address is required")
        elif address.startswith(UNIX_PREFIX):
            socket_path = address[len(UNIX_PREFIX) :]
            if not socket_path.startswith("@") and (not posixpath.isabs(socket_path) or socket_path.endswith("/")):
                self.fail((*path, "address"), f"{address!r}: a unix address needs an absolute path to a socket")
            if ep.get("ports"):
                self.fail((*path, "ports"), f"unix endpoint {address} must not have ports")
        elif not _is_ip(address):
            if not allow_fqdn:
                self.fail((*path, "address"), f"{address!r} is not an IP address (resolution STATIC)")
            elif not is_fqdn(address):
                self.fail((*path, "address"), f"{address!r} is not an IP address or a FQDN")

        ports: dict[str, int] = {}
        for name, number in (self.mapping(ep.get("ports"), (*path, "ports")) or {}).items():
            ppath = (*path, "ports", str(name))
            if not isinstance(name, str) or not is_dns_label(name, upper=True):
                self.fail(ppath, f"invalid port name {name!r}: must be a DNS-1123 label")
                continue
            if service_ports is not None and name not in service_ports:
                known = ", ".join(sorted(service_ports)) or "none"
                self.fail(ppath, f"port {name!r} is not one of the ServiceEntry's ports ({known})")
            got = self.port_number(number, ppath)
            if got is not None:
                ports[name] = got

        labels = self.labels(ep.get("labels"), (*path, "labels"))
        network = self.string(ep.get("network"), (*path, "network")) or ""
        service_account = self.string(ep.get("serviceAccount"), (*path, "serviceAccount")) or ""
        locality = self.locality(ep.get("locality"), (*path, "locality"))
        weight = self.integer(ep.get("weight"), (*path, "weight"), 0, _MAX_UINT32)
        if len(self.problems) > errors or not address:
            return None
        return Endpoint(
            address=address,
            ports=ports,
            labels=labels,
            locality=locality,
            weight=weight or 1,  # 0 means unset: every endpoint weighs the same
            network=network,
            service_account=service_account,
        )

    def locality(self, value: Any, path: FieldPath) -> Locality:
        found = self.string(value, path)
        if not found:
            return Locality()
        known = _LOCALITIES.get(found)
        if known is not None:
            return known
        parts = found.split("/")
        if len(parts) > 3 or any(not p for p in parts):
            self.fail(path, f"locality {found!r} must be region[/zone[/subzone]] without empty parts")
            return Locality()
        parts += [""] * (3 - len(parts))
        locality = Locality(region=parts[0], zone=parts[1], subzone=parts[2])
        if len(_LOCALITIES) < _MEMO_MAX:
            _LOCALITIES[found] = locality
        return locality


_MEMO_MAX = 4096
"""Entries at most in each memo of validated values (shared by threads: a lost race computes a value twice)."""
_ENUM_MEMBERS: dict[type[StrEnum], dict[str, StrEnum]] = {}
_VALID_LABEL_KEYS: set[str] = set()
_VALID_LABEL_MAPS: set[tuple[tuple[Any, type, Any], ...]] = set()
_VALID_PORTS: dict[tuple[tuple[Any, type, Any], ...], _PortDecl] = {}
_LOCALITIES: dict[str, Locality] = {}
_SIMPLE_LABEL = r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_SIMPLE_FQDN = re.compile(rf"(?:{_SIMPLE_LABEL}\.)*{_SIMPLE_LABEL}")
"""Labels of 1-63 letters, digits and inner `-`, without a trailing dot: a subset of what `is_fqdn` accepts."""

_IPV4 = re.compile(
    r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"
)


def _is_ip(address: str) -> bool:
    """`model.is_ip`, with dotted-quad IPv4 (the common case) checked by a pattern of the same rules."""
    return _IPV4.fullmatch(address) is not None or (":" in address and is_ip(address))


def _scalar_items(value: Any) -> tuple[tuple[Any, type, Any], ...] | None:
    """A mapping of strings and integers as a memo key (types kept: `True == 1`), or None for anything else.

    Validation of such a mapping depends on its content alone (its path only
    goes into messages), so a mapping found valid once is valid again. Only
    `_Checker` itself uses the memos: a subclass (policy's) may check more.
    """
    if type(value) is not dict:
        return None
    key = tuple([(k, type(v), v) for k, v in value.items()])
    for k, kind, _ in key:
        if (kind is not str and kind is not int) or type(k) is not str:
            return None
    return key


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return type(value).__name__


def _host_problem(name: str) -> str | None:
    """Istio's rules for a ServiceEntry host: not `*` alone; a wildcard only as the whole first label."""
    if name == "*":
        return "'*' alone is not allowed: a ServiceEntry cannot match every host"
    rest = name[2:] if name.startswith("*.") else name
    if len(rest) <= 255 and _SIMPLE_FQDN.fullmatch(rest) is not None:
        return None  # what is_fqdn accepts, in one match
    if "*" in rest:
        return f"invalid host {name!r}: a wildcard must be the whole first label, as in '*.example.com'"
    if not is_fqdn(rest):
        return f"invalid host {name!r}: expected a DNS name such as 'api.example.com' or '*.example.com'"
    return None


def _label_key_problem(key: str) -> str | None:
    prefix, sep, name = key.rpartition("/")
    if sep and not is_dns1123_subdomain(prefix):
        return f"invalid label key {key!r}: the prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return f"invalid label key {key!r}: at most 63 letters, digits, '-', '_' or '.'"
    return None


NETWORK_LABEL = "topology.istio.io/network"
LOCALITY_LABEL = "istio-locality"
"""Istio's pod label for a locality, `region.zone.subzone` (dots: label values cannot hold `/`)."""


@dataclass(frozen=True, slots=True)
class Pod:
    """What a ServiceEntry `workloadSelector` needs of a Kubernetes Pod; filled from the Pod's JSON by `from_json`.

    `locality` comes from the pod's `istio-locality` label when set; else the
    caller (which knows the node's topology labels) passes it.
    """

    namespace: str
    name: str
    ip: str
    labels: Mapping[str, str]
    service_account: str = ""
    node_name: str = ""
    ready: bool = True
    terminating: bool = False
    locality: Locality = NO_LOCALITY
    network: str = ""

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], locality: Locality | None = None) -> Pod | None:
        """A Pod object as the API server returns it → `Pod`; None when it has no IP or has finished."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ip = status.get("podIP")
        if not isinstance(ip, str) or not is_ip(ip) or status.get("phase") in ("Succeeded", "Failed"):
            return None
        raw_labels = meta.get("labels") or {}
        labels = {str(k): str(v) for k, v in raw_labels.items()} if isinstance(raw_labels, dict) else {}
        ready = any(
            isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
        found = locality or NO_LOCALITY
        if labels.get(LOCALITY_LABEL):
            parts = [*labels[LOCALITY_LABEL].split(".", 2), "", ""]
            found = Locality(region=parts[0], zone=parts[1], subzone=parts[2])
        return cls(
            namespace=str(meta.get("namespace") or "default"),
            name=str(meta.get("name") or ""),
            ip=ip,
            labels=labels,
            service_account=str(spec.get("serviceAccountName") or ""),
            node_name=str(spec.get("nodeName") or ""),
            ready=ready,
            terminating=meta.get("deletionTimestamp") is not None,
            locality=found,
            network=labels.get(NETWORK_LABEL, ""),
        )


def pod_workload(pod: Pod) -> WorkloadEntry:
    """A Pod as a workload for `workloadSelector` (Istio selects Pods and WorkloadEntries alike).

    Health: a ready pod is HEALTHY, a terminating one DRAINING, any other UNHEALTHY.
    """
    health = Health.DRAINING if pod.terminating else Health.HEALTHY if pod.ready else Health.UNHEALTHY
    endpoint = Endpoint(
        address=pod.ip,
        labels=pod.labels,
        locality=pod.locality,
        network=pod.network,
        service_account=pod.service_account,
        health=health,
        node_name=pod.node_name,
        target_ref=f"Pod/{pod.namespace}/{pod.name}",
    )
    ref = ObjectRef("Pod", pod.namespace, pod.name, ObjectLocator("Pod", pod.namespace, pod.name))
    return WorkloadEntry(ref=ref, endpoint=endpoint)


def read_yaml_objects(
    file: str,
    text: str,
    default_namespace: str,
    *,
    cache: ChunkCache | None = None,
    loader: LoaderClass = FAST_LOADER,
) -> tuple[list[Object], list[Problem]]:
    """A YAML (or JSON) file's text → its ServiceEntries and WorkloadEntries, or every problem in it.

    With a `cache` kept per file, documents whose text did not change since
    the previous call are not parsed nor validated again: the same objects
    come back (so `translate.Translation` sees them unchanged). Blocking; for
    a worker thread.
    """

    def validate(documents: list[Document]) -> tuple[list[Object], list[Problem]]:
        return read_objects(documents, default_namespace)

    results, problems = read_documents(file, text, loader=loader, cache=cache, derive=validate)
    if problems:
        return [], problems
    return [obj for _, objects in results for obj in objects], []
