"""Warm restarts: the index saved to `state_dir` and served again at the next start.

Data flow. While the daemon runs, `StateSaver.run` (a supervisor task) waits
for new index versions (or a changed resume point), at most once per
`interval` takes `Index.capture()` on the event loop (a tuple of immutable
services per part: O(parts), no serialisation), and hands it to a worker
thread, which encodes it (orjson), compresses it (gzip level 1) and writes it
atomically: a temporary file in the same directory, fsync, rename over
`index.json.gz`, fsync of the directory. On cancellation (daemon stop) it
writes once more, synchronously, if anything changed since the last write.

At start, before any registry runs, `load()` reads the file and returns the
parts of the registries still configured; the supervisor restores them into
the index (`Index.restore`): served at once, marked stale and `restored`
(which counts for readiness), until each registry's first sync replaces them.
A missing file is a cold start. A file that cannot be read, decoded, or was
written by another format version is logged (naming the file and the
reason) and ignored: never a crash, and the next save replaces it.

The file holds what the registries said (services, endpoints, each part's
resume point), nothing derived; it is written with mode 0600 in a directory
the daemon owns (systemd `StateDirectory=`, mode 0700).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import hashlib
import logging
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from discoveryd.index import Index, PartCapture
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
from discoveryd.registry import RegistryConfig

log = logging.getLogger("discoveryd.state")

FILE_NAME = "index.json.gz"
FORMAT = "discoveryd-index-state"
VERSION = 1
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


@dataclass(frozen=True, slots=True)
class LoadResult:
    parts: tuple[RestoredPart, ...]
    written: float
    """Wall-clock time the file was written."""


# -- encoding ---------------------------------------------------------------------------


def _default(value: Any) -> Any:
    """orjson's fallback: mappings that are not dicts (MappingProxyType, immutables.Map)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot save a {type(value).__name__} in the state file")


_CHUNK = 500
"""Services per orjson call: orjson holds the GIL while it runs, so the event loop gets it back between chunks."""


def config_fingerprint(config: RegistryConfig) -> str:
    """Identifies a registry's config: content saved under another config is not restored (a new etcd prefix)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:32]


def encode(parts: Sequence[PartCapture], written: float, configs: Mapping[SourceId, str] | None = None) -> bytes:
    """The state file's bytes (gzip of one JSON document). CPU-bound: call it from a worker thread.

    Built chunk by chunk (and compressed as it goes, zlib releasing the GIL) so
    that no single call holds the GIL for long while the event loop runs.
    """
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    out = [comp.compress(orjson.dumps({"format": FORMAT, "version": VERSION, "written": written})[:-1])]
    out.append(comp.compress(b',"parts":['))
    for i, part in enumerate(parts):
        head = orjson.dumps(
            {
                "source": part.source,
                "part": part.part,
                "resume_point": part.resume_point,
                "config": (configs or {}).get(part.source),
            }
        )
        out.append(comp.compress((b"," if i else b"") + head[:-1] + b',"services":['))
        services = part.services
        for start in range(0, len(services), _CHUNK):
            chunk = orjson.dumps(services[start : start + _CHUNK], default=_default)
            out.append(comp.compress((b"," if start else b"") + chunk[1:-1]))
        out.append(comp.compress(b"]}"))
    out.append(comp.compress(b"]}"))
    out.append(comp.flush())
    return b"".join(out)


# -- decoding ---------------------------------------------------------------------------

_Convert = Callable[[Any], Any]


def _enum(cls: type[Enum]) -> _Convert:
    return lambda v: cls(v)


def _tuple_of(convert: _Convert) -> _Convert:
    return lambda v: tuple(convert(x) for x in v)


def _str_tuple(v: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in v)


def _build(cls: type[Any], converters: Mapping[str, _Convert]) -> _Convert:
    """A decoder for dataclass `cls` from its JSON object: known fields converted, unknown keys ignored."""
    names = frozenset(f.name for f in dataclasses.fields(cls))

    def decode(obj: Any) -> Any:
        if not isinstance(obj, dict):
            raise StateError(f"expected an object for {cls.__name__}, got {type(obj).__name__}")
        kwargs = {}
        for key, value in obj.items():
            if key not in names:
                continue
            convert = converters.get(key)
            kwargs[key] = convert(value) if convert is not None else value
        return cls(**kwargs)

    return decode


_locality_slow = _build(Locality, {})
_port = _build(Port, {"protocol": _enum(PortProtocol)})
_endpoint_slow = _build(
    Endpoint,
    {
        "locality": _locality_slow,
        "health": _enum(Health),
        "source": SourceId,
        "tags": _str_tuple,
    },
)
_service_slow = _build(
    Service,
    {
        "hostname": Hostname,
        "ports": _tuple_of(_port),
        "addresses": _str_tuple,
        "resolution": _enum(Resolution),
        "location": _enum(Location),
        "source": SourceId,
        "endpoints": lambda v: tuple(e if isinstance(e, Endpoint) else _endpoint_slow(e) for e in v),
        "export_to": _str_tuple,
        "subject_alt_names": _str_tuple,
        "aliases": _tuple_of(Hostname),
    },
)
_HEALTH = {h.value: h for h in Health}


class _Decoder:
    """Rebuilds services from the file's objects; fast path per object, the by-name path as fallback.

    The fast path converts the few typed fields in place and calls the class
    with the object as keywords; anything unexpected (a field this model does
    not have, a wrong type) falls back to the slow path, which ignores unknown
    keys and converts every field. Equal localities are shared.
    """

    def __init__(self) -> None:
        self._localities: dict[tuple[Any, ...], Locality] = {}

    def locality(self, obj: Any) -> Locality:
        key = (obj.get("region", ""), obj.get("zone", ""), obj.get("subzone", ""))
        found = self._localities.get(key)
        if found is None:
            found = self._localities[key] = _locality_slow(obj)
        return found

    def endpoint(self, obj: Any) -> Endpoint:
        try:
            obj["locality"] = self.locality(obj["locality"])
            obj["health"] = _HEALTH[obj["health"]]
            obj["tags"] = tuple(obj["tags"])
            return Endpoint(**obj)
        except (KeyError, TypeError, AttributeError):
            return _endpoint_slow(obj)  # type: ignore[no-any-return]

    def service(self, obj: Any) -> Service:
        if not isinstance(obj, dict):
            raise StateError(f"expected an object for Service, got {type(obj).__name__}")
        endpoints = obj.get("endpoints")
        if isinstance(endpoints, list):
            obj["endpoints"] = tuple(self.endpoint(e) if isinstance(e, dict) else e for e in endpoints)
        return _service_slow(obj)  # type: ignore[no-any-return]


def decode(data: bytes, where: str) -> LoadResult:
    """Parse a state file's bytes; StateError naming `where` and the reason when it cannot be used."""
    try:
        doc = orjson.loads(gzip.decompress(data))
    except (OSError, EOFError, orjson.JSONDecodeError, ValueError) as e:
        raise StateError(f"{where}: not a readable state file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{where}: not a discoveryd state file")
    if doc.get("version") != VERSION:
        raise StateError(f"{where}: state format version {doc.get('version')!r}, this discoveryd reads {VERSION}")
    parts = []
    decoder = _Decoder()
    try:
        for i, p in enumerate(doc["parts"]):
            try:
                resume, config = p.get("resume_point"), p.get("config")
                parts.append(
                    RestoredPart(
                        SourceId(str(p["source"])),
                        str(p["part"]),
                        tuple(decoder.service(s) for s in p["services"]),
                        None if resume is None else str(resume),
                        None if config is None else str(config),
                    )
                )
            except (KeyError, TypeError, ValueError, StateError) as e:
                raise StateError(f"{where}: parts[{i}]: {e!r}") from e
        written = float(doc["written"])
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"{where}: malformed state file ({e!r})") from e
    return LoadResult(tuple(parts), written)


