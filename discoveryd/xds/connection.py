"""One xDS stream: what the client subscribed to, what it was sent, what it ACKed.

Data flow: the stream's reader task feeds each request to `on_request`
(state of the world) or `on_delta_request`; the push loop calls `notify` with
every new `View` and the names that changed in it. Both only update state and
set `wake`; neither blocks nor writes. The stream's writer task then drains
`next_response()`, which builds each response from the newest view at the
moment it is written. So the "send queue" of a connection is a set of dirty
names per type, never a list of responses: a client that reads slowly (or not
at all) gets the newest state when it catches up, nothing piles up, and the
push loop never waits for it.

Protocol rules (envoy xDS protocol, state of the world and incremental):

- Every response carries a fresh nonce. In SotW a request whose nonce is not
  the latest one sent for its type is stale and ignored; in delta its
  subscription changes still apply, only its ACK/NACK is ignored.
- A request with `error_detail` is a NACK: recorded (log, metric, status) and
  not answered with the same content; the next change is sent as usual. Its
  message is untrusted: kept clipped to `NACK_KEEP` characters with control
  characters escaped, and logged at most once per `NACK_LOG_INTERVAL` per
  stream (the others are counted in the next line and in the metric).
- An ACK that subscribes to nothing new gets no response.
- LDS/CDS: an empty name list is a wildcard subscription until the client
  first names a resource; `*` is the explicit wildcard. SotW responses carry
  the full subscribed state, so a missing resource is a deleted one.
- EDS/RDS: only the named resources are sent, each response only those that
  changed or were newly requested (even when unchanged, for warming). Names
  that do not exist yet are remembered and sent when they appear.
- Responses are written in the order of `resources.TYPES` (CDS, EDS, LDS,
  RDS). A changed EDS cluster is followed by its assignment even when that
  did not change: Envoy warms the updated cluster until it arrives; so
  does a cluster a resuming delta client held in an older version. Resource
  names are derived one-to-one from (hostname, port), so no surviving
  resource ever references a removed one: a removal can travel with the
  additions of the same push.
- Delta: versions are per resource; `initial_resource_versions` on a new
  stream suppress resending what the client already has and report what it
  has that is gone; subscribed names that do not exist are reported once in
  `removed_resources`.
- Delta wildcard: a client may subscribe to `*` (or, for LDS/CDS, to nothing
  in its first request) and to names at the same time. Naming a resource does
  not end the wildcard; unsubscribing `*` does. Unsubscribing a name the
  wildcard still covers keeps it subscribed, and the server answers with the
  resource in full (or its removal when it does not exist), since the client
  cannot know whether it still holds it.

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from envoy.service.discovery.v3 import discovery_pb2

from discoveryd.logs import escape
from discoveryd.xds.locality import Client, client_of
from discoveryd.xds.metrics import XdsMetrics
from discoveryd.xds.resources import CLUSTER, ENDPOINT, FULL_STATE, ROUTE, SHORT, TYPES, Changes, Resource, View
from discoveryd.xds.unsupported import GRPC, OTHER, UnsupportedFields, client_type

log = logging.getLogger(__name__)


_ABSENT: Final = ""
"""Delta `known` marker: the client was told this subscribed name does not exist."""
_RESEND: Final = "\0resend"
"""Delta `known` marker: the client must be told again whether this name exists (sent in full, or removed).

Set when a client unsubscribes from a name its wildcard subscription still
covers: the protocol leaves the client unsure whether it keeps the resource,
so the server answers with the resource or its removal.
"""


NACK_KEEP: Final = 1024
"""Characters of a NACK's `error_detail.message` kept (status, /debug/syncz, logs); the rest is cut."""
NODE_KEEP: Final = 256
"""Characters kept of the client-chosen node id, cluster and user agent."""
_REPORTED = frozenset({CLUSTER, ROUTE})
"""The types whose resources may carry fields a client type does not honour (`discoveryd.xds.unsupported`)."""
NACK_LOG_INTERVAL: Final = 30.0
"""Seconds between two NACK log lines of one stream; the NACKs in between are counted in the next."""
SUBSCRIPTION_FLOOR: Final = 10_000
SUBSCRIPTION_FACTOR: Final = 4
"""A stream may name at most max(`SUBSCRIPTION_FACTOR` x the resources of a type, `SUBSCRIPTION_FLOOR`)
resources of that type at once (subscribed names, existing or not; a delta client's initial versions).
Past that the stream ends with RESOURCE_EXHAUSTED: each name costs memory for the life of the stream
and work on every request, and no real client names more than exist."""


