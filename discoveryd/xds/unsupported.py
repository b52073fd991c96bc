"""Istio fields a client type does not honour, reported per (client type, host, field) when it is sent them.

Envoy honours every field discoveryd serves; proxyless gRPC honours a subset
(gRFCs A27, A28, A31, A32, A33, A42, A44, A50; the table is in
discoveryd/xds/README.md). The builder records, per cluster and route
configuration, the fields gRPC does not honour (`View.grpc_ignored`; for a
namespace's own variants, `View.grpc_ignored_over`); a
connection whose client is gRPC (`client_type`) hands the names of the
resources it writes to `UnsupportedFields.sent`, which keeps one report per
(client type, host, field):

- in /debug/syncz under "unsupported" (and after the table of `discoveryd status`);
- as a log line, at most one per `LOG_INTERVAL` (the reports in between are
  counted in the next line and are all in /debug/syncz);
- as the gauge `discoveryd_xds_unsupported_fields{client_type, field}`: how many
  hosts currently have that field reported (not labelled per host or client,
  to keep its cardinality bounded).

A report is dropped (`refresh`, on each new view, looking only at the resources
that changed in it) once no resource that
carried the field carries it any more.

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Gauge

from discoveryd.model import Hostname
from discoveryd.xds.resources import View

log = logging.getLogger(__name__)

GRPC: Final = "grpc"
ENVOY: Final = "envoy"
OTHER: Final = "other"

LOG_INTERVAL: Final = 30.0
"""Seconds between two log lines about unsupported fields; the reports in between are counted in the next."""


def client_type(node: Any) -> str:
    """`grpc` for proxyless gRPC (node metadata GENERATOR `grpc`, as Istio marks it, or a gRPC user agent such
    as `gRPC C-core` / `grpc-go`), `envoy` for Envoy, else `other`."""
    if node.HasField("metadata"):
        generator = node.metadata.fields.get("GENERATOR")
        if generator is not None and generator.string_value == "grpc":
            return GRPC
    agent = node.user_agent_name.lower()
    if "grpc" in agent:
        return GRPC
    if "envoy" in agent:
        return ENVOY
    return OTHER


@dataclass(slots=True)
class Report:
    client_type: str
    host: Hostname
    field: str
    detail: str
    node: str
    """The first client of that type sent it."""
    since: float
    """Wall-clock time of the first sending."""
    resources: set[tuple[str | None, str, str]] = dataclasses.field(default_factory=set)
    """(client namespace, type URL, name) of the resources sent that carry the field (None: no namespace)."""


class UnsupportedFields:
    """The reports of one xDS server. `gauge` is labelled (client_type, field)."""

    def __init__(self, gauge: Gauge, log_interval: float = LOG_INTERVAL) -> None:
        self._gauge = gauge
        self._log_interval = log_interval
        self._reports: dict[tuple[str, Hostname, str], Report] = {}
        self._by_resource: dict[tuple[str, str], set[tuple[tuple[str, Hostname, str], str | None]]] = {}
        """(type URL, name) → (report key, client namespace) of the reports whose `resources` hold it (what
        `refresh` revisits)."""
        self._logged_at: float | None = None
        self._unlogged = 0
        self._all_sent: tuple[View | None, set[tuple[str, str | None]]] = (None, set())
        """The view of the last `sent_all`, and the (type URL, namespace) it was done for in that view: done
        again for the same view, it would add nothing (each wildcard response of a gRPC client calls it)."""

    def sent(
        self, kind: str, node: str, view: View, type_url: str, names: Iterable[str], namespace: str | None = None
    ) -> None:
        """A client of type `kind` (node id `node`) in `namespace` was sent the resources `names` of `type_url`
        from `view` (its namespace's variants where there are some)."""
        if kind != GRPC or not (view.grpc_ignored or view.grpc_ignored_over):
            return
        if namespace is not None and namespace not in view.overrides:
            namespace = None  # it sees the shared resources: one entry per resource, whatever the namespace
        for name in names:
            got = view.ignored(type_url, name, namespace)
            if got is None:
                continue
            host, fields = got
            for name_of_field, detail in fields:
                key = (kind, host, name_of_field)
                report = self._reports.get(key)
                if report is None:
                    report = self._reports[key] = Report(kind, host, name_of_field, detail, node, time.time())
                    self._gauge.labels(kind, name_of_field).inc()
                    self._log(report)
                if (namespace, type_url, name) not in report.resources:
                    report.resources.add((namespace, type_url, name))
                    self._by_resource.setdefault((type_url, name), set()).add((key, namespace))

    def sent_all(self, kind: str, node: str, view: View, type_url: str, namespace: str | None) -> None:
        """`sent` for a wildcard response: every resource of `type_url` the client's namespace sees."""
        if kind != GRPC or not (view.grpc_ignored or view.grpc_ignored_over):
            return
        seen, done = self._all_sent
        if seen is not view:
            done = set()
            self._all_sent = (view, done)
        if (type_url, namespace) in done:
            return
        done.add((type_url, namespace))
        names = {n for t, n in view.grpc_ignored if t == type_url and view.visible(n, namespace)}
        own = view.grpc_ignored_over.get(namespace) if namespace is not None else None
        if own is not None:
            names.update(n for t, n in own if t == type_url)
        self.sent(kind, node, view, type_url, names, namespace)

    def refresh(self, view: View, changes: Mapping[str, Iterable[str]]) -> None:
        """Drop what no resource of `view` carries any more (the policy changed or the service went away).

        Only the resources in `changes` (type URL → names changed since the previous view) are looked at: a
        resource whose bytes did not change carries the same fields. O(changes), not O(reports): a `*` rule
        reported for every host must not cost each push of one endpoint a walk over all of them."""
        self._all_sent = (None, set())  # not to keep the old view alive
        for type_url, names in changes.items():
            for name in names:
                resource = (type_url, name)
                keys = self._by_resource.get(resource)
                if keys is None:
                    continue
                for key, namespace in list(keys):
                    report = self._reports[key]
                    got = view.ignored(type_url, name, namespace)
                    if got is not None and any(f == report.field for f, _ in got[1]):
                        continue
                    keys.discard((key, namespace))
                    report.resources.discard((namespace, type_url, name))
                    if not report.resources:
                        del self._reports[key]
                        self._gauge.labels(report.client_type, report.field).dec()
                if not keys:
                    del self._by_resource[resource]

    def clear(self) -> None:
        """Forget every report (the server stops)."""
        for report in self._reports.values():
            self._gauge.labels(report.client_type, report.field).dec()
        self._reports.clear()
        self._by_resource.clear()
        self._all_sent = (None, set())

    def _log(self, report: Report) -> None:
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self._log_interval:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more reports since the last line: /debug/syncz)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.warning(
            "xds: %s clients are sent %s of %s, which they do not honour (%s; first sent to %s)%s",
            report.client_type,
            report.field,
            report.host,
            report.detail,
            report.node or "?",
            more,
        )

    def syncz(self) -> list[dict[str, Any]]:
        return [
            {
                "client_type": r.client_type,
                "host": r.host,
                "field": r.field,
                "detail": r.detail,
                "node": r.node,
                "since": r.since,
                "resources": sorted({name for _, _, name in r.resources}),
            }
            for r in sorted(self._reports.values(), key=lambda r: (r.client_type, r.host, r.field))
        ]
