"""The contract between registry adapters and the daemon.

An adapter is found through the `discoveryd.adapters` entry-point group: the
entry point's name is the registry `kind` and its object is an `AdapterSpec`
(the adapter's config model and a factory). For every configured registry the
supervisor validates that registry's YAML with the config model, builds a
`Registry` with the factory and runs `Registry.run(shard)` in its own task
until the task is cancelled (config reload removed it, or shutdown).

The adapter owns exactly one shard of the index, reached only through the
`ShardWriter` it is given: it replaces everything, or upserts/deletes one
service, and reports its sync state and input problems. It never sees the
index, the servers, or another adapter.

Optional capabilities are separate small Protocols (`OfflineChecker`,
`ZoneProvider`), checked with isinstance, never added to `Registry`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict

from discoveryd.model import Hostname, Problem, Service, SourceId, Zone, ZoneFlavor, source_id
from discoveryd.policy import HostPolicy

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterContext",
    "AdapterSpec",
    "Duration",
    "OfflineChecker",
    "PolicyWriter",
    "Registry",
    "RegistryConfig",
    "ShardWriter",
    "SteppedWriter",
    "Zone",
    "ZoneFlavor",
    "ZoneProvider",
]

ENTRY_POINT_GROUP = "discoveryd.adapters"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`100ms`, `5s`, `1m`, `1h`, or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 100ms, 5s or 1m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration such as 100ms, 5s or 1m")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A config value in seconds, written `100ms`, `5s`, `1m`, `1h` or as a number: the one duration syntax."""


class RegistryConfig(BaseModel):
    """Keys every registry has. Adapters subclass this with their own keys.

    Unknown keys are errors (`extra="forbid"`), values are immutable once read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str

    @property
    def source(self) -> SourceId:
        return source_id(self.kind, self.name)


class ShardWriter(Protocol):
    """An adapter's only handle on the index: its own shard, or a named part of it.

    Every call takes effect at once (a new index version) unless made inside
    `batch()`. Calls are made from the event loop thread that runs the
    adapter's task.

    Parts: `shard.part(name)` opens (or returns again) a named part of the
    registry's shard — Istio's (cluster, provider) shard key: a Kubernetes
    cluster's Services vs its ServiceEntry CRDs, one Consul datacenter each.
    A part is its own shard in the index with its own content, sync state,
    staleness and problems (shown per part in /debug and in metrics, label
    `part`); the same hostname may live in several parts and merges by the
    same rule as across registries (a registry's root ranks before its named
    parts, named parts by name). A registry is ready when every part it
    opened (and the root, if the adapter wrote to it or marked it, or opened
    no part) has synced or failed. Dropping a registry drops all its parts.
    The root writer is the part named `""`; it cannot be closed. A writer of
    a part that was closed raises RuntimeError on every call.

    Batches: `with shard.batch(): ...` stages the writes made to *this* part
    inside the block and applies them on a clean exit as one index version,
    all or nothing: an exception inside applies nothing, and awaiting inside
    delays no other part's or registry's publication. The relist pattern:
    read everything first (awaiting as needed), then `replace()` once, or
    stage upserts/deletes in one batch; never delete then re-add.

    Adapters should build services and endpoints with `source=shard.source`:
    the shard stamps any that lack it, but that copies every such endpoint.
    """

    @property
    def source(self) -> SourceId:
        """The registry's SourceId (`<kind>/<name>`), the same for every part."""

    @property
    def part_name(self) -> str:
        """This part's name; `""` for the registry's root shard."""

    def part(self, name: str) -> ShardWriter:
        """The writer of the named part of this registry's shard, created empty (not ready) if new."""

    def close_part(self, name: str) -> None:
        """Drop a part and all its data (a datacenter no longer watched); a missing one is no error."""

    def replace(self, services: Iterable[Service]) -> None:
        """Make the shard hold exactly these services (a full sync)."""

    def upsert(self, service: Service) -> None:
        """Add or replace the service with this hostname."""

    def delete(self, hostname: Hostname) -> None:
        """Remove the service with this hostname; a missing one is no error."""

    def mark_synced(self) -> None:
        """The shard reflects the registry now: clears staleness, counts toward readiness."""

    def mark_failing(self, error: str) -> None:
        """The registry cannot be reached or read: content is kept, marked stale."""

    def set_problems(self, scope: str, problems: Sequence[Problem]) -> None:
        """Replace the input problems reported for `scope` (a file, a key prefix, ...).

        An empty sequence clears them. Problems are shown in /debug/registryz
        and counted in metrics; they never remove data by themselves.
        """

    def batch(self) -> AbstractContextManager[None]:
        """Stage this part's writes and apply them on exit as one version (see the class docstring)."""

    @property
    def resume_point(self) -> str | None:
        """The last value given to `set_resume_point` for this part, or one restored from the state directory.

        After a warm restart (`state_dir`) the restored part's content is served,
        stale, until the adapter's first sync replaces it; an adapter that can
        resume a watch from where it was (etcd revision, Kubernetes
        resourceVersion, Consul index) reads this before its first list. None
        when there is nothing to resume from.

        The first `mark_synced` of a restored part drops the restored hostnames
        the adapter has not written since (it listed afresh), unless the
        adapter read a restored resume point here: then it resumes, and the
        restored content is kept as the base its changes apply to. An adapter
        that reads the point but lists afresh anyway calls `replace()`.
        """

    def set_resume_point(self, value: str) -> None:
        """Record where this part's content was read up to, opaque to the daemon.

        Saved with the part in the state snapshot (throttled, atomically) and
        handed back through `resume_point` after a restart. Set it together with
        the content it describes (inside the same `batch()`): a resume point
        newer than the content would skip changes.
        """


