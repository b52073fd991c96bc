"""The real `discoveryd` as a subprocess on loopback ports: started ready, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port, wait_sync

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  ports:
    - {{number: 80, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
{endpoints}
"""


def serviceentry(name: str, host: str, *ips: str) -> str:
    return SE.format(name=name, host=host, endpoints="".join(f"    - address: {ip}\n" for ip in ips))


def config_text(admin: int, xds: int, dns: int, registries: str) -> str:
    return (
        f"registries:\n{registries}"
        f"xds:\n  listen: 127.0.0.1:{xds}\n"
        f"dns:\n  listen: [127.0.0.1:{dns}]\n"
        f"admin:\n  listen: 127.0.0.1:{admin}\n"
    )


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discoveryd.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    config: Path
    log: Path
    admin: int
    xds: int
    dns: int

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path: str) -> object:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def logs(self) -> str:
        return self.log.read_text()


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def running_daemon(tmp_path: Path, registries: str) -> Iterator[Daemon]:
    """`discoveryd run` on fresh loopback ports, ready; stopped by PID on exit.

    Free ports can be taken by another process between choosing and binding:
    a daemon that exits because a port is in use is started again on new ones.
    """
    cfg = tmp_path / "discoveryd.yaml"
    log = tmp_path / "daemon.log"
    for attempt in range(3):
        admin, xds, dns = free_port(), free_port(), free_port()
        cfg.write_text(config_text(admin, xds, dns, registries))
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        d = Daemon(proc, cfg, log, admin, xds, dns)
        try:
            wait_sync(
                lambda d=d: d.proc.poll() is not None or d.get("/readyz")[0] == 200, timeout=30, what="daemon ready"
            )
            if proc.poll() is None:
                break
            if "cannot listen" not in d.logs() or attempt == 2:
                raise AssertionError(f"discoveryd exited {proc.returncode}: {d.logs()}")
        except BaseException:
            stop(proc)
            raise
    try:
        yield d
    finally:
        stop(proc)
