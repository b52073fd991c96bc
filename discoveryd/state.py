"""Warm restarts: the index saved to `state_dir` and served again at the next start.

Data flow. While the daemon runs, `StateSaver.run` (a supervisor task) waits
for new index versions (or a changed resume point), at most once per
`interval` takes `Index.capture()` on the event loop (a tuple of immutable
services per part: O(parts), no serialisation), and hands it to a worker
thread, which encodes it (positional rows and shared tables, orjson, a
checksum) and writes it atomically: a temporary file in the same directory,
fsync, rename over `index.state`, fsync of the directory. On cancellation (daemon stop) it
writes once more, synchronously, if anything changed since the last write.

At start, before any registry runs, `load()` reads the file and returns the
parts of the registries still configured; the supervisor restores them into
the index (`Index.restore`): served at once, marked stale and `restored`
(which counts for readiness), until each registry's first sync replaces them.
A missing file is a cold start. A file that cannot be read, decoded, or was
written by another format version, or that holds a value of another type or
range than the model's (a checksum that matches proves no damage, not
truth), is logged (naming the file and the reason) and ignored as a whole:
never a crash, never part of a world, and the next save replaces it.

With it go the xDS resources served (`SavedXds`: the serialized resources of
every hostname without a traffic policy whose service is the very object the
served view was built from), which the first xDS build after a start takes as
they are when they are known to match: every saved part restored, registry
precedence unchanged, same `xds_fingerprint` (the xDS config and the code that
builds resources). They are the only derived content in the file.

The file holds what the registries said (services, endpoints, traffic
policies, each part's resume point); it is written with mode 0600 in a directory
the daemon owns (systemd `StateDirectory=`, mode 0700).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import logging
import operator
import os
import re
import stat
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from discoveryd import __version__, gcpause
from discoveryd.config import XdsConfig
from discoveryd.index import Index, PartCapture, Snapshot
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Locality,
    Location,
    Port,
    PortProtocol,
    Resolution,
    Service,
    SourceId,
)
from discoveryd.policy import HostPolicy, is_wildcard, wildcard_keys
from discoveryd.registry import RegistryConfig
from discoveryd.xds.resources import ENDPOINT, TYPES, Prebuilt, View

log = logging.getLogger("discoveryd.state")

FILE_NAME = "index.state"
LEGACY_FILE_NAME = "index.json.gz"
"""Where format version 1 was written; removed at start."""
FORMAT = "discoveryd-index-state"
VERSION = 2
"""Bumped on any change a reader of the previous version would misread; older files are then ignored."""


class StateError(Exception):
    """The state file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class RestoredPart:
    source: SourceId
    part: str
    services: tuple[Service, ...]
    resume_point: str | None
    config: str | None = None
    """The fingerprint of the registry's config when it was saved (`config_fingerprint`)."""
    policies: tuple[tuple[Hostname, HostPolicy], ...] = ()
    """The part's traffic policies (DestinationRule, VirtualService) per host."""
    last_sync: float | None = None
    """Wall-clock time of the content's last sync, in whichever run it was (None: not in the file)."""


@dataclass(frozen=True, slots=True)
class SavedXds:
    """The xDS resources served when the index was saved, per hostname, for the next start's first build.

    Valid only where the restored snapshot equals the saved one (every part restored, the registries
    in the same order) and the resources would be built alike (`fingerprint`: the xDS config and
    the code that builds them).
    """

    fingerprint: str
    order: tuple[SourceId, ...]
    """The registries, in precedence order, when saved."""
    resources: Mapping[Hostname, Prebuilt]

    def usable(self, fingerprint: str, order: Sequence[SourceId]) -> bool:
        saved = set(self.order)
        now = set(order)
        return self.fingerprint == fingerprint and [s for s in order if s in saved] == [
            s for s in self.order if s in now
        ]


XdsServed = tuple[str, tuple[SourceId, ...], View, Snapshot]
"""What xDS serves, for the saver: (fingerprint, registry order, view served, its snapshot)."""

