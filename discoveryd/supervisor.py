"""The supervisor: one asyncio TaskGroup that owns every task of the daemon.

It builds the index, one task per configured registry (each writing only its
own shard), and the xDS, DNS and admin servers. Signals:

- SIGTERM / SIGINT: servers stop accepting, every task is cancelled and
  awaited, `run()` returns 0.
- SIGHUP: the config file is read again. A config that does not validate is
  logged, problem by problem, and the running one is kept. Otherwise
  registries that were added, removed or changed are started, stopped (their
  shard dropped) or restarted (their shard kept until the new instance
  syncs); a server whose section changed is restarted; the others run on.

A registry task that raises is a bug in that adapter, never a reason to stop
the daemon: it is logged, its shard is marked failing (content kept), and
the adapter is started again after a backoff.

Readiness (`Snapshot.ready`, the one rule for /readyz, READY=1, xDS and DNS):
every registry has completed its first sync or was restored from the state
directory. A registry that manages neither within `ready_timeout` is logged,
shown in /readyz, /debug/registryz and metrics, and stops blocking readiness
(`Index.set_timed_out`, by a deadline task per registry start).

Warm restarts (`state_dir`, discoveryd/state.py): before any registry starts
the saved index is loaded and restored (stale, counted as ready); a
`StateSaver` task writes it back, with the xDS resources served, at most once
a second and at stop.

Start order: the index (restored, and a shard opened for every configured
registry so that readiness counts it), then the xDS server (its first build
takes the saved resources), then — once xDS has answered a first client, at
most `_FIRST_ANSWER_GRACE` after it listens, or at once when it holds
responses (cold start) — the state saver, the registries, DNS and admin.

systemd (discoveryd/sdnotify.py, only under a `$NOTIFY_SOCKET`): `READY=1`
once the index is ready (the rule above); around each reload after that,
`RELOADING=1` then `READY=1` once the new config is applied or rejected;
`STATUS=` (registries synced/stale, xDS clients, DNS zones) on index changes,
at most once a second; `WATCHDOG=1` from the event loop when systemd asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from discoveryd import config as config_mod
from discoveryd import state
from discoveryd.config import Config, ConfigError
from discoveryd.index import Index
from discoveryd.model import Hostname, SourceId, Zone, ZoneFlavor
from discoveryd.registry import AdapterContext, Registry, RegistryConfig, ShardWriter, ZoneProvider
from discoveryd.sdnotify import Notifier
from discoveryd.session import Backoff, SessionEnded, SessionState, run_sessions
from discoveryd.state import StateSaver
from discoveryd.xds import XdsServer
from discoveryd.xds.resources import Prebuilt

if TYPE_CHECKING:
    from discoveryd.dns import DnsServer

log = logging.getLogger("discoveryd.supervisor")

_FIRST_ANSWER_GRACE = 0.25
"""After a warm start, how long the rest of the daemon waits for xDS to answer a first client."""

_RESTART_MIN = 1.0
_RESTART_MAX = 30.0


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a stop signal."""


class Server(Protocol):
    """What the supervisor needs of a server (xDS, DNS, admin): serve until cancelled, say when bound."""

    @property
    def started(self) -> asyncio.Event:
        """Set once the server listens."""

    async def serve(self) -> None:
        """Bind and serve until cancelled; an OSError when it cannot bind."""


def build_registry(cfg: RegistryConfig, base: Config) -> Registry:
    spec = config_mod.adapter(cfg.kind)
    assert spec is not None, "kinds are checked when the config is loaded"
    return spec.build(cfg, AdapterContext(base_dir=base.base_dir))


def zones_for(cfg: Config, registries: list[Registry]) -> list[Zone]:
    """The DNS zones: `dns.zones` when set (flavor from a registry's zone of that name), else the registries'."""
    offered: dict[Hostname, Zone] = {}
    for reg in registries:
        if isinstance(reg, ZoneProvider):
            for zone in reg.zones():
                known = offered.setdefault(zone.name, zone)
                sources = (*known.sources, *zone.sources, reg.source)
                offered[zone.name] = dataclasses.replace(known, sources=tuple(dict.fromkeys(sources)))
    if cfg.dns.zones:
        return [offered.get(Hostname(z), Zone(Hostname(z), ZoneFlavor.PLAIN)) for z in cfg.dns.zones]
    return list(offered.values())


