"""The real `discoveryd` as a subprocess: run, readiness, SIGHUP reload, SIGTERM, check, version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.fakes.daemon import Daemon, cli, config_text, running_daemon, serviceentry, stop
from tests.fakes.xds import run_envoy
from tests.helpers import eventually, free_port, wait_sync


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1", "10.1.0.2"))
    with running_daemon(tmp_path, "  - {kind: files, name: local, paths: [se/]}\n") as d:
        yield d


def hosts(d: Daemon) -> set[str]:
    data = d.json("/debug/endpointz")
    assert isinstance(data, dict)
    return set(data)


def test_run_serves_the_files_and_reports_ready(daemon: Daemon) -> None:
    eps = daemon.json("/debug/endpointz?host=web.shop.example")
    assert isinstance(eps, dict)
    assert {e["address"] for e in eps["web.shop.example"]["endpoints"]} == {"10.1.0.1", "10.1.0.2"}
    reg = daemon.json("/debug/registryz")
    assert isinstance(reg, dict)
    assert reg["registries"]["files/local"]["synced"] is True
    _, metrics = daemon.get("/metrics")
    assert 'discoveryd_registry_services{registry="files/local"} 1.0' in metrics


def test_sighup_with_a_bad_config_keeps_the_running_one(daemon: Daemon) -> None:
    good = daemon.config.read_text()
    daemon.config.write_text(good + "bogus_section: 1\n")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_sync(lambda: "reload rejected" in daemon.logs(), what="reload rejected in the log")
    line = next(ln for ln in daemon.logs().splitlines() if "reload rejected" in ln)
    assert f"{daemon.config}:" in line and "bogus_section: unknown key" in line
    assert daemon.proc.poll() is None
    assert daemon.get("/readyz")[0] == 200
    assert hosts(daemon) == {"web.shop.example"}

    # A good config afterwards is applied: a new registry starts, the old one is not restarted.
    before = daemon.json("/debug/registryz")
    assert isinstance(before, dict)
    first_sync = before["registries"]["files/local"]["last_sync"]
    (daemon.config.parent / "more").mkdir()
    (daemon.config.parent / "more" / "api.yaml").write_text(serviceentry("api", "api.shop.example", "10.2.0.1"))
    daemon.config.write_text(
        config_text(
            daemon.admin,
            daemon.xds,
            daemon.dns,
            "  - {kind: files, name: local, paths: [se/]}\n  - {kind: files, name: more, paths: [more/]}\n",
        )
    )
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_sync(lambda: hosts(daemon) == {"web.shop.example", "api.shop.example"}, what="second registry served")
    after = daemon.json("/debug/registryz")
    assert isinstance(after, dict)
    assert after["registries"]["files/local"]["last_sync"] == first_sync

    # Removing a registry removes its data.
    daemon.config.write_text(
        config_text(daemon.admin, daemon.xds, daemon.dns, "  - {kind: files, name: more, paths: [more/]}\n")
    )
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_sync(lambda: hosts(daemon) == {"api.shop.example"}, what="first registry dropped")


def test_sigterm_stops_cleanly_with_exit_zero(daemon: Daemon) -> None:
    os.kill(daemon.proc.pid, signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert "stopped" in daemon.logs()
    assert "Traceback" not in daemon.logs()


def test_dump_prints_the_index(daemon: Daemon) -> None:
    out = cli("dump", "--admin", f"127.0.0.1:{daemon.admin}")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [s["hostname"] for s in data["services"]] == ["web.shop.example"]


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(config_text(port, free_port(), free_port(), "  []\n"))
        out = cli("run", "--config", str(cfg))
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr


def test_check_accepts_the_embedded_default_config() -> None:
    out = cli("check", cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_check_reports_file_and_line_of_every_problem(tmp_path: Path) -> None:
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\nspec:\n"
        "  hosts: [bad.example]\n  ports:\n    - {number: 80, name: Not_DNS, protocol: HTTP}\n"
    )
    cfg = tmp_path / "discoveryd.yaml"
    cfg.write_text("registries:\n  - {kind: files, name: local, paths: [se/]}\n")
    out = cli("check", "--config", str(cfg))
    assert out.returncode == 1
    assert f"{tmp_path / 'se' / 'bad.yaml'}:7:" in out.stderr
    assert "ports[0].name" in out.stderr


def test_check_shows_warnings_but_fails_only_on_errors(tmp_path: Path) -> None:
    """A route to a subset no DestinationRule defines is served as written (Istio's analyzer warns about
    it): `check` prints it as a warning and passes; an error next to it fails the check."""
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  hosts: [web.shop.example]\n  http:\n"
        "    - route:\n        - destination: {host: web.shop.example, subset: v9}\n"
    )
    cfg = tmp_path / "discoveryd.yaml"
    cfg.write_text("registries:\n  - {kind: files, name: local, paths: [se/]}\n")
    out = cli("check", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "warning: subset 'v9' of web.shop.example is not defined" in out.stderr
    assert "1 warning(s)" in out.stdout
    (tmp_path / "se" / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\nspec:\n"
        "  hosts: [bad.example]\n  ports:\n    - {number: 80, name: Not_DNS, protocol: HTTP}\n"
    )
    out = cli("check", "--config", str(cfg))
    assert out.returncode == 1
    assert "warning: subset 'v9'" in out.stderr and "ports[0].name" in out.stderr
    assert "1 problem(s) found, 1 warning(s)" in out.stderr


def test_check_reports_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "discoveryd.yaml"
    cfg.write_text("dns:\n  ttl: later\n")
    out = cli("check", "--config", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}:2: dns.ttl:" in out.stderr


def test_version_from_the_console_script() -> None:
    script = Path(sys.executable).parent / "discoveryd"
    out = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("discoveryd ")


def dns_a(port: int, name: str) -> set[str]:
    import dns.message
    import dns.query

    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
    return {rr.address for rrset in reply.answer for rr in rrset}


def test_sighup_moves_a_server_to_its_new_address(daemon: Daemon) -> None:
    assert dns_a(daemon.dns, "web.shop.example") == {"10.1.0.1", "10.1.0.2"}
    new_port = free_port()
    daemon.config.write_text(
        config_text(daemon.admin, daemon.xds, new_port, "  - {kind: files, name: local, paths: [se/]}\n")
    )
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_sync(lambda: dns_a(new_port, "web.shop.example") == {"10.1.0.1", "10.1.0.2"}, what="DNS on the new port")
    assert "dns server restarted with its new config" in daemon.logs()
    assert hosts(daemon) == {"web.shop.example"}


def test_sighup_to_an_address_in_use_keeps_the_server_where_it_was(daemon: Daemon) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        daemon.config.write_text(
            config_text(daemon.admin, daemon.xds, taken, "  - {kind: files, name: local, paths: [se/]}\n")
        )
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_sync(lambda: "cannot start with its new config" in daemon.logs(), what="bind failure logged")
    wait_sync(lambda: dns_a(daemon.dns, "web.shop.example") == {"10.1.0.1", "10.1.0.2"}, what="DNS on the old port")
    assert daemon.proc.poll() is None
    configz = daemon.json("/debug/configz")
    assert isinstance(configz, dict)
    assert configz["dns"]["listen"] == [f"127.0.0.1:{daemon.dns}"]


async def test_status_shows_a_real_envoy_in_sync(daemon: Daemon, tmp_path: Path) -> None:
    async with run_envoy(tmp_path, daemon.xds, "GRPC", "outbound|80||web.shop.example") as envoy:

        async def row() -> str | None:
            out = await asyncio.to_thread(cli, "status", "--admin", f"127.0.0.1:{daemon.admin}")
            assert out.returncode == 0, out.stderr
            lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith(("NAME", "server version"))]
            if len(lines) != 1:
                return None
            name, cluster, api, cds, lds, eds, rds, *_ = lines[0].split()
            synced = (name, cluster, api, cds, lds, eds, rds) == (
                "envoy-grpc",
                "integration",
                "ADS",
                "SYNCED",
                "-",
                "SYNCED",
                "-",
            )
            return lines[0] if synced else None

        await eventually(row, timeout=20, what="status shows the Envoy with CDS and EDS SYNCED")
        assert "outbound|80||web.shop.example" in await envoy.get("/clusters")


def test_a_log_file_beside_the_watched_files_does_not_feed_back(tmp_path: Path) -> None:
    # The daemon logs into the directory it watches (flat, for a path that does not exist yet).
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    with running_daemon(tmp_path, "  - {kind: files, name: local, paths: [se/, later/]}\n") as d:
        (tmp_path / "later").mkdir()
        (tmp_path / "later" / "api.yaml").write_text(serviceentry("api", "api.shop.example", "10.2.0.1"))
        wait_sync(lambda: hosts(d) == {"web.shop.example", "api.shop.example"}, what="the new directory is read")
        version = d.json("/debug/indexz")
        assert isinstance(version, dict)
        # Writing to the log file (every SIGHUP logs) changes nothing in the index.
        for n in range(1, 4):
            os.kill(d.proc.pid, signal.SIGHUP)
            wait_sync(lambda n=n: d.logs().count("config reloaded") == n, what=f"reload {n} logged")
        after = d.json("/debug/indexz")
        assert isinstance(after, dict)
        assert after["version"] == version["version"]
        assert "change detected" not in d.logs()


def test_ready_only_once_dns_answers_the_whole_synced_index(tmp_path: Path) -> None:
    # /readyz waits for the DNS table to take the synced index in: a replica put in service while
    # its table still fills would answer REFUSED (or NXDOMAIN under a zone) for names that exist.
    (tmp_path / "se").mkdir()
    count = 8000
    docs = [serviceentry(f"s{i}", f"s{i}.shop.example", f"10.2.{i // 250}.{i % 250 + 1}") for i in range(count)]
    (tmp_path / "se" / "many.yaml").write_text("---\n".join(docs))
    with running_daemon(tmp_path, "  - {kind: files, name: local, paths: [se/]}\n") as d:
        for i in (count - 1, 0, count // 2):
            query = dns.message.make_query(f"s{i}.shop.example", "A")
            reply = dns.query.udp(query, "127.0.0.1", port=d.dns, timeout=5)
            assert dns.rcode.to_text(reply.rcode()) == "NOERROR", f"s{i}: {reply}"
            assert [rd.to_text() for rr in reply.answer for rd in rr] == [f"10.2.{i // 250}.{i % 250 + 1}"]


def _indexed(d: Daemon) -> int:
    """Services the index holds for the files registry, from /metrics (0 while the admin server is not up)."""
    try:
        _, text = d.get("/metrics")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("discoveryd_registry_services{") and 'registry="files/local"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_sigterm_during_a_large_load_of_services_sharing_addresses_stops_promptly(tmp_path: Path) -> None:
    # 20,000 services on 3 addresses (one reverse name shared by ~6,700 hostnames) once froze the
    # event loop for minutes while the record table was built, and SIGTERM went unanswered.
    (tmp_path / "se").mkdir()
    docs = [serviceentry(f"s{i}", f"s{i}.shop.example", f"10.3.0.{i % 3 + 1}") for i in range(20_000)]
    (tmp_path / "se" / "shared.yaml").write_text("---\n".join(docs))
    admin, xds, dns_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "discoveryd.yaml"
    cfg.write_text(config_text(admin, xds, dns_port, "  - {kind: files, name: local, paths: [se/]}\n"))
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )
    d = Daemon(proc, cfg, log, admin, xds, dns_port)  # type: ignore[arg-type]
    try:
        wait_sync(lambda: _indexed(d) == 20_000, timeout=60, what="the index holds the file")
        # A query while the DNS table takes the 20,000 services in (it once ran the whole build on the packet path).
        with contextlib.suppress(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("s1.shop.example", "A"), "127.0.0.1", port=dns_port, timeout=1)
        os.kill(proc.pid, signal.SIGTERM)
        # Well inside a Kubernetes pod's 30 s grace and systemd's stop timeout, even on a busy machine.
        assert proc.wait(20) == 0, d.logs()
        assert "Traceback" not in d.logs()
    finally:
        stop(proc)  # type: ignore[arg-type]