XdsSource = Callable[[], "XdsServed | None"]
"""What the saver asks for the xDS resources (None: not serving yet)."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    parts: tuple[RestoredPart, ...]
    written: float
    """Wall-clock time the file was written."""
    xds: SavedXds | None = None
    """The saved xDS resources, when the file has them and every part in it was restored."""


_CODE = (
    "xds/resources.py",
    "xds/traffic.py",
    "xds/locality.py",
    "model.py",
    "policy.py",
    "index.py",
)


@functools.cache
def _code_digest() -> bytes:
    h = hashlib.blake2b(__version__.encode(), digest_size=16)
    base = Path(__file__).parent
    for name in sorted({*_CODE, *(f"xds/{p.name}" for p in (base / "xds").glob("*.py"))}):
        with contextlib.suppress(OSError):
            h.update(name.encode() + b"\0" + (base / name).read_bytes())
    return h.digest()


def xds_fingerprint(config: XdsConfig) -> str:
    """Identifies how xDS resources are built: the `xds` config section and the code that builds them."""
    h = hashlib.blake2b(_code_digest(), digest_size=16)
    h.update(config.model_dump_json().encode())
    return h.hexdigest()


def served_resources(view: View, built_from: Snapshot, snapshot: Snapshot) -> dict[Hostname, Prebuilt]:
    """The resources of `view` (built from `built_from`) that hold for `snapshot`: the hostnames whose
    service is the very same object in both (the index keeps unchanged values) and that have no
    traffic policy (the hosts with one, few, are built at start with their namespace variants,
    locality plans and gRPC notes), their own or a wildcard rule host's that matches them (in either
    snapshot: one removed since the build would leave its shape in the saved bytes).
    Reads immutable values only: runs in a thread."""
    out: dict[Hostname, Prebuilt] = {}
    services, policies = snapshot.services, snapshot.policies
    built_services, built_policies = built_from.services, built_from.policies
    localized, tables, ignored = view.localized, view.resources, view.grpc_ignored
    wild = {h for h in (*policies, *built_policies) if is_wildcard(h)}  # rules of hosts such as *.example.com
    for host, keys in view.by_host.items():
        service = services.get(host)
        if service is None or built_services.get(host) is not service:
            continue
        if host in policies or host in built_policies or host in view.variant_keys:
            continue
        if wild and any(k in wild for k in wildcard_keys(host)):
            continue
        if any((type_url == ENDPOINT and name in localized) or (type_url, name) in ignored for type_url, name in keys):
            continue
        out[host] = tuple((type_url, name, tables[type_url][name].body) for type_url, name in keys)
    return out


# -- encoding ---------------------------------------------------------------------------
#
# The file: one header line `discoveryd-index-state <version> <blake2b of the rest>`, then one
# JSON document (orjson). Services and endpoints are positional rows in the order of the model's
# fields, which the document lists under "fields" (a reader maps by name when they differ);
# mappings (labels, ports), localities and registry names are stored once in tables and referred
# to by position: 50k endpoints decode several times faster than as objects with named keys
# (most of a warm start went to that), and equal values come back as one shared object.

_ENDPOINT_FIELDS = (
    "address",
    "ports",
    "labels",
    "locality",
    "weight",
    "health",
    "network",
    "service_account",
    "hostname",
    "priority",
    "source",
    "tags",
    "node_name",
    "target_ref",
)
_SERVICE_FIELDS = (
    "hostname",
    "namespace",
    "ports",
    "addresses",
    "resolution",
    "location",
    "labels",
    "source",
    "endpoints",
    "name",
    "export_to",
    "subject_alt_names",
    "aliases",
)
_PORT_FIELDS = ("number", "name", "protocol", "target_port")
"""The field orders the fast encoder and decoder are written for (a test holds them to the model)."""


def _fields(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _default(value: Any) -> Any:
    """orjson's fallback: mappings that are not dicts (MappingProxyType, immutables.Map)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot save a {type(value).__name__} in the state file")


