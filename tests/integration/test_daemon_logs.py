"""The real `discoveryd run`'s log output: no forged lines, JSON on request, permission warnings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fakes.daemon import running_daemon, serviceentry, stop
from tests.helpers import free_port, wait_sync

RECORD_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
EVIL = "evil.yaml\n2026-11-30 04:00:00,000 CRITICAL discoveryd: forged by a file name"


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(tmp_path: Path) -> None:
    se = tmp_path / "se"
    se.mkdir()
    (se / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    (se / (EVIL.replace("evil.yaml", "evil") + ".yaml")).write_text("spec: [unclosed\n")
    os.chmod(tmp_path, 0o700)
    with running_daemon(tmp_path, "  - {kind: files, name: local, paths: [se/]}\n") as d:
        wait_sync(lambda: "forged by a file name" in d.logs(), what="the bad file reported")
    lines = d.logs().splitlines()
    assert not [ln for ln in lines if re.match(r"^\S+ \S+ CRITICAL ", ln)]
    for line in lines:
        assert RECORD_LINE.match(line) or line.startswith("    "), f"line not from a record: {line!r}"
    assert any("evil\\n2026-11-30 04:00:00,000 CRITICAL" in ln for ln in lines)


def _config(tmp_path: Path, extra: str = "") -> tuple[Path, int]:
    admin = free_port()
    (tmp_path / "se").mkdir(exist_ok=True)
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    cfg = tmp_path / "discoveryd.yaml"
    cfg.write_text(
        "registries:\n  - {kind: files, name: local, paths: [se/]}\n"
        f"xds:\n  listen: 127.0.0.1:{free_port()}\n"
        f"dns:\n  listen: [127.0.0.1:{free_port()}]\n"
        f"admin:\n  listen: 127.0.0.1:{admin}\n" + extra
    )
    return cfg, admin


def _run_until_ready(cfg: Path, *args: str) -> str:
    """Start the daemon, wait for its "all registries synced" line, stop it; its stderr."""
    log = cfg.parent / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(cfg), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_sync(
            lambda: proc.poll() is not None or "all registries synced" in log.read_text(), timeout=30, what="ready"
        )
        assert proc.poll() is None, log.read_text()
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def test_log_format_json_from_the_flag_and_from_the_config(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    cfg, _ = _config(tmp_path)
    for text in (
        _run_until_ready(cfg, "--log-format", "json"),
        _run_until_ready(_config(tmp_path, "log_format: json\n")[0]),
    ):
        records = [json.loads(line) for line in text.splitlines()]
        assert {"time", "level", "logger", "message", "template"} <= set(records[0])
        assert any(r["message"].startswith("all registries synced") for r in records)
        assert records[-1]["message"] == "stopped"


def test_a_config_writable_by_others_is_warned_about(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    cfg, _ = _config(tmp_path)
    os.chmod(cfg, 0o666)
    text = _run_until_ready(cfg)
    assert f"config: {cfg} is writable by group and others (mode 0666)" in text
    os.chmod(cfg, 0o640)
    assert "is writable by" not in _run_until_ready(cfg)
    check = subprocess.run(
        [sys.executable, "-m", "discoveryd.cli", "check", "--config", str(cfg)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "is writable by" not in check.stderr
    os.chmod(cfg, 0o620)
    check = subprocess.run(
        [sys.executable, "-m", "discoveryd.cli", "check", "--config", str(cfg)], capture_output=True, text=True
    )
    assert check.returncode == 0
    assert f"warning: {cfg} is writable by group (mode 0620)" in check.stderr
