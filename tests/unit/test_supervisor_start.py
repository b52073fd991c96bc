"""The start order after a warm start, and a stop signal that comes in the middle of it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from discoveryd import config as config_mod
from discoveryd import state, supervisor
from discoveryd.index import PartCapture
from discoveryd.model import Endpoint, Hostname, Port, Service
from tests.helpers import eventually, free_port


def _warm_config(tmp_path: Path, resume_point: str | None = None) -> config_mod.Config:
    (tmp_path / "se").mkdir()
    path = tmp_path / "discoveryd.yaml"
    path.write_text(
        "registries:\n"
        "  - {kind: files, name: local, paths: [se/]}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"xds:\n  listen: 127.0.0.1:{free_port()}\n"
        f"dns:\n  listen: [127.0.0.1:{free_port()}]\n"
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
    )
    cfg = config_mod.load(path)
    reg = cfg.registries[0]
    saved = Service(Hostname("web.example"), ports=(Port(80, "http"),), endpoints=(Endpoint("10.0.0.1"),))
    data = state.encode(
        [PartCapture(reg.source, "", (saved,), resume_point)], time.time(), {reg.source: state.config_fingerprint(reg)}
    )
    state.write_atomically(tmp_path / "state", data)
    return cfg


async def test_a_stop_while_xds_waits_for_its_first_client_exits_at_once_and_starts_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in the window after a warm start where the rest waits for xDS's first answer: no
    registry connects, no DNS build starts, no admin server binds; `run()` returns 0 promptly."""
    monkeypatch.setattr(supervisor, "_FIRST_ANSWER_GRACE", 30.0)  # the window, widened to be seen
    sup = supervisor.Supervisor(_warm_config(tmp_path))
    run = asyncio.create_task(sup.run())
    try:
        await eventually(lambda: sup._xds is not None and sup._xds.started.is_set(), what="xds listening")
        assert sup._xds is not None and sup._xds.serving  # a warm start: the wait for a first client is on
        stopped = time.monotonic()
        sup.stop()
        async with asyncio.timeout(5.0):
            assert await run == 0
        assert time.monotonic() - stopped < 5.0
        assert not sup._registries and "dns" not in sup._servers and "admin" not in sup._servers
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.1}]
"""


def _two_registries(tmp_path: Path, order: tuple[str, str], connect_timeout: str, a_dir: str = "a") -> Path:
    path = tmp_path / "discoveryd.yaml"
    regs = {"a": f"  - {{kind: files, name: a, paths: [{a_dir}/]}}\n", "b": "  - {kind: files, name: b, paths: [b/]}\n"}
    path.write_text(
        "registries:\n" + "".join(regs[name] for name in order) + f"state_dir: {tmp_path / 'state'}\n"
        f"xds:\n  listen: 127.0.0.1:{_XDS_PORT}\n  connect_timeout: {connect_timeout}\n"
        f"dns:\n  listen: [127.0.0.1:{_DNS_PORT}]\n"
        f"admin:\n  listen: 127.0.0.1:{_ADMIN_PORT}\n"
    )
    return path


_XDS_PORT, _DNS_PORT, _ADMIN_PORT = free_port(), free_port(), free_port()


async def test_a_reload_half_applied_never_labels_what_is_saved_with_the_new_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that re-ranks the registries, changes the xDS section and one registry's config: until
    the xDS server is restarted and the index re-ranked, what the state saver is told about the served
    resources is how they were built (the old section, the old order), and a registry's content is
    saved under the config it was read with, never the new config's; a next start with the new config
    would otherwise take resources merged and built the old way, or the old config's content, as its own."""
    for name in ("a", "a2", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "web.yaml").write_text(SE)
    (tmp_path / "b" / "web.yaml").write_text(SE.replace("10.9.0.1", "10.9.0.2"))
    savers: list[state.StateSaver] = []

    class Saver(state.StateSaver):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            savers.append(self)

    monkeypatch.setattr(supervisor, "StateSaver", Saver)
    sup = supervisor.Supervisor(config_mod.load(_two_registries(tmp_path, ("a", "b"), "5s")))
    old = sup.config
    run = asyncio.create_task(sup.run())
    gate = asyncio.Event()
    held = asyncio.Event()
    stop_registry = supervisor.Supervisor._stop_registry

    async def slow_stop(self: supervisor.Supervisor, source: Any) -> None:  # apply() held half-way
        held.set()
        await gate.wait()
        await stop_registry(self, source)

    try:
        await eventually(lambda: sup._xds_served() is not None, what="xds serving")
        before = sup._xds_served()
        assert before is not None and before[:2] == (
            state.xds_fingerprint(old.xds),
            (old.registries[0].source, old.registries[1].source),
        )
        monkeypatch.setattr(supervisor.Supervisor, "_stop_registry", slow_stop)
        new = config_mod.load(_two_registries(tmp_path, ("b", "a"), "7s", a_dir="a2"))
        applying = asyncio.create_task(sup.apply(new))
        await asyncio.wait_for(held.wait(), 5.0)
        during = sup._xds_served()
        assert during is None or during[:2] == before[:2]
        # The registry being restarted: its content was read under the old config, whatever is saved now.
        a = old.registries[0]
        (saver,) = savers
        assert saver._configs().get(a.source) in (None, state.config_fingerprint(a))
        gate.set()
        await asyncio.wait_for(applying, 10.0)
        await eventually(lambda: (sup._xds_served() or ("",))[0] == state.xds_fingerprint(new.xds), what="new xds")
        after = sup._xds_served()
        assert after is not None and after[1] == (new.registries[0].source, new.registries[1].source)
    finally:
        gate.set()
        sup.stop()
        async with asyncio.timeout(10.0):
            await asyncio.gather(run, return_exceptions=True)


