"""`discoveryd status`: the /debug/syncz document as a table, one row per xDS stream.

Columns: NAME (node id), CLUSTER (node cluster), API (ADS, CDS, ...; "delta"
when incremental), one column per type (CDS, LDS, EDS, RDS) with its sync
state, VERSION (the newest version sent on the stream), CONNECTED (how long
ago the stream opened). A type cell is SYNCED (the last response was ACKed),
STALE (sent but not ACKed yet, or a newer change not sent yet), NOT SENT
(subscribed, nothing to send yet), ERROR (the last response was rejected;
the reasons follow the table) or `-` (not subscribed). Then the Istio fields
sent to clients whose type does not honour them (proxyless gRPC), one line
per (client type, host, field).
"""

from __future__ import annotations

import time
from typing import Any

_TYPES = ("CDS", "LDS", "EDS", "RDS")
_HEADER = ["NAME", "CLUSTER", "API", *_TYPES, "VERSION", "CONNECTED"]


def render(syncz: dict[str, Any], now: float | None = None) -> str:
    """The table for `syncz` (as returned by `XdsServer.syncz()`); `now` is wall-clock time for the ages."""
    now = time.time() if now is None else now
    connections = sorted(syncz.get("connections", []), key=lambda c: (c.get("node", ""), c.get("id", 0)))
    footer = f"server version {syncz.get('version', '?')}, {len(connections)} stream(s)"
    if syncz.get("serving") is False:
        footer += "; holding every response until all registries are ready"
    if not connections:
        return "\n".join([f"no xDS clients connected ({footer})", *_unsupported(syncz.get("unsupported", []))]) + "\n"
    rows: list[list[str]] = []
    errors: list[str] = []
    for conn in connections:
        types: dict[str, Any] = conn.get("types", {})
        name = conn.get("node") or f"(no node id) {conn.get('peer', '')}"
        cells = []
        for short in _TYPES:
            t = types.get(short)
            cells.append("-" if t is None else str(t.get("state", "?")))
            if t is not None and t.get("state") == "ERROR":
                errors.append(f"{name} {short} rejected version {t.get('sent_version', '?')}: {t.get('nack', '')}")
        versions = [t.get("sent_version", "") for t in types.values() if t.get("sent_version")]
        version = max(versions, key=_version_key) if versions else "-"
        api = conn.get("api", "?") + (" delta" if conn.get("delta") else "")
        since = conn.get("connected_since")
        age = _age(now - since) if isinstance(since, int | float) else "?"
        rows.append([name, conn.get("cluster") or "-", api, *cells, version, age])
    widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [_HEADER, *rows]]
    lines.append("")
    lines.append(footer)
    lines.extend(errors)
    lines.extend(_unsupported(syncz.get("unsupported", [])))
    return "\n".join(lines) + "\n"


UNSUPPORTED_SHOWN = 20
"""Rows of the unsupported-field section shown; the rest are counted (all are in /debug/syncz)."""


def _unsupported(reports: list[dict[str, Any]]) -> list[str]:
    """One line per (client type, host, field) sent to clients that do not honour it."""
    if not reports:
        return []
    out = ["", "Fields sent to clients that do not honour them (client type, host, field: why; first client):"]
    for r in reports[:UNSUPPORTED_SHOWN]:
        out.append(
            f"  {r.get('client_type', '?')}  {r.get('host', '?')}  {r.get('field', '?')}: "
            f"{r.get('detail', '')}; {r.get('node') or '?'}"
        )
    if len(reports) > UNSUPPORTED_SHOWN:
        out.append(f"  ... {len(reports) - UNSUPPORTED_SHOWN} more in /debug/syncz")
    return out


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