def config_fingerprint(config: RegistryConfig) -> str:
    """Identifies a registry's config: content saved under another config is not restored (a new etcd prefix)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:32]


class _Tables:
    """The shared values of one file: mappings, localities and registry names, each stored once."""

    def __init__(self) -> None:
        self.maps: list[Mapping[str, Any]] = []
        self._map_ids: dict[int, int] = {}
        self._map_keys: dict[tuple[Any, ...], int] = {}
        self.localities: dict[Locality, int] = {}
        self.sources: dict[str, int] = {}

    def map(self, value: Mapping[str, Any]) -> int:
        # By identity first (the objects outlive the encoding: the capture holds them), then by content.
        found = self._map_ids.get(id(value))
        if found is None:
            key = tuple(value.items())
            found = self._map_keys.get(key)
            if found is None:
                found = self._map_keys[key] = len(self.maps)
                self.maps.append(value)
            self._map_ids[id(value)] = found
        return found

    def locality(self, value: Locality) -> int:
        found = self.localities.get(value)
        if found is None:
            found = self.localities[value] = len(self.localities)
        return found

    def source(self, value: str) -> int:
        found = self.sources.get(value)
        if found is None:
            found = self.sources[value] = len(self.sources)
        return found

    def endpoint(self, ep: Endpoint) -> list[Any]:
        return [
            ep.address,
            self.map(ep.ports),
            self.map(ep.labels),
            self.locality(ep.locality),
            ep.weight,
            ep.health,
            ep.network,
            ep.service_account,
            ep.hostname,
            ep.priority,
            self.source(ep.source),
            ep.tags,
            ep.node_name,
            ep.target_ref,
        ]

    def service(self, s: Service) -> list[Any]:
        return [
            s.hostname,
            s.namespace,
            [[p.number, p.name, p.protocol, p.target_port] for p in s.ports],
            s.addresses,
            s.resolution,
            s.location,
            self.map(s.labels),
            self.source(s.source),
            [self.endpoint(ep) for ep in s.endpoints],
            s.name,
            s.export_to,
            s.subject_alt_names,
            s.aliases,
        ]


_CHUNK = 500
"""Services per orjson call: orjson holds the GIL while it runs, so the event loop gets it back between chunks."""


def encode(
    parts: Sequence[PartCapture],
    written: float,
    configs: Mapping[SourceId, str] | None = None,
    xds: SavedXds | None = None,
) -> bytes:
    """The state file's bytes. CPU-bound: call it from a worker thread.

    The xDS resources, if any, follow the JSON document (after a newline, which orjson never
    writes inside one) as raw bytes, their lengths in the document.

    Built chunk by chunk so that no single call holds the GIL for long while the event loop runs.
    """
    if (_fields(Service), _fields(Endpoint), _fields(Port)) != (_SERVICE_FIELDS, _ENDPOINT_FIELDS, _PORT_FIELDS):
        raise TypeError("the model's fields changed: update discoveryd.state's rows and bump VERSION")
    tables = _Tables()
    out: list[bytes] = []
    for i, part in enumerate(parts):
        head = orjson.dumps(
            {
                "source": part.source,
                "part": part.part,
                "resume_point": part.resume_point,
                "config": (configs or {}).get(part.source),
                "policies": [[host, policy] for host, policy in part.policies],
                "last_sync": part.last_sync,
            },
            default=_default,
        )
        out.append((b"," if i else b"") + head[:-1] + b',"services":[')
        services = part.services
        for start in range(0, len(services), _CHUNK):
            rows = [tables.service(s) for s in services[start : start + _CHUNK]]
            chunk = orjson.dumps(rows, default=_default)
            out.append((b"," if start else b"") + chunk[1:-1])
        out.append(b"]}")
    blob: list[bytes] = []
    xds_doc: dict[str, Any] | None = None
    if xds is not None:
        type_ids = {t: i for i, t in enumerate(TYPES)}
        hosts = []
        for host, resources in xds.resources.items():
            hosts.append([host, [[type_ids[t], name, len(body)] for t, name, body in resources]])
            blob.extend(body for _, _, body in resources)
        xds_doc = {"fingerprint": xds.fingerprint, "order": xds.order, "types": TYPES, "hosts": hosts}
    head = orjson.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "written": written,
            "xds": xds_doc,
            "fields": {"Service": _SERVICE_FIELDS, "Endpoint": _ENDPOINT_FIELDS, "Port": _PORT_FIELDS},
            "maps": tables.maps,
            "localities": [[loc.region, loc.zone, loc.subzone] for loc in tables.localities],
            "sources": list(tables.sources),
        },
        default=_default,
    )
    body = b"".join([head[:-1], b',"parts":[', *out, b"]}\n", *blob])
    digest = hashlib.blake2b(body, digest_size=16).hexdigest()
    return f"{FORMAT} {VERSION} {digest}\n".encode() + body


# -- decoding ---------------------------------------------------------------------------

_HEALTH = {h.value: h for h in Health}
_PROTOCOL = {p.value: p for p in PortProtocol}
_RESOLUTION = {r.value: r for r in Resolution}
_LOCATION = {loc.value: loc for loc in Location}


class _Rows:
    """Rebuilds services from the file's rows and tables.

    With the field lists of this model (the usual case) each object is built
    positionally in one call; a file written by a model with other fields is
    read by name (unknown fields ignored, missing ones defaulted).
    """

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.maps: list[dict[str, Any]] = list(doc["maps"])
        self.localities = [Locality(*(str(x) for x in loc)) for loc in doc["localities"]]
        self.sources = [SourceId(str(x)) for x in doc["sources"]]
        fields = doc["fields"]
        self.service_fields = tuple(fields["Service"])
        self.endpoint_fields = tuple(fields["Endpoint"])
        self.port_fields = tuple(fields["Port"])
        self.fast = (
            (self.service_fields, self.endpoint_fields, self.port_fields)
            == (
                _fields(Service),
                _fields(Endpoint),
                _fields(Port),
            )
            == (_SERVICE_FIELDS, _ENDPOINT_FIELDS, _PORT_FIELDS)
        )

    def services(self, rows: list[Any]) -> tuple[Service, ...]:
        if not self.fast:
            return _checked(tuple(self._service_by_name(r) for r in rows))
        _check_rows(rows, len(self.maps), len(self.localities), len(self.sources), self.maps)
        maps, locs, srcs = self.maps, self.localities, self.sources
        health, protocol, resolution, location = _HEALTH, _PROTOCOL, _RESOLUTION, _LOCATION
        ep_cls, port_cls = Endpoint, Port
        return tuple(
            [
                Service(
                    r[0],
                    r[1],
                    tuple([port_cls(p[0], p[1], protocol[p[2]], p[3]) for p in r[2]]),
                    tuple(r[3]),
                    resolution[r[4]],
                    location[r[5]],
                    maps[r[6]],
                    srcs[r[7]],
                    tuple(
                        [
                            ep_cls(
                                e[0],
                                maps[e[1]],
                                maps[e[2]],
                                locs[e[3]],
                                e[4],
                                health[e[5]],
                                e[6],
                                e[7],
                                e[8],
                                e[9],
                                srcs[e[10]],
                                tuple(e[11]),
                                e[12],
                                e[13],
                            )
                            for e in r[8]
                        ]
                    ),
                    r[9],
                    tuple(r[10]),
                    tuple(r[11]),
                    tuple(r[12]),
                )
                for r in rows
            ]
        )

    # By name: a file from a model with other fields.

    def _map(self, i: Any) -> dict[str, Any]:
        return self.maps[_ref(i, len(self.maps), "maps")]

    def _locality(self, i: Any) -> Locality:
        return self.localities[_ref(i, len(self.localities), "localities")]

    def _source(self, i: Any) -> SourceId:
        return self.sources[_ref(i, len(self.sources), "sources")]

    def _named(self, cls: type[Any], names: tuple[str, ...], row: list[Any], convert: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in zip(names, row, strict=True):
            if name in known:
                conv = convert.get(name)
                kwargs[name] = conv(value) if conv is not None else value
        return cls(**kwargs)

    def _endpoint_by_name(self, row: list[Any]) -> Endpoint:
        convert = {
            "ports": self._map,
            "labels": self._map,
            "locality": self._locality,
            "health": _HEALTH.__getitem__,
            "source": self._source,
            "tags": tuple,
        }
        return self._named(Endpoint, self.endpoint_fields, row, convert)  # type: ignore[no-any-return]

    def _port_by_name(self, row: list[Any]) -> Port:
        return self._named(Port, self.port_fields, row, {"protocol": _PROTOCOL.__getitem__})  # type: ignore[no-any-return]

    def _service_by_name(self, row: list[Any]) -> Service:
        convert: dict[str, Callable[[Any], Any]] = {
            "ports": lambda v: tuple(self._port_by_name(p) for p in v),
            "addresses": tuple,
            "resolution": _RESOLUTION.__getitem__,
            "location": _LOCATION.__getitem__,
            "labels": self._map,
            "source": self._source,
            "endpoints": lambda v: tuple(self._endpoint_by_name(e) for e in v),
            "export_to": tuple,
            "subject_alt_names": tuple,
            "aliases": tuple,
        }
        return self._named(Service, self.service_fields, row, convert)  # type: ignore[no-any-return]


# -- checks -----------------------------------------------------------------------------
#
# The checksum finds damage, not lies: a file written by a bug, by hand or by anyone who can write
# the state directory has a valid one. Every value is checked for the type and range the model and
# the servers rely on before anything is built from it (a service with an int hostname, a label map
# with an int value or a negative table position would otherwise be served, or crash a server on every
# start). By column, with `map(type, ...)` and `min`/`max`: a few percent of the decode.

_HOST = re.compile(r"(?:[^.\sA-Z/]{1,63}\.)*[^.\sA-Z/]{1,63}")
"""A normalised name (lower case, no trailing dot, no empty label), as adapters write them."""
_MAX_INT = 2**32 - 1
"""Weights and priorities are 32-bit unsigned on the wire."""


def _fail(what: str) -> typing.NoReturn:
    raise StateError(what)


def _ref(i: Any, size: int, table: str) -> int:
    if type(i) is not int or not 0 <= i < size:
        _fail(f"a reference {i!r} outside the table {table} ({size} entries)")
    return i


def _types(column: Iterable[Any], allowed: set[type], what: str) -> None:
    extra = set(map(type, column)) - allowed
    if extra:
        _fail(f"{what}: a value of type {next(iter(extra)).__name__}")


def _ints(column: Iterable[Any], low: int, high: int, what: str, optional: bool = False) -> None:
    values = [v for v in column if v is not None] if optional else list(column)
    _types(values, {int}, what)
    if values and (min(values) < low or max(values) > high):
        _fail(f"{what}: a value outside {low}..{high}")


def _refs(column: Iterable[Any], size: int, what: str) -> None:
    values = list(column)
    _types(values, {int}, what)
    if values and (min(values) < 0 or max(values) >= size):
        _fail(f"{what}: a reference outside its table ({size} entries)")


def _strs(column: Iterable[Any], what: str) -> None:
    _types(column, {str}, what)


def _members(column: Iterable[Any], allowed: Mapping[str, Any], what: str) -> None:
    values = set(column)
    _strs(values, what)
    unknown = values - allowed.keys()
    if unknown:
        _fail(f"{what}: unknown value {next(iter(unknown))!r}")


def _hosts(column: Iterable[Any], what: str) -> None:
    values = list(column)
    _strs(values, what)
    bad = next((h for h in values if len(h) > 253 or _HOST.fullmatch(h) is None), None)
    if bad is not None:
        _fail(f"{what}: {bad!r} is not a hostname")


def _shape(rows: list[Any], width: int, columns: Mapping[int, type], what: str, names: tuple[str, ...]) -> None:
    """Every row a list of `width` items, those at `columns` of their type (one pass per column; the
    other columns are checked with their ranges or allowed values)."""
    _types(rows, {list}, what)
    lengths = set(map(len, rows)) - {width}
    if lengths:
        _fail(f"{what}: a row of {lengths.pop()} fields, not {width}")
    for i, kind in columns.items():
        found = set(map(type, map(operator.itemgetter(i), rows))) - {kind}
        if found:
            _fail(f"{what}: {names[i]} is a {found.pop().__name__}, not {kind.__name__}")


def _items(rows: list[Any], i: int) -> list[Any]:
    """The items of the lists in column `i` (`_shape` checked that they are lists), flattened."""
    return list(itertools.chain.from_iterable(map(operator.itemgetter(i), rows)))


_SERVICE_COLUMNS = {1: str, 2: list, 3: list, 8: list, 9: str, 10: list, 11: list, 12: list}
_ENDPOINT_COLUMNS = {0: str, 6: str, 7: str, 8: str, 11: list, 12: str, 13: str}
_PORT_COLUMNS = {1: str}


def _check_rows(rows: Any, maps: int, localities: int, sources: int, tables: Sequence[Any]) -> None:
    """Every value of a part's service rows as the fast decoder will use it; StateError naming the first bad one."""
    if type(rows) is not list:
        _fail("services: not a list")
    _shape(rows, len(_SERVICE_FIELDS), _SERVICE_COLUMNS, "service", _SERVICE_FIELDS)
    col = operator.itemgetter
    _hosts(map(col(0), rows), "service hostname")
    ports = _items(rows, 2)
    _shape(ports, len(_PORT_FIELDS), _PORT_COLUMNS, "port", _PORT_FIELDS)
    _ints(map(col(0), ports), 0, 65535, "port number")
    _members(map(col(2), ports), _PROTOCOL, "port protocol")
    _ints(map(col(3), ports), 0, 65535, "port target_port", optional=True)
    _strs(_items(rows, 3), "service addresses")
    _members(map(col(4), rows), _RESOLUTION, "service resolution")
    _members(map(col(5), rows), _LOCATION, "service location")
    _refs(map(col(6), rows), maps, "service labels")
    _refs(map(col(7), rows), sources, "service source")
    _strs(_items(rows, 10), "service export_to")
    _strs(_items(rows, 11), "service subject_alt_names")
    _hosts(_items(rows, 12), "service aliases")
    endpoints = _items(rows, 8)
    _shape(endpoints, len(_ENDPOINT_FIELDS), _ENDPOINT_COLUMNS, "endpoint", _ENDPOINT_FIELDS)
    _refs(map(col(1), endpoints), maps, "endpoint ports")
    _refs(map(col(2), endpoints), maps, "endpoint labels")
    _refs(map(col(3), endpoints), localities, "endpoint locality")
    _ints(map(col(4), endpoints), 0, _MAX_INT, "endpoint weight")
    _members(map(col(5), endpoints), _HEALTH, "endpoint health")
    _ints(map(col(9), endpoints), 0, _MAX_INT, "endpoint priority")
    _refs(map(col(10), endpoints), sources, "endpoint source")
    _strs(_items(endpoints, 11), "endpoint tags")
    _check_maps([tables[i] for i in {*map(col(6), rows), *map(col(2), endpoints)}], str, "labels")
    _check_maps([tables[i] for i in set(map(col(1), endpoints))], int, "endpoint ports")