# -- files ------------------------------------------------------------------------------


def write_atomically(directory: Path, data: bytes) -> None:
    """Replace `directory/index.json.gz` with `data`: temp file, fsync, rename, fsync the directory. Blocking."""
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


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Decoding allocates millions of objects and no cyclic garbage: the collector would only rescan them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _remove_leftovers(directory: Path) -> None:
    """Temporary files of a write that never finished (the process was killed mid-write)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(".index.") and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    log.info("state: removed %s, left by an interrupted write", entry.path)


def load(directory: Path, sources: Mapping[SourceId, str] | Sequence[SourceId]) -> LoadResult | None:
    """The saved parts of the registries in `sources`; None on a cold start or an unusable file (logged).

    With a mapping (source → `config_fingerprint`), a part saved under another
    config of its registry is not restored (logged): its content and resume
    point describe something else.
    """
    path = directory / FILE_NAME
    _remove_leftovers(directory)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("state: no %s yet; cold start", path)
        return None
    except OSError as e:
        log.error("state: cannot read %s (%s); starting without it", path, e.strerror or e)
        return None
    try:
        with _collector_paused():
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
    return LoadResult(kept, result.written)


def restore(index: Index, result: LoadResult) -> int:
    """Put restored parts into the index as one version; the number of services restored."""
    count = 0
    with _collector_paused(), index.batch():
        for part in result.parts:
            index.restore(part.source, part.part, part.services, part.resume_point)
            count += len(part.services)
    return count


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
    ) -> None:
        """`configs`: the current registries' `config_fingerprint`s, saved with their parts."""
        self._index = index
        self._configs = configs
        self._directory = directory
        self._interval = interval
        self._saved_version = -1
        self._lock = threading.Lock()
        """One write at a time: a stop-time write waits for one still running in the worker thread."""
        self.writes = 0
        self.last_write_seconds = 0.0

    def _changed(self) -> bool:
        return self._index.snapshot.version != self._saved_version or self._index.state_dirty

    def _capture(self) -> tuple[int, list[PartCapture]]:
        return self._index.snapshot.version, self._index.capture()

    def _write(self, parts: list[PartCapture]) -> None:
        with self._lock:
            started = time.perf_counter()
            write_atomically(self._directory, encode(parts, time.time(), self._configs()))
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
                # endpoints) would otherwise keep a worker thread, and the GIL, busy for good.
                delay = last + max(self._interval, _COST_FACTOR * self.last_write_seconds) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                version, parts = self._capture()
                try:
                    await asyncio.to_thread(self._write, parts)
                except OSError as e:
                    log.error("state: cannot write %s: %s", self._directory / FILE_NAME, e)
                else:
                    self._saved_version = version
                last = time.monotonic()
        finally:
            if self._changed():
                self.save_now()

    def save_now(self) -> None:
        """Capture and write at once, blocking the caller (at stop)."""
        version, parts = self._capture()
        try:
            self._write(parts)
        except OSError as e:
            log.error("state: cannot write %s: %s", self._directory / FILE_NAME, e)
        else:
            self._saved_version = version