def clip(text: str, limit: int) -> str:
    """Untrusted client text made safe to keep and show: control characters escaped, at most ~`limit` characters."""
    out = escape(text[:limit])
    if len(out) > limit:
        out = out[:limit]
    if len(text) > limit:
        out += f"... [{len(text)} characters, cut]"
    return out


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def node_namespace(node: Any) -> str | None:
    """The namespace a client runs in: its node metadata `NAMESPACE` (what Istio's agents send), else the
    namespace part of an Istio node id `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`; None
    when neither holds a valid namespace name (such a client sees only unrestricted services)."""
    field = node.metadata.fields.get("NAMESPACE") if node.HasField("metadata") else None
    candidates = [field.string_value] if field is not None else []
    parts = node.id.split("~")
    if len(parts) == 4:
        candidates.append(parts[2].partition(".")[2])
        candidates.append(parts[3].partition(".")[0])
    for ns in candidates:
        if _LABEL.fullmatch(ns):
            return str(ns)
    return None


class SyncState:
    SYNCED = "SYNCED"
    STALE = "STALE"
    NOT_SENT = "NOT SENT"
    ERROR = "ERROR"


@dataclass(slots=True)
class TypeState:
    """Per-type state of one stream. Owned by its `Connection`."""

    type_url: str
    requested: bool = False
    """The client has sent at least one request for this type."""
    wildcard: bool = False
    named: bool = False
    """The client has named a resource at least once (ends the implicit wildcard)."""
    names: set[str] = field(default_factory=set)
    names_key: bytes = b""
    """The resource names of the last SotW request, serialized: a cheap "subscription unchanged" test."""
    full: bool = False
    """SotW full-state type: the whole subscribed state must be sent."""
    pending: set[str] = field(default_factory=set)
    """Names to (re)consider in the next response."""
    must_respond: bool = False
    """Send a response even if it carries nothing (first wildcard request)."""
    queued_at: float | None = None
    """Monotonic time the oldest unsent change was queued (push latency)."""
    origin: float | None = None
    """Monotonic creation time of the oldest unsent snapshot change (convergence)."""
    known: dict[str, str] = field(default_factory=dict)
    """Delta: resource name → version the client has (`_ABSENT`: told it does not exist)."""
    nonce: str = ""
    sent_version: str = ""
    sent_at: float | None = None
    sent_origin: float | None = None
    responses: int = 0
    acked_nonce: str = ""
    acked_version: str = ""
    acked_at: float | None = None
    nack: str | None = None
    nack_nonce: str = ""
    nacks: int = 0

    def subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def has_work(self) -> bool:
        return self.full or self.must_respond or bool(self.pending)

    @property
    def state(self) -> str:
        if not self.nonce:
            return SyncState.NOT_SENT
        if self.nack is not None and self.nack_nonce == self.nonce:
            return SyncState.ERROR
        if self.acked_nonce == self.nonce and not self.has_work():
            return SyncState.SYNCED
        return SyncState.STALE

    def queue(self, origin: float | None) -> None:
        if self.queued_at is None:
            self.queued_at = time.monotonic()
        if origin is not None and (self.origin is None or origin < self.origin):
            self.origin = origin