def _check_maps(maps: list[Any], kind: type, what: str) -> None:
    """Mappings of strings to `kind` (str, or int port numbers), checked together."""
    _types(maps, {dict}, what)
    _strs(itertools.chain.from_iterable(maps), f"{what} keys")
    values = list(itertools.chain.from_iterable(map(dict.values, maps)))
    if kind is int:
        _ints(values, 0, 65535, f"{what} values")
    else:
        _strs(values, f"{what} values")


def _checked(services: tuple[Service, ...]) -> tuple[Service, ...]:
    """The services of a file read by name, checked as `_check_rows` checks rows (the rare, slow path)."""
    for s in services:
        _hosts([s.hostname, *s.aliases], "service hostname")
        _strs([s.namespace, s.name, *s.addresses, *s.export_to, *s.subject_alt_names], "service fields")
        _ints([p.number for p in s.ports], 0, 65535, "port number")
        _ints([p.target_port for p in s.ports], 0, 65535, "port target_port", optional=True)
        _strs([p.name for p in s.ports], "port name")
        _check_maps([s.labels], str, "labels")
        for e in s.endpoints:
            _strs([e.address, e.network, e.service_account, e.hostname, e.node_name, e.target_ref, *e.tags], "endpoint")
            _ints([e.weight, e.priority], 0, _MAX_INT, "endpoint weight/priority")
            _check_maps([e.labels], str, "labels")
            _check_maps([e.ports], int, "endpoint ports")
    return services


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """`value` (as orjson read it) as type `tp` of the policy model: dataclasses by field name, recursively."""
    if hasattr(tp, "__supertype__"):  # a NewType (Hostname)
        tp = tp.__supertype__
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        if value is None:
            return None
        (inner,) = (a for a in typing.get_args(tp) if a is not type(None))
        return _from_json(inner, value, where)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise StateError(f"{where}: expected an object for {tp.__name__}")
        hints = _hints(tp)
        return tp(**{k: _from_json(hints[k], v, f"{where}.{k}") for k, v in value.items() if k in hints})
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise StateError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (Mapping, dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise StateError(f"{where}: expected an object")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise StateError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _policies(raw: Any, where: str) -> tuple[tuple[Hostname, HostPolicy], ...]:
    if not isinstance(raw, list):
        raise StateError(f"{where}: expected a list of policies")
    out = []
    for i, item in enumerate(raw):
        host, policy = item
        _strs([host], f"{where}[{i}] host")
        out.append((Hostname(host), _from_json(HostPolicy, policy, f"{where}[{i}]")))
    return tuple(out)


def decode(data: bytes, where: str) -> LoadResult:
    """Parse a state file's bytes; StateError naming `where` and the reason when it cannot be used."""
    header, newline, body = data.partition(b"\n")
    fields = header.split(b" ")
    if not newline or len(fields) != 3 or fields[0] != FORMAT.encode():
        if data[:2] == b"\x1f\x8b":  # the gzip files of format version 1
            raise StateError(f"{where}: state format version 1, this discoveryd reads {VERSION}")
        raise StateError(f"{where}: not a readable state file (no discoveryd state header)")
    if fields[1] != str(VERSION).encode():
        raise StateError(
            f"{where}: state format version {fields[1].decode(errors='replace')}, this discoveryd reads {VERSION}"
        )
    if hashlib.blake2b(body, digest_size=16).hexdigest().encode() != fields[2]:
        raise StateError(f"{where}: not a readable state file (checksum mismatch: truncated or damaged)")
    document, _, blob = body.partition(b"\n")
    try:
        doc = orjson.loads(document)
    except orjson.JSONDecodeError as e:
        raise StateError(f"{where}: not a readable state file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{where}: not a discoveryd state file")
    if doc.get("version") != VERSION:
        raise StateError(f"{where}: state format version {doc.get('version')!r}, this discoveryd reads {VERSION}")
    parts = []
    try:
        rows = _Rows(doc)
        for i, p in enumerate(doc["parts"]):
            try:
                resume, config, synced = p.get("resume_point"), p.get("config"), p.get("last_sync")
                _types([synced], {int, float, type(None)}, "last_sync")
                parts.append(
                    RestoredPart(
                        SourceId(str(p["source"])),
                        str(p["part"]),
                        rows.services(p["services"]),
                        None if resume is None else str(resume),
                        None if config is None else str(config),
                        _policies(p.get("policies", []), "policies"),
                        None if synced is None else float(synced),
                    )
                )
            except StateError as e:
                raise StateError(f"{where}: parts[{i}]: {e}") from e
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise StateError(f"{where}: parts[{i}]: {e!r}") from e
        written = float(doc["written"])
        try:
            xds = _saved_xds(doc.get("xds"), blob)
        except StateError as e:
            raise StateError(f"{where}: {e}") from e
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise StateError(f"{where}: malformed state file ({e!r})") from e
    return LoadResult(tuple(parts), written, xds)


def _saved_xds(raw: Any, blob: bytes) -> SavedXds | None:
    if raw is None:
        return None
    types = [str(t) for t in raw["types"]]
    unknown = set(types) - set(TYPES)
    if unknown:
        _fail(f"xds: unknown resource type {next(iter(unknown))!r}")
    data = memoryview(blob)
    at = 0
    resources: dict[Hostname, Prebuilt] = {}
    for host, entries in raw["hosts"]:
        _hosts([host], "xds hostname")
        items = []
        for type_id, name, size in entries:
            _ref(type_id, len(types), "xds types")
            _strs([name], "xds resource name")
            if type(size) is not int or size < 0 or at + size > len(data):
                raise ValueError(f"xds: resource {name!r} runs past the end of the file")
            items.append((types[type_id], name, bytes(data[at : at + size])))
            at += size
        resources[Hostname(str(host))] = tuple(items)
    if at != len(data):
        raise ValueError(f"xds: {len(data) - at} bytes after the last resource")
    return SavedXds(str(raw["fingerprint"]), tuple(SourceId(str(s)) for s in raw["order"]), resources)


# -- files ------------------------------------------------------------------------------


def write_atomically(directory: Path, data: bytes) -> None:
    """Replace `directory/index.state` with `data`: temp file, fsync, rename, fsync the directory. Blocking."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / FILE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _remove_leftovers(directory: Path) -> None:
    """Temporary files of a write that never finished (the process was killed mid-write), and the file
    of format version 1 (it cannot be read any more; the next save writes the current format)."""
    with contextlib.suppress(OSError):
        (directory / LEGACY_FILE_NAME).unlink()
        log.info("state: removed %s (format version 1, not read by this discoveryd)", directory / LEGACY_FILE_NAME)
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(".index.") and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    log.info("state: removed %s, left by an interrupted write", entry.path)


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file. A FIFO would block the start until someone wrote to
    it, a device (/dev/zero) would be read until memory ran out: OSError for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def load(directory: Path, sources: Mapping[SourceId, str] | Sequence[SourceId]) -> LoadResult | None:
    """The saved parts of the registries in `sources`; None on a cold start or an unusable file (logged).

    With a mapping (source → `config_fingerprint`), a part saved under another
    config of its registry is not restored (logged): its content and resume
    point describe something else.
    """
    path = directory / FILE_NAME
    _remove_leftovers(directory)
    try:
        data = _read_regular(path)
    except FileNotFoundError:
        log.info("state: no %s yet; cold start", path)
        return None
    except OSError as e:
        log.error("state: cannot read %s (%s); starting without it", path, e.strerror or e)
        return None
    try:
        with gcpause.paused():  # decoding makes millions of objects and no cyclic garbage
            result = decode(data, str(path))
    except StateError as e:
        log.error("state: %s; ignoring it, starting cold (it is replaced at the next save)", e)
        return None
    if isinstance(sources, Mapping):
        kept_list = []
        for p in result.parts:
            current = sources.get(p.source)
            if current is None:
                continue
            if p.config != current:
                log.info(
                    "state: %s part %r was saved under another config of that registry; not restored", p.source, p.part
                )
                continue
            kept_list.append(p)
        kept = tuple(kept_list)
    else:
        wanted = set(sources)
        kept = tuple(p for p in result.parts if p.source in wanted)
    # The saved resources were built from every saved part: with one left out they may differ.
    return LoadResult(kept, result.written, result.xds if len(kept) == len(result.parts) else None)


def restore(index: Index, result: LoadResult) -> int:
    """Put restored parts into the index as one version; the number of services restored."""
    count = 0
    with gcpause.paused(), index.batch():
        for part in result.parts:
            index.restore(part.source, part.part, part.services, part.resume_point, part.policies, part.last_sync)
            count += len(part.services)
    return count


_Capture = tuple[list[PartCapture], Snapshot, "XdsServed | None"]

_RETRY_MAX = 60.0
"""After failed writes (a full disk), retries back off from `interval` up to this many seconds: each
try encodes the whole index first (most of a second of CPU at 100k endpoints)."""

_COST_FACTOR = 10
"""A write starts no sooner than this many times the previous write's duration after it ended:
saving costs at most about a tenth of a core whatever the index size."""


class StateSaver:
    """Writes the index to `directory` at most once per `interval` (longer when writes are slow:
    see `_COST_FACTOR`), and on stop. Owned by the supervisor.

    `run()` is one task: it awaits index versions, captures on the event loop
    and writes in a worker thread (one write at a time). A failed write is
    logged and retried at the next change. Cancellation writes the latest
    state synchronously if it changed since the last write.
    """

    def __init__(
        self,
        index: Index,
        directory: Path,
        interval: float = 1.0,
        configs: Callable[[], Mapping[SourceId, str]] = dict,
        xds: XdsSource | None = None,
    ) -> None:
        """`configs`: the current registries' `config_fingerprint`s, saved with their parts.
        `xds`: the resources the xDS server serves, saved with the index they hold for."""
        self._index = index
        self._configs = configs
        self._xds = xds
        self._directory = directory
        self._interval = interval
        self._saved_version = -1
        self._lock = threading.Lock()
        """One write at a time: a stop-time write waits for one still running in the worker thread."""
        self.writes = 0
        self.last_write_seconds = 0.0
        self._failures = 0
        """Writes failed in a row; the next try waits `interval` doubled as many times (`_RETRY_MAX`)."""
        self._retry_at = 0.0
        self._xds_behind = False
        """The last write lacked xDS resources of the saved version (xDS had not built it yet)."""

    def _changed(self) -> bool:
        return (
            self._index.snapshot.version != self._saved_version
            or self._index.state_dirty
            or (self._xds_behind and self._xds_caught_up())
        )

    def _xds_caught_up(self) -> bool:
        """xDS now serves a build of the saved version or later (and all of it can be saved)."""
        served = self._xds() if self._xds is not None else None
        return served is not None and served[3].version >= self._saved_version and self._index.capture_is_complete()

    def _capture(self) -> tuple[int, _Capture]:
        snapshot = self._index.snapshot
        parts = self._index.capture()
        served = self._xds() if self._xds is not None and self._index.capture_is_complete() else None
        return snapshot.version, (parts, snapshot, served)

    def _write(self, capture: _Capture) -> None:
        parts, snapshot, served = capture
        # Written again once xDS has caught up: a start takes the resources of only the hostnames
        # that were built from the saved services, and builds the others.
        self._xds_behind = self._xds is not None and (served is None or served[3].version < snapshot.version)
        with self._lock:
            started = time.perf_counter()
            xds = None
            if served is not None:
                fingerprint, order, view, built_from = served
                xds = SavedXds(fingerprint, order, served_resources(view, built_from, snapshot))
            write_atomically(self._directory, encode(parts, time.time(), self._configs(), xds))
            self.last_write_seconds = time.perf_counter() - started
            self.writes += 1

    async def run(self) -> None:
        self._saved_version = self._index.snapshot.version  # what was just restored (or nothing) is on disk
        last = 0.0
        try:
            while True:
                if not self._changed():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._interval):
                            await self._index.wait(self._index.snapshot.version)
                    continue
                # Paced by cost too: under steady churn a big index (1.2 s to encode at 100k
                # endpoints) would otherwise keep a worker thread, and the GIL, busy for good. Not
                # the one write that only adds the xDS resources of the version already saved (the
                # first save after a sync comes before xDS has built it): a kill -9 in between would
                # make the next start build every resource before its first response.
                catch_up = self._index.snapshot.version == self._saved_version and not self._index.state_dirty
                pace = self._interval if catch_up else max(self._interval, _COST_FACTOR * self.last_write_seconds)
                due = max(last + pace, self._retry_at)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                version, capture = self._capture()
                try:
                    await asyncio.to_thread(self._write, capture)
                except OSError as e:
                    self._failed(e)
                else:
                    self._saved_version = version
                    self._recovered()
                last = time.monotonic()
        finally:
            if self._changed():
                self.save_now()

    def _failed(self, error: OSError) -> None:
        """Back off, and log the first failure and then each time the count doubles: a disk full for
        hours is a few lines, not one a second."""
        self._failures += 1
        retry = min(_RETRY_MAX, self._interval * 2 ** min(self._failures, 16))
        self._retry_at = time.monotonic() + retry
        if self._failures & (self._failures - 1) == 0:
            log.error(
                "state: cannot write %s: %s (%d failed in a row; next try in %.0fs)",
                self._directory / FILE_NAME,
                error,
                self._failures,
                retry,
            )

    def _recovered(self) -> None:
        if self._failures:
            log.info("state: %s written again after %d failed writes", self._directory / FILE_NAME, self._failures)
        self._failures, self._retry_at = 0, 0.0

    def save_now(self) -> None:
        """Capture and write at once, blocking the caller (at stop)."""
        version, capture = self._capture()
        try:
            self._write(capture)
        except OSError as e:
            log.error("state: cannot write %s: %s", self._directory / FILE_NAME, e)
        else:
            self._saved_version = version
            self._recovered()
