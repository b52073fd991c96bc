"""The container image: `make image` on a Debian base, then the image's discoveryd run for real.

No image registry is reachable here, so the base is built from Debian's
packages with mmdebstrap (python3 and its venv module: what the Containerfile
needs of a base) and imported into buildah's storage. The base tarball is
cached in /var/tmp keyed by its inputs (the package list and the apt
sources used), so only the first run pays for it. `make image` then builds
the wheels outside the image and the image with `buildah bud --isolation
chroot`. The image's own `discoveryd version`, `check` and `run` are
started with `buildah run` (chroot isolation shares the host's network, so
the daemon listens on loopback), and a DNS query is answered through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers import free_port, wait_sync

ROOT = Path(__file__).resolve().parents[2]
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
SUITE = "bookworm"  # its python3 (3.11) is the minor version the wheels are built for
CACHE = Path(os.environ.get("DISCOVERYD_IMAGE_CACHE", "/var/tmp/discoveryd-image-cache"))
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")

# Building the base (once per cache) and the image takes minutes, not the default 120 s.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def _run(*cmd: str, timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]


def _require_tools() -> None:
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get)")
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the Debian {SUITE} base has Python 3.11; wheels built by {sys.version.split()[0]} would not fit")
    info = _run("buildah", "info", timeout=60)
    if info.returncode != 0:
        pytest.skip(f"buildah cannot run here: {info.stderr.strip()[:300]}")


def _base_image() -> str:
    """A local image built from Debian packages; its tarball is cached by the hash of its inputs.

    Runs under a file lock: test runs in other checkouts on this machine share the cache.
    """
    sources = SOURCES.read_bytes() if SOURCES.exists() else b""
    key = hashlib.sha256(repr((SUITE, BASE_PACKAGES, sources)).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _base_image_locked(key)


def _base_image_locked(key: str) -> str:
    name = f"localhost/discoveryd-test-base:{key}"
    if _run("buildah", "inspect", "--type", "image", name, timeout=60).returncode == 0:
        return name
    tarball = CACHE / f"base-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        mirror = [str(SOURCES)] if SOURCES.exists() else []
        made = _run(
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "--format=tar",
            "--skip=output/dev",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
            SUITE,
            str(partial),
            *mirror,
        )
        if made.returncode != 0:
            partial.unlink(missing_ok=True)
            pytest.fail(f"mmdebstrap failed:\n{made.stderr[-3000:]}")
        partial.rename(tarball)
    ctr = _run("buildah", "from", "scratch", timeout=60)
    assert ctr.returncode == 0, ctr.stderr
    container = ctr.stdout.strip()
    try:
        for cmd in (
            ("buildah", "add", container, str(tarball), "/"),
            ("buildah", "config", "--cmd", "/bin/sh", container),
            ("buildah", "commit", "--quiet", container, name),
        ):
            done = _run(*cmd)
            assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    finally:
        _run("buildah", "rm", container, timeout=60)
    return name


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    _require_tools()
    base = _base_image()
    tag = f"localhost/discoveryd-test:{os.getpid()}"
    built = _run("make", "-C", str(ROOT), "image", f"IMAGE={tag}", f"IMAGE_BASE={base}", timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        yield tag
    finally:
        _run("buildah", "rmi", tag, timeout=120)


@pytest.fixture
def container(image: str) -> Iterator[str]:
    made = _run("buildah", "from", "--pull-never", image, timeout=120)
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip()
    try:
        yield name
    finally:
        _run("buildah", "rm", name, timeout=120)


def buildah_run(container: str, *args: str, volume: Path | None = None) -> list[str]:
    opts = ["--isolation", "chroot"]
    if volume is not None:
        opts += ["-v", f"{volume}:/etc/discoveryd-test:ro"]
    return ["buildah", "run", *opts, container, "--", *args]


def test_the_image_config_entrypoint_and_user(image: str) -> None:
    inspected = _run("buildah", "inspect", "--type", "image", image, timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    config = json.loads(inspected.stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["discoveryd"]
    assert config["User"] == "65532:65532"
    size = _run("buildah", "images", "--format", "{{.Size}}", image, timeout=60).stdout.strip()
    print(f"image {image}: {size}")


def test_version_and_check_run_in_the_image_as_65532(container: str) -> None:
    version = _run(*buildah_run(container, "discoveryd", "version"), timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("discoveryd ")
    who = _run(*buildah_run(container, "python3", "-c", "import os; print(os.getuid(), os.getgid())"), timeout=120)
    assert who.stdout.split() == ["65532", "65532"], who.stdout + who.stderr
    state = _run(*buildah_run(container, "sh", "-c", "touch /var/lib/discoveryd/probe && echo ok"), timeout=120)
    assert state.stdout.strip() == "ok", state.stderr  # the state directory is the image user's
    uv = _run(*buildah_run(container, "python3", "-c", "import uvloop; print(uvloop.__version__)"), timeout=120)
    assert uv.returncode == 0, uv.stderr
    # The image's own demo config (the default path /etc/discoveryd/discoveryd.yaml).
    check = _run(*buildah_run(container, "discoveryd", "check"), timeout=120)
    assert check.returncode == 0, check.stderr
    assert "/etc/discoveryd/discoveryd.yaml: ok" in check.stdout


def test_run_answers_dns_on_loopback(container: str, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "se").mkdir(parents=True)
    (conf / "se" / "web.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec:\n  hosts: [web.image.test]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
        "  resolution: STATIC\n  endpoints: [{address: 10.9.0.1}]\n"
    )
    admin, dns_port = free_port(), free_port()
    (conf / "discoveryd.yaml").write_text(
        "registries:\n  - {kind: files, name: local, paths: [se/]}\n"
        f"xds:\n  listen: 127.0.0.1:{free_port()}\n"
        f"dns:\n  listen: [127.0.0.1:{dns_port}]\n"
        f"admin:\n  listen: 127.0.0.1:{admin}\n"
    )
    for p in (conf, conf / "se"):
        p.chmod(0o755)
    for p in (conf / "discoveryd.yaml", conf / "se" / "web.yaml"):
        p.chmod(0o644)
    tmp_path.chmod(0o755)
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            buildah_run(
                container, "discoveryd", "run", "--config", "/etc/discoveryd-test/discoveryd.yaml", volume=conf
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answered() -> dns.message.Message | None:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}: {log.read_text()}")
            query = dns.message.make_query("web.image.test", "A")
            reply = dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=1)
            return reply if reply.answer else None

        reply = wait_sync(answered, timeout=60, interval=0.2, what="the image's discoveryd answers DNS")
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rr.to_text() for rr in reply.answer[0]] == ["10.9.0.1"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "discoveryd 0" in log.read_text() or "starting with /etc/discoveryd-test" in log.read_text()
    assert "Traceback" not in log.read_text()
