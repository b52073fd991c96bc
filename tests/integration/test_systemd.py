"""systemd: the notify protocol spoken by the real `discoveryd run`, and the unit file.

The daemon gets a datagram socket of ours as NOTIFY_SOCKET (what systemd
does for Type=notify/notify-reload) and a WATCHDOG_USEC; a thread records
every datagram with the CLOCK_MONOTONIC time it arrived. The unit is checked
with `systemd-analyze verify` and `systemd-analyze security --offline=yes`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.fakes.daemon import serviceentry, stop
from tests.fakes.etcd import EtcdServer
from tests.helpers import free_port, wait_sync

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "discoveryd.service"
INSTALL_PATH = "/opt/discoveryd/bin/discoveryd"


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass
class NotifySocket:
    """A bound AF_UNIX datagram socket; `messages` are (arrival µs, {field: value}) in order."""

    path: Path
    sock: socket.socket = field(init=False)
    messages: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._lock:
                self.messages.append((monotonic_usec(), fields))

    def snapshot(self) -> list[tuple[int, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def with_key(self, key: str) -> list[tuple[int, dict[str, str]]]:
        return [(t, m) for t, m in self.snapshot() if key in m]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


@dataclass
class Proc:
    proc: subprocess.Popen[str]
    log: Path
    admin: int
    dns: int

    def readyz(self) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def configz(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/debug/configz", timeout=5) as r:
            return str(r.read().decode())


def write_config(path: Path, registries: str, admin: int, dns_port: int) -> None:
    path.write_text(
        f"registries:\n{registries}"
        f"xds:\n  listen: 127.0.0.1:{free_port()}\n"
        f"dns:\n  listen: [127.0.0.1:{dns_port}]\n"
        f"admin:\n  listen: 127.0.0.1:{admin}\n"
    )


@contextlib.contextmanager
def started(cfg: Path, admin: int, dns_port: int, env: dict[str, str]) -> Iterator[Proc]:
    log = cfg.parent / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
    try:
        yield Proc(proc, log, admin, dns_port)
    finally:
        stop(proc)


@contextlib.contextmanager
def blackhole(port: int) -> Iterator[None]:
    """A TCP listener on loopback that accepts connections and never answers (a stalled peer)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = server.accept()
                held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_ready_only_when_ready_then_status_and_watchdog_at_half_the_interval(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """READY=1 never precedes /readyz 200; STATUS= tells the registries; WATCHDOG=1 every WATCHDOG_USEC/2."""
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    (tmp_path / "etcd").mkdir()
    etcd = EtcdServer(tmp_path / "etcd")
    admin, dns_port = free_port(), free_port()
    cfg = tmp_path / "discoveryd.yaml"
    write_config(
        cfg,
        "  - {kind: files, name: local, paths: [se/]}\n"
        f"  - {{kind: etcd, name: main, endpoints: ['{etcd.url}'], domain: mesh.local}}\n",
        admin,
        dns_port,
    )
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"}
    try:
        with started(cfg, admin, dns_port, env) as d:
            with blackhole(etcd.client_port):
                # etcd accepts and never answers: the registry is neither synced nor failed yet.
                wait_sync(lambda: d.proc.poll() is not None or d.readyz() == 503, timeout=30, what="admin up")
                assert d.proc.poll() is None, d.log.read_text()
                not_ready_seen = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    before = notify.with_key("READY")
                    if d.readyz() == 503:
                        not_ready_seen += 1
                        assert not before, "READY=1 sent while /readyz said 503"
                    time.sleep(0.05)
                assert not_ready_seen > 0
            etcd.start()  # the same address now answers
            ready = wait_sync(lambda: notify.with_key("READY"), timeout=30, what="READY=1")
            assert d.readyz() == 200
            assert len(ready) == 1
            assert ready[0][1]["STATUS"].startswith("ready; registries ")
            synced = wait_sync(
                lambda: [m for _, m in notify.with_key("STATUS") if "registries 2/2 synced" in m["STATUS"]],
                timeout=30,
                what="STATUS with both registries synced",
            )
            assert re.fullmatch(
                r"ready; registries 2/2 synced; xDS clients 0; DNS zones \d+; index v\d+, 1 services",
                synced[-1]["STATUS"],
            ), synced[-1]

            pings = wait_sync(lambda: (p := notify.with_key("WATCHDOG")) and len(p) >= 8 and p, what="8 pings")
            gaps = [(b - a) / 1e6 for (a, _), (b, _) in itertools.pairwise(pings)]
            assert 0.25 <= statistics.median(gaps) <= 0.6, gaps
            assert all(m["WATCHDOG"] == "1" for _, m in pings)

            os.kill(d.proc.pid, signal.SIGTERM)
            assert d.proc.wait(15) == 0
        assert notify.with_key("STOPPING")
    finally:
        etcd.stop()


def test_reload_sends_reloading_with_monotonic_usec_then_ready_once_applied(
    tmp_path: Path, notify: NotifySocket
) -> None:
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "api.yaml").write_text(serviceentry("api", "api.shop.example", "10.2.0.1"))
    admin, dns_port = free_port(), free_port()
    cfg = tmp_path / "discoveryd.yaml"
    write_config(cfg, "  - {kind: files, name: local, paths: [se/]}\n", admin, dns_port)
    with started(cfg, admin, dns_port, {"NOTIFY_SOCKET": str(notify.path)}) as d:
        wait_sync(lambda: notify.with_key("READY"), timeout=30, what="READY=1")
        assert not notify.with_key("WATCHDOG"), "no WATCHDOG_USEC: no pings"

        write_config(
            cfg,
            "  - {kind: files, name: local, paths: [se/]}\n  - {kind: files, name: more, paths: [more/]}\n",
            admin,
            dns_port,
        )
        count = len(notify.snapshot())
        sent_at = monotonic_usec()
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_sync(lambda: len(notify.with_key("READY")) == 2, what="READY=1 after the reload")
        after = notify.snapshot()[count:]
        kinds = [next(k for k in ("RELOADING", "READY", "STATUS") if k in m) for _, m in after]
        assert kinds.index("RELOADING") < kinds.index("READY"), kinds
        arrived, reloading = next((t, m) for t, m in after if "RELOADING" in m)
        assert reloading["RELOADING"] == "1"
        assert sent_at <= int(reloading["MONOTONIC_USEC"]) <= arrived
        # READY=1 means applied: the new registry is in the effective config already.
        assert "files/more" in d.configz() or '"name": "more"' in d.configz()

        # A config that does not validate: the reload still ends with READY=1, the old config runs on.
        cfg.write_text(cfg.read_text() + "bogus: 1\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_sync(lambda: len(notify.with_key("READY")) == 3, what="READY=1 after a rejected reload")
        assert len(notify.with_key("RELOADING")) == 2
        reply = dns.query.udp(dns.message.make_query("api.shop.example", "A"), "127.0.0.1", port=dns_port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer

        # MemoryDenyWriteExecute=yes in the unit: nothing in the process is mapped writable and executable.
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text().splitlines()
        wx = [ln for ln in maps if "w" in ln.split()[1] and "x" in ln.split()[1]]
        assert not wx, wx


# -- the unit file ------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs the systemd package)")
    probe = subprocess.run([tool, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    return tool


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


def test_the_unit_runs_the_documented_install_path() -> None:
    text = UNIT.read_text()
    assert re.search(
        rf"^ExecStart={re.escape(INSTALL_PATH)} run --config /etc/discoveryd/discoveryd\.yaml$", text, re.M
    )
    for line in (
        "Type=notify-reload",
        "StateDirectory=discoveryd",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+s$", text, re.M)
    assert not re.search(r"^PrivateUsers=yes", text, re.M), "would take CAP_NET_BIND_SERVICE away from port 53"
    packaged = (ROOT / "systemd" / "discoveryd.yaml").read_text()
    assert re.search(r"^state_dir: /var/lib/discoveryd$", packaged, re.M)


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    # The unit as installed by install.sh (with the drop-in for systemd < 253), its
    # ExecStart pointed at this checkout's discoveryd: verify checks it is executable.
    root = tmp_path / "root"
    subprocess.run(["sh", str(ROOT / "systemd" / "install.sh"), "--root", str(root)], check=True, capture_output=True)
    units = root / "etc" / "systemd" / "system"
    unit = units / "discoveryd.service"
    assert unit.read_text() == UNIT.read_text()
    binary = Path(sys.executable).parent / "discoveryd"
    unit.write_text(UNIT.read_text().replace(f"ExecStart={INSTALL_PATH}", f"ExecStart={binary}"))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    problems = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if _systemd_version(tool) < 253:
        # Only this one: the drop-in install.sh wrote turns the unit into Type=notify.
        problems = [ln for ln in problems if not ln.endswith("Failed to parse service type, ignoring: notify-reload")]
        dropin = (units / "discoveryd.service.d" / "10-before-systemd-253.conf").read_text()
        assert "Type=notify\n" in dropin and "ExecReload=/bin/kill -HUP $MAINPID" in dropin
    assert not problems, problems
    installed_cfg = root / "etc" / "discoveryd" / "discoveryd.yaml"
    assert installed_cfg.stat().st_mode & 0o777 == 0o640


def test_the_sandbox_exposure_is_at_most_two(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run([tool, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for discoveryd\.service: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.0, result.stdout


def test_the_packaged_config_validates(tmp_path: Path) -> None:
    root = tmp_path / "root"
    subprocess.run(["sh", str(ROOT / "systemd" / "install.sh"), "--root", str(root)], check=True, capture_output=True)
    cfg = root / "etc" / "discoveryd" / "discoveryd.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "discoveryd.cli", "check", "--config", str(cfg)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "ok (1 registries)" in result.stdout


# -- the unit's seccomp policy, applied without systemd ------------------------------------------


def _groups(tool: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in subprocess.run(
        [tool, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return out


def unit_policy(tool: str) -> dict[str, object]:
    """The seccomp policy systemd derives from the unit's SystemCallFilter=, RestrictAddressFamilies=, MDWE."""
    import errno as errno_mod

    groups = _groups(tool)
    allow: set[str] | None = None
    families: list[int] = []
    errno_value = errno_mod.EPERM
    mdwe = False
    for line in UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "SystemCallFilter":
            deny = value.startswith("~")
            names = _expand(value.lstrip("~").split(), groups)
            if allow is None:
                assert not deny, "the unit's first SystemCallFilter= is an allow-list"
                allow = names
            elif deny:
                allow -= names
            else:
                allow |= names
        elif key == "SystemCallErrorNumber":
            errno_value = getattr(errno_mod, value)
        elif key == "RestrictAddressFamilies":
            families = [int(getattr(socket, f)) for f in value.split()]
        elif key == "MemoryDenyWriteExecute":
            mdwe = value == "yes"
    assert allow, "no SystemCallFilter= allow-list in the unit"
    return {"allow": sorted(allow), "errno": errno_value, "families": families, "mdwe": mdwe}


@pytest.fixture
def sandboxed(tmp_path: Path) -> list[str]:
    """argv prefix that runs a command under the unit's seccomp policy."""
    tool = _systemd_analyze()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.append('/usr/lib/python3/dist-packages'); import seccomp"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip("libseccomp's Python binding (Debian package python3-seccomp) is not installed")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(unit_policy(tool)))
    return [sys.executable, str(Path(__file__).parent / "sandbox_exec.py"), str(policy), "--"]


def test_the_sandbox_policy_is_in_force(sandboxed: list[str]) -> None:
    """The control: what the unit forbids does fail under the emulated policy."""
    code = (
        "import errno, mmap, os, socket\n"
        "def fails(f, want):\n"
        "    try: f()\n"
        "    except OSError as e: return e.errno == want\n"
        "    return False\n"
        "print(fails(lambda: os.setgroups([]), errno.EPERM),"
        " fails(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5), errno.EPERM),"
        " fails(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW), errno.EAFNOSUPPORT),"
        " fails(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC), errno.EPERM))\n"
    )
    result = subprocess.run([*sandboxed, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "True"], result.stdout + result.stderr


def test_the_daemon_serves_dns_xds_and_reloads_under_the_units_sandbox(tmp_path: Path, sandboxed: list[str]) -> None:
    import grpc
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "web.yaml").write_text(serviceentry("web", "web.shop.example", "10.1.0.1"))
    admin, dns_port, xds_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "discoveryd.yaml"

    def config(registries: str) -> str:
        return (
            f"registries:\n{registries}xds:\n  listen: 127.0.0.1:{xds_port}\n"
            f"dns:\n  listen: [127.0.0.1:{dns_port}]\nadmin:\n  listen: 127.0.0.1:{admin}\n"
        )

    cfg.write_text(config("  - {kind: files, name: local, paths: [se/]}\n"))
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*sandboxed, sys.executable, "-m", "discoveryd.cli", "run", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    d = Proc(proc, log, admin, dns_port)  # type: ignore[arg-type]  # bytes output: only readyz() is used
    try:
        wait_sync(lambda: proc.poll() is not None or d.readyz() == 200, timeout=30, what="ready under the sandbox")
        assert proc.poll() is None, log.read_text()
        query = dns.message.make_query("web.shop.example", "A")
        for reply in (
            dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=5),
            dns.query.tcp(query, "127.0.0.1", port=dns_port, timeout=5),
        ):
            assert [rr.to_text() for rr in reply.answer[0]] == ["10.1.0.1"]

        with grpc.insecure_channel(f"127.0.0.1:{xds_port}") as channel:
            ads = channel.stream_stream(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            request = discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
            request.node.id = "sandbox-test"
            responses = ads(iter([request]), timeout=10)
            first = next(responses)
            clusters = []
            for packed in first.resources:
                c = cluster_pb2.Cluster()
                packed.Unpack(c)
                clusters.append(c.name)
            responses.cancel()
        assert clusters == ["outbound|80||web.shop.example"]

        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "api.yaml").write_text(serviceentry("api", "api.shop.example", "10.2.0.1"))
        cfg.write_text(
            config("  - {kind: files, name: local, paths: [se/]}\n  - {kind: files, name: more, paths: [more/]}\n")
        )
        os.kill(proc.pid, signal.SIGHUP)
        api = dns.message.make_query("api.shop.example", "A")
        wait_sync(
            lambda: dns.query.udp(api, "127.0.0.1", port=dns_port, timeout=2).answer, what="the reloaded registry"
        )
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        stop(proc)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "Operation not permitted" not in text and "not supported" not in text, text