@runtime_checkable
class Registry(Protocol):
    """A running connection to one registry (Istio's `serviceregistry.Instance`)."""

    @property
    def config(self) -> RegistryConfig:
        """The validated config this instance runs with (an adapter's own subclass)."""

    @property
    def source(self) -> SourceId:
        """The SourceId of the shard this registry writes (`config.source`)."""

    async def run(self, shard: ShardWriter) -> None:
        """Sync the shard with the registry until cancelled.

        Must not return while it can still make progress; it retries with
        backoff (tenacity) on errors and calls `shard.mark_failing` while the
        registry is unreachable. Cancellation is the only normal way out.
        """


@runtime_checkable
class PolicyWriter(Protocol):
    """A shard writer that also takes traffic policy (DestinationRule/VirtualService) per host.

    The index's writers implement it; an adapter checks with isinstance and
    writes through the same writer, inside the same `batch()` as its services.
    A policy applies to its host whatever registry provides the service; when
    several shards give one, the highest-ranked wins (the services' ranking).
    """

    def set_policy(self, host: Hostname, policy: HostPolicy | None) -> None:
        """Make `host`'s policy in this shard `policy`; None removes it."""


@runtime_checkable
class SteppedWriter(Protocol):
    """A shard writer that applies a large full sync without holding the event loop.

    The index's writers implement it; an adapter checks with isinstance. `await
    shard.replace_in_steps(services)` has the effect of `replace(services)`,
    but diffs and merges in steps of about 2 ms, yielding to the loop in
    between, so the servers keep answering while 100k services are compared.
    The new content is still published as one version: readers see the old
    world or the new one, never a part of each. Inside `batch()` the result is
    applied on the batch's exit with the other writes; if the part or the index
    moved on meanwhile, that exit applies the same content with `replace()`.
    """

    async def replace_in_steps(self, services: Iterable[Service]) -> None:
        """Make the shard hold exactly these services, working in steps (see the class docstring)."""


@runtime_checkable
class ZoneProvider(Protocol):
    """A registry whose names live under DNS zones of its own (cluster domain, Consul domain)."""

    def zones(self) -> Sequence[Zone]: ...


@runtime_checkable
class OfflineChecker(Protocol):
    """A registry whose input can be validated without connecting (files)."""

    def check(self) -> Sequence[Problem]: ...


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What the daemon tells a factory about where it runs."""

    base_dir: Path
    """The directory of the config file; relative paths in the config are relative to it."""


C = TypeVar("C", bound=RegistryConfig)


@dataclass(frozen=True, slots=True)
class AdapterSpec(Generic[C]):
    """The object an adapter's entry point names, generic over the adapter's config model.

    The supervisor builds registries through `build`, the one place that checks
    that a config is the adapter's own model: factories receive their `C`.
    """

    kind: str
    config_model: type[C]
    factory: Callable[[C, AdapterContext], Registry]

    def build(self, config: RegistryConfig, context: AdapterContext) -> Registry:
        """A new registry for `config` (validated with `config_model`); TypeError for another model."""
        if not isinstance(config, self.config_model):
            raise TypeError(
                f"registry {config.source}: config is a {type(config).__name__}, "
                f"the {self.kind} adapter needs a {self.config_model.__name__}"
            )
        return self.factory(config, context)