class Connection:
    """State of one stream. `api` names the service (ADS, CDS, ...); `only` is the type of a per-type service."""

    def __init__(
        self,
        conn_id: int,
        api: str,
        delta: bool,
        peer: str,
        view: View,
        metrics: XdsMetrics,
        only: str | None = None,
        unsupported: UnsupportedFields | None = None,
    ) -> None:
        self.id = conn_id
        """Unique within the server that owns this connection."""
        self._metrics = metrics
        self._unsupported = unsupported
        """Where the Istio fields its client type does not honour are reported, as they are sent."""
        self._nonces = itertools.count(1)
        """Nonces are unique per stream (the protocol asks no more), so no counter is shared."""
        self.api = api
        self.delta = delta
        self.peer = peer
        self.only = only
        self.view = view
        self.node_id = ""
        self.namespace: str | None = None
        """The client's namespace (node metadata NAMESPACE, else from an Istio node id); None: unknown.
        Decides which exportTo-restricted services it sees."""
        self.client: Client | None = None
        """The client's node locality and labels (None: it sent neither); decides its variant of
        locality-aware assignments (`View.localize`)."""
        self.cluster = ""
        self.user_agent = ""
        self.client_type = OTHER
        """`grpc`, `envoy` or `other` (`unsupported.client_type`), from the node."""
        self.connected_since = time.time()
        self.types: dict[str, TypeState] = {t: TypeState(t) for t in TYPES}
        self.wake = asyncio.Event()
        self._node_seen = False
        self._nack_logged_at: float | None = None
        self._nacks_unlogged = 0
        self._rewarm_on_request: set[str] = set()
        """Delta ADS: clusters resent to a resuming client before it asked for EDS; their assignments follow."""
        self.closed = False
        """Set when the stream is ending; the writer returns."""
        self.held = False
        """Set by the server while the index is not ready: requests are applied, nothing is written."""
        self.exhausted: str | None = None
        """Why the stream is ended with RESOURCE_EXHAUSTED (it named too many resources); None: it is not."""

    # -- requests -----------------------------------------------------------------------

    def _type_of(self, type_url: str) -> TypeState | None:
        if self.only is not None and type_url in ("", self.only):
            return self.types[self.only]
        state = self.types.get(type_url)
        if state is None or (self.only is not None and type_url != self.only):
            log.warning("xds %s: type %r is not served here; ignored", self.describe(), clip(type_url, 200))
            return None
        return state

    def _node(self, node: Any) -> None:
        """Takes the client's identity from the first request that carries a node (the protocol sends it once).

        The namespace, hence what the client sees, is fixed then for the life of the stream.
        """
        if self._node_seen or not (node.id or node.HasField("metadata")):
            return
        self._node_seen = True
        self.namespace = node_namespace(node)
        self.client = client_of(node)
        self.client_type = client_type(node)
        if node.id:
            self.node_id, self.cluster = clip(node.id, NODE_KEEP), clip(node.cluster, NODE_KEEP)
            agent = node.user_agent_name
            version = node.user_agent_version or node.user_agent_build_version.version.major_number
            self.user_agent = clip(f"{agent}/{version}", NODE_KEEP) if agent else ""

    def _ack(self, st: TypeState, nonce: str, version: str, error: Any | None) -> None:
        now = time.monotonic()
        short = SHORT[st.type_url]
        if error is not None:
            message = clip(error.message, NACK_KEEP)
            st.nack, st.nack_nonce = f"{error.code}: {message}" if error.code else message, nonce
            st.nacks += 1
            self._metrics.nacks_by[short].inc()
            self._log_nack(short, st, now)
            return
        st.acked_nonce, st.acked_version, st.acked_at = nonce, version, now
        if st.sent_origin is not None:
            self._metrics.convergence_by[short].observe(now - st.sent_origin)
            st.sent_origin = None

    def _log_nack(self, short: str, st: TypeState, now: float) -> None:
        """Log a NACK, at most once per `NACK_LOG_INTERVAL` per stream (a client may NACK in a loop)."""
        if self._nack_logged_at is not None and now - self._nack_logged_at < NACK_LOG_INTERVAL:
            self._nacks_unlogged += 1
            return
        more = f" ({self._nacks_unlogged} more NACKs on this stream not logged)" if self._nacks_unlogged else ""
        self._nack_logged_at, self._nacks_unlogged = now, 0
        log.warning("xds %s rejected %s version %s: %s%s", self.describe(), short, st.sent_version, st.nack, more)

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> None:
        """A state-of-the-world request."""
        st = self._type_of(req.type_url)
        if st is None:
            return
        self._node(req.node)
        nonce = req.response_nonce
        if nonce and st.nonce and nonce != st.nonce:
            self._metrics.stale_nonces_by[SHORT[st.type_url]].inc()
            return
        if nonce and st.nonce:
            self._ack(st, nonce, req.version_info, req.error_detail if req.HasField("error_detail") else None)
        fresh = not nonce or not st.nonce
        key = _names_key(req)
        if not fresh and key == st.names_key:
            return  # an ACK or NACK that keeps the subscription: the common case, kept cheap
        if self._over_limit(st, len(req.resource_names), "resource_names"):
            return
        st.names_key = key
        names = self._canonical(st.type_url, req.resource_names)
        st.named = st.named or bool(names)
        wildcard = "*" in names or (st.type_url in FULL_STATE and not st.named)
        names.discard("*")
        added = names - st.names
        widened = wildcard and not st.wildcard
        st.requested, st.wildcard, st.names = True, wildcard, names
        if not wildcard:
            st.pending &= names
        if st.type_url in FULL_STATE:
            if fresh or added or widened:
                st.full = True
                st.queue(None)
        else:
            new = names if fresh else added
            if new:
                st.pending |= new
                st.queue(None)
        self._wake_if(st)

    def on_delta_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """An incremental request."""
        st = self._type_of(req.type_url)
        if st is None:
            return
        self._node(req.node)
        if not st.requested and self._over_limit(st, len(req.initial_resource_versions), "initial_resource_versions"):
            return
        subscribe = self._canonical(st.type_url, req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if self._over_limit(st, _subscribed_after(st.names, subscribe, unsubscribe), "subscribed names"):
            return
        if not st.requested:
            st.requested = True
            st.known = dict(req.initial_resource_versions)
            if st.type_url == ENDPOINT and self._rewarm_on_request:
                for name in self._rewarm_on_request:
                    st.known.pop(name, None)
                self._rewarm_on_request.clear()
            st.pending |= st.known.keys()
            if st.type_url in FULL_STATE and not subscribe:
                st.wildcard = True
                st.must_respond = True
                st.pending.update(self.view.names(st.type_url, self.namespace))
        if "*" in subscribe and not st.wildcard:
            st.wildcard = True
            st.pending.update(self.view.names(st.type_url, self.namespace))
        if "*" in unsubscribe:
            st.wildcard = False
        subscribe.discard("*")
        unsubscribe.discard("*")
        for name in unsubscribe:
            tracked = name in st.names or name in st.known
            st.names.discard(name)
            st.pending.discard(name)
            if st.wildcard and tracked:
                st.known[name] = _RESEND
                st.pending.add(name)
            else:
                st.known.pop(name, None)
        st.names |= subscribe
        st.pending |= subscribe
        if subscribe or st.must_respond or st.pending:
            st.queue(None)
        nonce = req.response_nonce
        if nonce:
            if nonce == st.nonce:
                self._ack(st, nonce, st.sent_version, req.error_detail if req.HasField("error_detail") else None)
            else:
                self._metrics.stale_nonces_by[SHORT[st.type_url]].inc()
        self._wake_if(st)

    def subscription_limit(self, type_url: str) -> int:
        """The most resources of `type_url` this stream may name at once (`SUBSCRIPTION_FLOOR`)."""
        return max(SUBSCRIPTION_FLOOR, SUBSCRIPTION_FACTOR * len(self.view.resources[type_url]))

    def _over_limit(self, st: TypeState, count: int, what: str) -> bool:
        """Ends the stream (RESOURCE_EXHAUSTED, logged, counted) when a request names more than the limit."""
        limit = self.subscription_limit(st.type_url)
        if count <= limit or self.exhausted is not None:
            return self.exhausted is not None
        short = SHORT[st.type_url]
        self.exhausted = f"{short}: {count} {what}, more than the {limit} a stream may name; stream ended"
        self._metrics.subscription_limit_by[short].inc()
        log.warning("xds %s named too many resources: %s", self.describe(), self.exhausted)
        self.close()
        return True

    def _canonical(self, type_url: str, names: Iterable[str]) -> set[str]:
        """`names` as a set, sharing the view's string objects where the resource exists.

        A client subscribing to a thousand clusters would otherwise keep its own
        copy of a thousand names for as long as it stays connected.
        """
        table = self.view.resources[type_url]
        return {r.name if (r := table.get(n)) is not None else n for n in names}

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def _wake_if(self, st: TypeState) -> None:
        if st.has_work():
            self.wake.set()

    # -- pushes ---------------------------------------------------------------------------

    def notify(self, view: View, changes: Changes, origin: float, news: News | None = None) -> None:
        """A new view; `changes` are the names added, changed or removed since the previous one.

        Names the client may see neither in the old view nor in the new one are
        no news to it (exportTo), nor are names it sees in the same version in
        both (another namespace's variant changed): they cost it no push.
        `news`: what is news to the clients of each namespace, shared by every
        connection notified of the same change (built once per namespace, not
        once per client).
        """
        old, self.view = self.view, view
        scoped = bool(view.audiences or old.audiences or view.overrides or old.overrides)
        ns = self.namespace
        if news is None:
            news = News()

        def seen(type_url: str, names: frozenset[str]) -> frozenset[str]:
            key = (type_url, ns, id(old))
            got = news.get(key)
            if got is None:
                got = news[key] = (frozenset(n for n in names if _news(type_url, n, old, view, ns)), old)
            return got[0]

        clusters = changes.get(CLUSTER)
        if clusters and scoped:  # only clusters that changed for this client warm again
            clusters = seen(CLUSTER, clusters)
        if clusters:
            self._rewarm(clusters, origin)
        for type_url, names in changes.items():
            st = self.types[type_url]
            if not st.requested:
                continue
            if scoped:
                names = seen(type_url, names)
            relevant = names if st.wildcard else names & st.names
            if not relevant:
                continue
            if st.type_url in FULL_STATE and not self.delta:
                st.full = True
            else:
                st.pending |= relevant
            st.queue(origin)
            self.wake.set()

    def _rewarm(self, clusters: Iterable[str], origin: float | None) -> None:
        """Resend the assignments of changed EDS clusters, changed or not.

        Envoy replaces an updated cluster by a new one that stays warming until
        it receives its ClusterLoadAssignment (or its fetch timeout, 15 s by
        default, passes). The assignment goes out right after the cluster, in
        push order. Called for live changes (`notify`) and for clusters a
        resuming delta client held in an older version (`_delta_response`).
        """
        st = self.types[ENDPOINT]
        if not st.requested:
            return
        view, ns = self.view, self.namespace
        names = {n for n in clusters if st.subscribed(n) and view.get(ENDPOINT, n, ns) is not None}
        if not names:
            return
        for name in names:
            st.known.pop(name, None)
        st.pending |= names
        st.queue(origin)
        self.wake.set()

    def _resume_rewarm(self, clusters: list[str]) -> None:
        """`_rewarm` for clusters sent to replace an older version the client reported.

        A resuming client may ask for EDS (with the versions it holds) before or
        after this CDS response is built: before, the assignments are queued
        now; after, they are kept out of its initial versions when it asks.
        Only on ADS, where both types share the stream; the set holds only the
        clusters of this one response.
        """
        if self.only is not None:
            return
        view, ns = self.view, self.namespace
        names = [n for n in clusters if view.get(ENDPOINT, n, ns) is not None]
        if not names:
            return
        if self.types[ENDPOINT].requested:
            self._rewarm(names, None)
        else:
            self._rewarm_on_request.update(names)

    def next_response(self) -> tuple[str, bytes, float | None] | None:
        """The next response to write, in push order, or None when idle.

        Returns (type URL, serialized response, monotonic time its oldest change was queued).
        """
        for type_url in TYPES:
            st = self.types[type_url]
            if not st.has_work():
                continue
            body = self._delta_response(st) if self.delta else self._sotw_response(st)
            queued_at = st.queued_at
            st.queued_at = st.origin = None
            if body is not None:
                return type_url, body, queued_at
        return None

    def written(self, type_url: str, size: int, queued_at: float | None) -> None:
        """The writer task finished writing a response of `next_response`."""
        short = SHORT[type_url]
        m = self._metrics
        m.pushes_by[short].inc()
        m.sent_bytes_by[short].inc(size)
        if queued_at is not None:
            m.push_seconds_by[short].observe(time.monotonic() - queued_at)

    def _sent(self, st: TypeState, version: str) -> str:
        nonce = str(next(self._nonces))
        st.nonce, st.sent_version, st.sent_at = nonce, version, time.time()
        st.responses += 1
        if st.origin is not None and (st.sent_origin is None or st.origin < st.sent_origin):
            st.sent_origin = st.origin
        return nonce

    def _sotw_response(self, st: TypeState) -> bytes | None:
        view = self.view
        ns = self.namespace
        shared = b""
        picked: list[Resource] = []
        if st.type_url in FULL_STATE:
            st.full = st.must_respond = False
            if st.wildcard:
                shared = view.sotw_body(st.type_url, ns)
            else:
                picked = [r for n in sorted(st.names) if (r := view.get(st.type_url, n, ns)) is not None]
        else:
            names, st.pending = st.pending, set()
            st.must_respond = False
            picked = [r for n in sorted(names) if st.subscribed(n) and (r := view.get(st.type_url, n, ns)) is not None]
            if not picked:
                return None
            if st.type_url == ENDPOINT and view.located and self.client is not None:
                picked = [view.localize(r, self.client, ns) for r in picked]
        if self._unsupported is not None and self.client_type == GRPC and st.type_url in _REPORTED:
            if shared:
                self._unsupported.sent_all(self.client_type, self.node_id, view, st.type_url, ns)
            else:
                self._unsupported.sent(self.client_type, self.node_id, view, st.type_url, (r.name for r in picked), ns)
        version = str(self.view.version)
        nonce = self._sent(st, version)
        head = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=st.type_url, nonce=nonce
        ).SerializeToString()
        parts = [head, shared]
        for r in picked:
            parts += (b"\x12", varint(len(r.body)), r.body)
        return b"".join(parts)

    def _delta_response(self, st: TypeState) -> bytes | None:
        names, st.pending = st.pending, set()
        must, st.must_respond = st.must_respond, False
        picked: list[Resource] = []
        removed: list[str] = []
        outdated: list[str] = []
        """Clusters the client held in another version: their assignments must follow."""
        view, ns = self.view, self.namespace
        localize = st.type_url == ENDPOINT and view.located and self.client is not None
        for name in sorted(names):
            r = view.get(st.type_url, name, ns)  # None outside the client's scope: it does not exist for it
            if r is not None and localize:
                r = view.localize(r, self.client, ns)
            if r is not None and st.subscribed(name):
                had = st.known.get(name)
                if had != r.version:
                    picked.append(r)
                    st.known[name] = r.version
                    if had not in (None, _ABSENT, _RESEND):
                        outdated.append(name)
            elif r is None:
                had = st.known.get(name)
                if had not in (None, _ABSENT) or (had is None and name in st.names):
                    removed.append(name)
                if name in st.names:
                    st.known[name] = _ABSENT
                else:
                    st.known.pop(name, None)
        if not picked and not removed and not must:
            return None
        if outdated and st.type_url == CLUSTER:
            self._resume_rewarm(outdated)
        if self._unsupported is not None and self.client_type == GRPC and st.type_url in _REPORTED:
            self._unsupported.sent(self.client_type, self.node_id, view, st.type_url, (r.name for r in picked), ns)
        version = str(self.view.version)
        nonce = self._sent(st, version)
        head = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=st.type_url, nonce=nonce, removed_resources=removed
        ).SerializeToString()
        parts = [head]
        for r in picked:
            name_b, ver = r.name.encode(), r.version.encode()
            size = len(name_b) + len(ver) + len(r.body)
            inner = size + _vlen(len(name_b)) + _vlen(len(ver)) + _vlen(len(r.body)) + 3
            parts += (b"\x12", varint(inner), b"\x0a", varint(len(ver)), ver)
            parts += (b"\x12", varint(len(r.body)), r.body, b"\x1a", varint(len(name_b)), name_b)
        return b"".join(parts)

    # -- status ---------------------------------------------------------------------------

    def describe(self) -> str:
        return f"{self.node_id or '?'}@{self.peer} ({self.api}{' delta' if self.delta else ''} #{self.id})"

    def _resource_count(self, st: TypeState) -> int:
        """How many resources the client holds: delta, what it was sent; SotW, what it subscribes to and exists."""
        if self.delta:
            return sum(1 for v in st.known.values() if v not in (_ABSENT, _RESEND))
        view, ns = self.view, self.namespace
        if st.wildcard:
            return view.visible_count(st.type_url, ns)
        return sum(1 for n in st.names if view.get(st.type_url, n, ns) is not None)

    def syncz(self) -> dict[str, Any]:
        types: dict[str, Any] = {}
        for type_url, st in self.types.items():
            if not st.requested and not st.nonce:
                continue
            types[SHORT[type_url]] = {
                "state": st.state,
                "wildcard": st.wildcard,
                "subscribed": len(st.names),
                "resources": self._resource_count(st),
                "sent_version": st.sent_version,
                "sent_nonce": st.nonce,
                "sent_at": st.sent_at,
                "responses": st.responses,
                "acked_version": st.acked_version,
                "acked_nonce": st.acked_nonce,
                "nack": st.nack,
                "nacks": st.nacks,
            }
        return {
            "id": self.id,
            "node": self.node_id,
            "cluster": self.cluster,
            "user_agent": self.user_agent,
            "client_type": self.client_type,
            "peer": self.peer,
            "api": self.api,
            "delta": self.delta,
            "namespace": self.namespace,
            "locality": "/".join((c.region, c.zone, c.subzone)) if (c := self.client) is not None else None,
            "connected_since": self.connected_since,
            "held": self.held,
            "types": types,
        }


