"""What `discoveryd run` imports before xDS serves: only what the first response needs.

Each check runs in a fresh interpreter (a clean `sys.modules`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _modules_after(code: str, cwd: Path) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_reading_the_config_does_not_import_the_registries(tmp_path: Path) -> None:
    (tmp_path / "discoveryd.yaml").write_text(
        "registries:\n"
        "  - {kind: files, name: local, paths: [se/]}\n"
        "  - {kind: etcd, name: main, endpoints: ['http://127.0.0.1:1'], prefix: /x/, domain: mesh.local}\n"
        "  - {kind: consul, name: dc, address: 'http://127.0.0.1:1'}\n"
    )
    loaded = _modules_after(
        """
        from discoveryd import config
        cfg = config.load(config.find_config("discoveryd.yaml"))
        assert [r.kind for r in cfg.registries] == ["files", "etcd", "consul"]
        """,
        tmp_path,
    )
    assert {"adapters.files", "adapters.etcd", "adapters.consul"} <= loaded
    assert not {"adapters.files.registry", "adapters.etcd.registry", "adapters.consul.registry"} & loaded
    assert "watchfiles" not in loaded


def test_the_daemon_imports_dns_and_admin_only_when_it_starts_them(tmp_path: Path) -> None:
    loaded = _modules_after("import discoveryd.cli\nimport discoveryd.supervisor", tmp_path)
    assert "discoveryd.xds.server" in loaded
    assert not {"aiohttp", "discoveryd.admin", "discoveryd.dns", "discoveryd.dns.server", "watchfiles"} & loaded


def test_the_registry_classes_are_still_importable_from_the_adapter_packages() -> None:
    from adapters.consul import ConsulRegistry
    from adapters.etcd import EtcdRegistry
    from adapters.files import FilesRegistry

    assert {c.__name__ for c in (ConsulRegistry, EtcdRegistry, FilesRegistry)} == {
        "ConsulRegistry",
        "EtcdRegistry",
        "FilesRegistry",
    }
