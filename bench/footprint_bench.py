"""What running discoveryd costs an operator: resident memory of the demo config, the sandbox exposure.

- memory: `discoveryd run` on the demo config (config/discoveryd.yaml and its
  ServiceEntries, copied to a temporary directory with free loopback ports);
  VmRSS once /readyz is 200, and again (with the peak, VmHWM) after
  `--queries` DNS queries, one /metrics and one /debug/indexz. This is the
  figure the Kubernetes manifests size their memory request from;
- exposure: `systemd-analyze security --offline=yes systemd/discoveryd.service`
  when systemd-analyze is installed;
- image size: with `--image NAME`, the size `buildah images` reports.

    python -m bench footprint
    python -m bench footprint --queries=20000 --image=discoveryd:0.1.0
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query

from bench.common import table, write_results

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def memory(queries: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        shutil.copytree(ROOT / "config" / "serviceentries", base / "serviceentries")
        admin, dns_port = _free_port(), _free_port()
        text = (ROOT / "config" / "discoveryd.yaml").read_text()
        text = text.replace("127.0.0.1:15010", f"127.0.0.1:{_free_port()}")
        text = text.replace("127.0.0.1:15053", f"127.0.0.1:{dns_port}")
        text = text.replace("127.0.0.1:15014", f"127.0.0.1:{admin}")
        (base / "discoveryd.yaml").write_text(text)
        proc = subprocess.Popen(
            [sys.executable, "-m", "discoveryd.cli", "run", "--config", str(base / "discoveryd.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("discoveryd did not become ready")
                time.sleep(0.1)
            ready = _status(proc.pid)
            for _ in range(queries):
                query = dns.message.make_query("cart.shop.internal", "A")
                dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=2)
            for path in ("/metrics", "/debug/indexz"):
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as r:
                    r.read()
            after = _status(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    return {
        "rss_ready_mib": round(ready["VmRSS"] / 2**20, 1),
        "rss_after_mib": round(after["VmRSS"] / 2**20, 1),
        "peak_mib": round(after["VmHWM"] / 2**20, 1),
        "queries": queries,
    }


def exposure() -> float | None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    out = subprocess.run(
        [tool, "security", "--offline=yes", str(ROOT / "systemd" / "discoveryd.service")],
        capture_output=True,
        text=True,
    ).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    return float(m.group(1)) if m else None


def image_size(name: str) -> str | None:
    out = subprocess.run(["buildah", "images", "--format", "{{.Size}}", name], capture_output=True, text=True)
    return out.stdout.strip() or None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench footprint")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--image", help="report the size of this built image")
    args = parser.parse_args(argv)

    figures: dict[str, Any] = {"memory": memory(args.queries), "exposure": exposure()}
    if args.image:
        figures["image_size"] = image_size(args.image)
    m = figures["memory"]
    rows = [
        ["RSS once ready (demo config)", f"{m['rss_ready_mib']} MiB"],
        [f"RSS after {m['queries']} DNS queries + /metrics + /debug/indexz", f"{m['rss_after_mib']} MiB"],
        ["peak RSS (VmHWM)", f"{m['peak_mib']} MiB"],
        ["systemd exposure (security --offline=yes)", str(figures["exposure"])],
    ]
    if args.image:
        rows.append([f"image {args.image}", str(figures["image_size"])])
    print(table(rows, ["what", "value"]))
    command = "python -m bench footprint " + " ".join(argv)
    print(f"results: {write_results('footprint', figures, command.strip())}")
