"""The start order after a warm start, and a stop signal that comes in the middle of it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from discoveryd import config as config_mod
from discoveryd import state, supervisor
from discoveryd.index import PartCapture
from discoveryd.model import Endpoint, Hostname, Port, Service
from tests.helpers import eventually, free_port


def _warm_config(tmp_path: Path) -> config_mod.Config:
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
        [PartCapture(reg.source, "", (saved,), None)], time.time(), {reg.source: state.config_fingerprint(reg)}
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