async def test_a_registry_restarted_with_another_config_does_not_resume_from_the_old_configs_point(
    tmp_path: Path,
) -> None:
    """A SIGHUP right after a warm start changes a registry's config (another etcd prefix): the restored
    content is served until the new instance syncs, but its resume point (an etcd revision of the old
    prefix) would have the new instance take the old prefix's content as current."""
    cfg = _warm_config(tmp_path, resume_point="1a:42")
    reg = cfg.registries[0]
    (tmp_path / "se2").mkdir()
    sup = supervisor.Supervisor(cfg)
    seen: list[str | None] = []
    build = supervisor.build_registry

    def spying_build(reg_cfg: Any, base: Any) -> Any:
        registry = build(reg_cfg, base)
        seen.append(sup.index.writer(reg_cfg.source).resume_point)  # what the instance would read at start
        return registry

    run = asyncio.create_task(sup.run())
    try:
        await eventually(lambda: sup.started.is_set(), what="started")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(supervisor, "build_registry", spying_build)
            assert sup.index.writer(reg.source).resume_point == "1a:42"
            text = cfg.path.read_text().replace("paths: [se/]", "paths: [se2/]")
            cfg.path.write_text(text)
            await sup.apply(config_mod.load(cfg.path))
        assert seen == [None]
        assert sup.index.writer(reg.source).resume_point is None
    finally:
        sup.stop()
        async with asyncio.timeout(10.0):
            await asyncio.gather(run, return_exceptions=True)


async def test_a_restore_that_fails_half_way_starts_cold_instead_of_ending_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a state file does to the restore (a bug on a value the checks let through), the daemon
    starts cold and serves none of it: a crash would repeat on every restart with the same file."""
    from discoveryd.index import Index

    cfg = _warm_config(tmp_path)
    source = cfg.registries[0].source

    def failing(self: Index, *args: Any, **kwargs: Any) -> None:
        raise ValueError("unexpected value")

    monkeypatch.setattr(Index, "restore", failing)
    sup = supervisor.Supervisor(cfg)
    run = asyncio.create_task(sup.run())
    try:
        await eventually(lambda: sup.started.is_set() or run.done(), what="started")
        assert not run.done()
        assert "restoring" in caplog.text and "starting cold" in caplog.text
        status = sup.index.snapshot.shards[source]
        assert not status.restored and not sup.index.snapshot.services
    finally:
        sup.stop()
        async with asyncio.timeout(10.0):
            await asyncio.gather(run, return_exceptions=True)


async def test_a_reload_that_moves_state_dir_says_it_takes_effect_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The saver writes where it started; a reload that names another state_dir changed nothing and said
    nothing, and the next start read the new (empty) directory: a cold start nobody expected."""
    cfg = _warm_config(tmp_path)
    sup = supervisor.Supervisor(cfg)
    run = asyncio.create_task(sup.run())
    try:
        await eventually(lambda: sup.started.is_set(), what="started")
        cfg.path.write_text(cfg.path.read_text().replace(f"state_dir: {tmp_path / 'state'}", "state_dir: elsewhere"))
        with caplog.at_level(logging.WARNING, logger="discoveryd.supervisor"):
            await sup.apply(config_mod.load(cfg.path))
        assert "takes effect at the next start" in caplog.text
        assert sup.config.state_dir == tmp_path / "state"  # what runs
    finally:
        sup.stop()
        async with asyncio.timeout(10.0):
            await asyncio.gather(run, return_exceptions=True)