class News(dict[tuple[str, str | None, int], tuple[frozenset[str], View]]):
    """(type URL, client namespace, id of the client's previous view) → the changed names that are news to
    such a client, with that view (kept so its id is not reused while the memo lives). One per push."""


def _news(type_url: str, name: str, old: View, new: View, namespace: str | None) -> bool:
    """Whether a changed name is news to a client of `namespace`: it exists for the client in either view,
    and not in the same version in both (unless its assignment has locality variants, which may differ)."""
    before, after = old.get(type_url, name, namespace), new.get(type_url, name, namespace)
    if before is None and after is None:
        return False
    if before is None or after is None or before.version != after.version:
        return True
    return type_url == ENDPOINT and (new.has_variants(name, namespace) or old.has_variants(name, namespace))


def _subscribed_after(names: set[str], subscribe: set[str], unsubscribe: set[str]) -> int:
    """How many names a delta subscription holds after a request, in O(request), not O(subscription)."""
    removed = sum(1 for n in unsubscribe if n in names and n != "*")
    added = sum(1 for n in subscribe if n != "*" and (n not in names or n in unsubscribe))
    return len(names) - removed + added


def _names_key(req: discovery_pb2.DiscoveryRequest) -> bytes:
    """The request's resource names as bytes, built in C: comparing these is far cheaper than building sets."""
    only = discovery_pb2.DiscoveryRequest()
    only.CopyFrom(req)
    for name in ("version_info", "node", "response_nonce", "error_detail"):
        only.ClearField(name)
    key: bytes = only.SerializeToString()
    return key


def _vlen(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
