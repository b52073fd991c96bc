"""The sd_notify client: addresses, the watchdog interval it derives, and failures that never raise."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from discoveryd.sdnotify import Notifier, monotonic_usec


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready() is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval == interval


def test_fields_go_out_as_one_datagram_on_an_abstract_socket() -> None:
    name = f"discoveryd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        before = monotonic_usec()
        assert n.reloading()
        fields = dict(line.split("=", 1) for line in server.recv(4096).decode().split("\n"))
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= monotonic_usec()
        assert n.status("line one\nREADY=1")
        assert server.recv(4096) == b"STATUS=line one READY=1"  # a newline cannot smuggle a field
        n.close()


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False
    assert "sd_notify READY failed" in caplog.text
    n.close()


def test_an_unknown_transport_is_ignored() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