@dataclass(slots=True)
class _RegistryTask:
    config: RegistryConfig
    registry: Registry
    task: asyncio.Task[None]
    deadline: asyncio.Task[None]
    """Marks the registry timed out after `ready_timeout` if it is not ready by then."""


@dataclass(slots=True)
class _ServerTask:
    section: object
    """The config section the server runs with (compared on reload)."""
    task: asyncio.Task[Any]
    server: Server


@dataclass(slots=True)
class Supervisor:
    config: Config
    index: Index = field(init=False)
    _tg: asyncio.TaskGroup | None = None
    _registries: dict[SourceId, _RegistryTask] = field(default_factory=dict)
    _servers: dict[str, _ServerTask] = field(default_factory=dict)
    _xds: XdsServer | None = None
    _dns: DnsServer | None = None
    _reload: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    notifier: Notifier = field(default_factory=Notifier)
    _ready_sent: bool = False
    _prebuilt: Mapping[Hostname, Prebuilt] | None = None
    """A warm start's saved xDS resources, for the first xDS server's first build."""

    def __post_init__(self) -> None:
        self.index = Index([r.source for r in self.config.registries])

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.config.state_dir is not None:
                    self._restore_state(self.config.state_dir)
                for reg_cfg in self.config.registries:
                    self.index.writer(reg_cfg.source)  # each counted (not ready) before xDS serves
                self._start_servers(self.config, ("xds",))
                await self._xds_first()
                if self._stop.is_set():  # stopped while xDS started: start nothing more
                    log.info("stopping")
                    raise _Shutdown
                if self.config.state_dir is not None:
                    saver = StateSaver(
                        self.index, self.config.state_dir, configs=self._running_fingerprints, xds=self._xds_served
                    )
                    tg.create_task(saver.run(), name="state-saver")
                for reg_cfg in self.config.registries:
                    self._start_registry(reg_cfg)
                self._start_servers(self.config, ("admin", "dns"))
                tg.create_task(self._reload_loop(), name="reload")
                tg.create_task(self._notify_ready(), name="sd-notify")
                if self.notifier.enabled:
                    tg.create_task(self.notifier.watchdog(), name="sd-watchdog")
                    tg.create_task(self._report_status(), name="sd-status")
                self.started.set()
                await self._stop.wait()
                self.notifier.stopping()
                log.info("stopping")
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._tg = None
            self.notifier.close()
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    async def _xds_first(self) -> None:
        """Wait until xDS listens and, when it serves a restored index, until it has answered a first
        client (at most `_FIRST_ANSWER_GRACE`).

        Clients reconnecting after a restart are already dialling: they get the complete restored
        world before the registries, the DNS table build and the admin server (their imports
        included) take the event loop. A server that cannot bind ends the TaskGroup, which cancels
        this wait. On a cold start nothing can be answered yet: the rest starts as soon as xDS listens.
        A stop signal ends the wait at once (the caller then starts nothing more).
        """
        xds = self._xds
        assert xds is not None
        stop = asyncio.ensure_future(self._stop.wait())
        started = asyncio.ensure_future(xds.started.wait())
        answered = asyncio.ensure_future(xds.answered.wait())
        try:
            await asyncio.wait({started, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set() or not xds.serving:
                return
            await asyncio.wait({answered, stop}, timeout=_FIRST_ANSWER_GRACE, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when a server that cannot bind cancels this wait
            for waiter in (stop, started, answered):
                waiter.cancel()

    # -- registries -----------------------------------------------------------------------

    def _xds_served(self) -> state.XdsServed | None:
        """For the state saver: what xDS serves, and how it was built: the section the running server
        was made with and the precedence the index merges with. Not `self.config`'s: during a reload
        it is the new config before the xDS server is restarted and the index re-ranked, and resources
        built the old way would be saved as the new way's (and taken as such at the next start)."""
        xds, entry = self._xds, self._servers.get("xds")
        if xds is None or entry is None or entry.server is not xds:
            return None
        built = xds.built()
        if built is None:
            return None
        assert isinstance(entry.section, config_mod.XdsConfig)
        return state.xds_fingerprint(entry.section), self.index.order, *built

    def _config_fingerprints(self) -> dict[SourceId, str]:
        return {r.source: state.config_fingerprint(r) for r in self.config.registries}

    def _running_fingerprints(self) -> dict[SourceId, str]:
        """For the state saver: the config each registry's content was read under, that of its running
        instance. Not `self.config`'s: during a reload it is the new config while the old instance is
        still being stopped, and content read under the old one would be saved as the new one's (and
        restored as such by the next start). A registry between two instances gets none: not restored."""
        return {source: state.config_fingerprint(entry.config) for source, entry in self._registries.items()}

    def _restore_state(self, directory: Path) -> None:
        started = time.monotonic()
        result = state.load(directory, self._config_fingerprints())
        if result is None:
            return
        try:
            count = state.restore(self.index, result)
        except Exception:
            # Nothing serves yet: take out whatever was restored, so that no partial world is ever served.
            log.exception("state: restoring %s failed; starting cold", directory / state.FILE_NAME)
            for source in dict.fromkeys(p.source for p in result.parts):
                self.index.drop(source)
            return
        order = [r.source for r in self.config.registries]
        if result.xds is not None and result.xds.usable(state.xds_fingerprint(self.config.xds), order):
            self._prebuilt = result.xds.resources
        elif result.xds is not None:
            log.info(
                "state: the saved xDS resources were built otherwise (code, xds config or registry order); rebuilt"
            )
        syncs = [p.last_sync for p in result.parts if p.last_sync is not None]
        log.info(
            "state: restored %d services in %d parts%s from %s (saved %.0fs ago%s) in %.0f ms; stale until resynced",
            count,
            len(result.parts),
            f" and the xDS resources of {len(self._prebuilt)}" if self._prebuilt is not None else "",
            directory / state.FILE_NAME,
            max(0.0, time.time() - result.written),
            f", the oldest part last synced {max(0.0, time.time() - min(syncs)):.0f}s ago" if syncs else "",
            (time.monotonic() - started) * 1e3,
        )

    def _start_registry(self, cfg: RegistryConfig) -> None:
        assert self._tg is not None
        registry = build_registry(cfg, self.config)
        shard = self.index.writer(cfg.source)
        self.index.set_timed_out(cfg.source, False)
        task = self._tg.create_task(_guard(registry, shard), name=f"registry:{cfg.source}")
        deadline = self._tg.create_task(
            self._ready_deadline(cfg.source, self.config.ready_timeout), name=f"ready-deadline:{cfg.source}"
        )
        self._registries[cfg.source] = _RegistryTask(cfg, registry, task, deadline)
        log.info("registry %s started", cfg.source)

    async def _stop_registry(self, source: SourceId) -> None:
        entry = self._registries.pop(source)
        entry.task.cancel()
        entry.deadline.cancel()
        await asyncio.gather(entry.task, entry.deadline, return_exceptions=True)

    async def _ready_deadline(self, source: SourceId, timeout: float) -> None:
        """After `timeout`, a registry that has neither synced nor been restored stops blocking readiness."""
        await asyncio.sleep(timeout)
        status = self.index.snapshot.shards.get(source)
        if status is None or status.ready:
            return
        log.warning(
            "registry %s has not synced within ready_timeout (%gs)%s; readiness no longer waits for it",
            source,
            timeout,
            f", last error: {status.last_error}" if status.last_error else "",
        )
        self.index.set_timed_out(source, True)

    # -- servers --------------------------------------------------------------------------

    def _make_admin(self, cfg: Config) -> tuple[object, Server]:
        from discoveryd.admin import AdminServer  # aiohttp: imported once xDS serves (see `_xds_first`)

        pages = {"syncz": self._syncz}
        admin = AdminServer(cfg.admin, self.index, lambda: self.config.to_dict(), pages, serving=self._pending)
        return cfg.admin, admin

    def _pending(self) -> str | None:
        """What keeps a ready index from being served yet: the DNS table still taking it in."""
        dns = self._dns
        if dns is not None and not dns.serving_ready.is_set():
            return "the DNS server to apply the synced index"
        return None

    def _make_xds(self, cfg: Config) -> tuple[object, Server]:
        self._xds = XdsServer(cfg.xds, self.index, prebuilt=self._prebuilt)
        self._prebuilt = None  # valid for the restored snapshot only
        return cfg.xds, self._xds

    def _make_dns(self, cfg: Config) -> tuple[object, Server]:
        from discoveryd.dns import DnsServer  # imported once xDS serves (see `_xds_first`)

        self._dns = DnsServer(cfg.dns, self.index, zones_for(cfg, [r.registry for r in self._registries.values()]))
        return cfg.dns, self._dns

    def _make_server(self, name: str, cfg: Config) -> tuple[object, Server]:
        makers: dict[str, Callable[[Config], tuple[object, Server]]] = {
            "admin": self._make_admin,
            "xds": self._make_xds,
            "dns": self._make_dns,
        }
        return makers[name](cfg)

    def _syncz(self) -> Any:
        return self._xds.syncz() if self._xds is not None else {}

    def _start_servers(self, cfg: Config, names: tuple[str, ...] = ("admin", "xds", "dns")) -> None:
        """Start servers: one that cannot bind ends the TaskGroup, and `run` exits 1."""
        assert self._tg is not None
        for name in names:
            section, server = self._make_server(name, cfg)
            task = self._tg.create_task(server.serve(), name=f"server:{name}")
            self._servers[name] = _ServerTask(section, task, server)

    async def _restart_server(self, name: str, new: Config, old: Config) -> Config:
        """Restart a server with its new section; if it cannot start, go back to the old one.

        Returns the config actually in force for that server. Only a server
        that fails again with the section it was running with ends the daemon.
        """
        assert self._tg is not None
        await self._stop_server(name)
        section, server = self._make_server(name, new)
        task = self._tg.create_task(_serve_or_report(server), name=f"server:{name}")
        self._servers[name] = _ServerTask(section, task, server)
        started = asyncio.ensure_future(server.started.wait())
        await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if server.started.is_set():
            log.info("%s server restarted with its new config", name)
            return new
        error = task.result() if task.done() and not task.cancelled() else None
        log.error("reload: the %s server cannot start with its new config (%s); keeping the previous one", name, error)
        self._servers.pop(name)
        fallback = dataclasses.replace(new, **{name: getattr(old, name)})
        self._start_servers(fallback, (name,))
        return fallback

    async def _stop_server(self, name: str) -> None:
        entry = self._servers.pop(name)
        entry.task.cancel()
        await asyncio.gather(entry.task, return_exceptions=True)

    # -- reload ---------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            # Before the first READY=1 systemd is still starting us: a reload then is
            # ours alone, and a READY=1 after it would announce readiness too early.
            announce = self._ready_sent
            if announce:
                self.notifier.reloading()
            try:
                await self.apply(config_mod.load(self.config.path))
            except ConfigError as e:
                for problem in e.problems:
                    log.error("reload rejected, keeping the running config: %s", problem)
            except Exception:
                log.exception("reload failed part-way; what was applied stays, the rest runs as before")
            finally:
                if announce:
                    self.notifier.ready(self.status_text())

    async def apply(self, new: Config) -> None:
        """Move the running daemon to `new`, touching only what changed."""
        old = self.config
        if new.state_dir != old.state_dir:
            log.warning(
                "reload: state_dir %s -> %s takes effect at the next start; the index is still saved to %s",
                old.state_dir,
                new.state_dir,
                old.state_dir,
            )
            new = dataclasses.replace(new, state_dir=old.state_dir)  # what runs, as /debug/configz shows
        self.config = new
        old_regs = {r.source: r for r in old.registries}
        new_regs = {r.source: r for r in new.registries}
        for source in old_regs.keys() - new_regs.keys():
            await self._stop_registry(source)
            self.index.drop(source)
            log.info("registry %s removed", source)
        for source, reg_cfg in new_regs.items():
            if source not in old_regs:
                self._start_registry(reg_cfg)
            elif old_regs[source] != reg_cfg or old.base_dir != new.base_dir:
                await self._stop_registry(source)
                if old_regs[source] != reg_cfg:
                    # Kept content is served until the new instance syncs, but a resume point (restored or
                    # not) was read under the old config: the new instance must not resume from it.
                    self.index.forget_resume_points(source)
                self._start_registry(reg_cfg)
                log.info("registry %s restarted with its new config", source)
        self.index.set_order([r.source for r in new.registries])
        for name in ("admin", "xds", "dns"):
            if self._servers[name].section != getattr(new, name):
                self.config = await self._restart_server(name, self.config, old)
        if self._dns is not None:
            self._dns.set_zones(zones_for(self.config, [r.registry for r in self._registries.values()]))
        log.info("config reloaded from %s", new.path)

    async def _notify_ready(self) -> None:
        snap = self.index.snapshot
        while not snap.ready:
            snap = await self.index.wait(snap.version)
        while self._dns is not None and not self._dns.serving_ready.is_set():
            dns = self._dns  # a reload may replace the server meanwhile: wait on the current one
            waiter = asyncio.ensure_future(dns.serving_ready.wait())
            try:
                await asyncio.wait({waiter}, timeout=1.0)
            finally:
                waiter.cancel()
        snap = self.index.snapshot
        late = sorted(source for source, st in snap.shards.items() if st.timed_out)
        if late:
            log.warning(
                "index ready without %s (not synced within ready_timeout; version %d, %d services)",
                ", ".join(late),
                snap.version,
                len(snap.services),
            )
        else:
            log.info(
                "all registries synced or restored (index version %d, %d services)", snap.version, len(snap.services)
            )
        self._ready_sent = True
        self.notifier.ready(self.status_text())

    def status_text(self) -> str:
        """One line for `systemctl status`: readiness, registries, xDS clients, DNS zones, index."""
        snap = self.index.snapshot
        shards = snap.shards.values()
        synced = sum(1 for s in shards if s.synced)
        stale = sorted(s.source for s in shards if s.stale)
        waiting = sorted(s.source for s in shards if not s.ready)
        parts = [
            "ready" if not waiting else f"waiting for {_names(waiting)}",
            f"registries {synced}/{len(snap.shards)} synced" + (f", stale: {_names(stale)}" if stale else ""),
        ]
        if self._xds is not None and "xds" in self._servers:
            parts.append(f"xDS clients {len(self._xds.connections)}")
        dns = self._servers.get("dns")
        if dns is not None:
            zones = zones_for(self.config, [r.registry for r in self._registries.values()])
            parts.append(f"DNS zones {len(zones)}")
        parts.append(f"index v{snap.version}, {len(snap.services)} services")
        return "; ".join(parts)

    async def _report_status(self) -> None:
        """STATUS= on every index change and every 5 s (xDS clients come and go), at most once a second."""
        last = ""
        while True:
            text = self.status_text()
            if text != last:
                self.notifier.status(text)
                last = text
            sent = time.monotonic()
            version = self.index.snapshot.version
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.index.wait(version)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))


async def _guard(registry: Registry, shard: ShardWriter) -> None:
    """Run an adapter; restart it with backoff if it raises or returns (a bug, never a reason to stop).

    The shared session policy (`discoveryd.session`): jitter, the shard marked
    failing before each wait, the backoff reset after a run that lasted.
    """

    async def run(state: SessionState) -> None:
        state.healthy()
        await registry.run(shard)

    def describe(error: BaseException) -> str:
        return "run() returned" if isinstance(error, SessionEnded) else f"adapter crashed: {error!r}"

    backoff = Backoff(initial=_RESTART_MIN, maximum=_RESTART_MAX, healthy_after=_RESTART_MAX)
    await run_sessions(shard, run, backoff=backoff, describe=describe, what="registry", logger=log, traceback=True)


async def _serve_or_report(server: Server) -> OSError | None:
    """Serve until cancelled; a bind failure is returned to the caller instead of ending the TaskGroup."""
    try:
        await server.serve()
    except OSError as e:
        return e
    return None


def _names(sources: list[SourceId], most: int = 3) -> str:
    shown = ", ".join(sources[:most])
    return shown + (f" and {len(sources) - most} more" if len(sources) > most else "")
