"""CLI output to a closed pipe (`discoveryd dump | head`): a quiet exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

_BIG = json.dumps({"services": [{"hostname": f"svc{i}.test", "endpoints": ["10.0.0.1"] * 20} for i in range(3000)]})


class _Admin(BaseHTTPRequestHandler):
    """A stand-in admin API answering /debug/indexz and /debug/syncz with large documents."""

    def do_GET(self) -> None:
        if self.path == "/debug/syncz":
            conns = [{"node": f"node-{i}", "types": {"CDS": {"state": "SYNCED"}}} for i in range(3000)]
            body = json.dumps({"version": "1", "connections": conns}).encode()
        else:
            body = _BIG.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("command", ["dump", "status", "version", "check"])
def test_output_to_a_closed_pipe_exits_quietly(command: str, admin: str, tmp_path: Path) -> None:
    config = tmp_path / "discoveryd.yaml"
    config.write_text("registries: []\n")
    args = {
        "dump": ["--admin", admin],
        "status": ["--admin", admin],
        "version": [],
        "check": ["--config", str(config)],
    }[command]
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from discoveryd.cli import main; sys.exit(main())", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the command writes anything, like `| head -0`
    _, err = process.communicate(timeout=60)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "BrokenPipeError" not in text and "Exception ignored" not in text, text
    assert text == ""
    assert process.returncode == 141, "128 + SIGPIPE, as a tool killed by the broken pipe would report"
