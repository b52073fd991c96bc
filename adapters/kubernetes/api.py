"""List-then-watch against one Kubernetes API server, on raw JSON.

`Api` is one authenticated connection: the official client (`kubernetes.aio`)
loads the kubeconfig or the in-cluster service account and owns auth
(tokens, refresh hooks, client certificates) and TLS; requests go through its
`ApiClient`, but bodies are read as bytes and parsed with orjson, never into
the generated models (measured in bench/kubernetes_bench.py).

`Reflector` (client-go's name) keeps one `Store` equal to one kind:

1. list in pages (`limit`/`continue`) at one resourceVersion; a 410 on a
   continue token (the snapshot expired) starts the list over; the whole
   list goes to `Store.replace` at once, so a relist never deletes what
   still exists;
2. watch from the list's resourceVersion with `allowWatchBookmarks=true`
   and `timeoutSeconds`; every event's resourceVersion (BOOKMARK too) is
   kept, as an opaque string; each chunk read off the stream goes to
   `Store.apply` as one list of events;
3. a clean end of the stream watches again from the last version; 410 Gone
   (HTTP status or an ERROR event) lists again (1), and so does a version
   newer than the server's (504 "Too large resource version": the cluster
   was replaced, as client-go's reflector treats it); any other error raises
   to the caller, which reconnects; the version is kept, so the next session
   resumes the watch where this one stopped.

Everything runs in the task that awaits `Reflector.run`; cancelling it
closes the open response.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig

log = logging.getLogger("discoveryd.adapters.kubernetes")

Obj = dict[str, Any]


class ApiError(Exception):
    """The API server answered with an error Status (or not at all sensibly)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is too old; only a new list can catch up."""


class TooLarge(ApiError):
    """The resourceVersion is newer than the server's (the cluster was replaced): only a new list can catch up."""


class NotFound(ApiError):
    """404: the resource is not served (a CRD not installed)."""


def _error(status: int, body: bytes) -> ApiError:
    reason, message = "", body[:200].decode("utf-8", "replace")
    try:
        doc = orjson.loads(body)
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason") or ""), str(doc.get("message") or message)
    except orjson.JSONDecodeError:
        pass
    if status == 410:
        return Gone(status, reason, message)
    if status == 404:
        return NotFound(status, reason, message)
    if status == 504 and "too large resource version" in message.lower():
        return TooLarge(status, reason, message)
    return ApiError(status, reason, message)


@dataclass(frozen=True, slots=True)
class Kind:
    """One resource to list and watch: its API path (cluster-wide or in one namespace)."""

    group: str
    version: str
    plural: str
    namespace: str | None = None

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespace is not None:
            return f"{base}/namespaces/{self.namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def __str__(self) -> str:
        return self.path


class Api:
    """One authenticated client of one API server. Create with `connect`, `close` when done."""

    def __init__(self, api_client: kclient.ApiClient, request_timeout: float) -> None:
        self._client = api_client
        self._timeout = request_timeout

    @classmethod
    async def connect(cls, kubeconfig: Path | None, context: str | None, request_timeout: float) -> Api:
        """Load credentials (a kubeconfig file and context, or the in-cluster service account)."""
        configuration = kclient.Configuration()
        try:
            if kubeconfig is not None:
                await kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(kubeconfig),
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            else:
                kconfig.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (kconfig.ConfigException, OSError, ValueError) as e:
            where = str(kubeconfig) if kubeconfig is not None else "in-cluster service account"
            raise ApiError(0, "Config", f"{where}: {e}") from None
        configuration.retries = None
        return cls(kclient.ApiClient(configuration), request_timeout)

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    async def _get(self, path: str, query: Sequence[tuple[str, str]], timeout: aiohttp.ClientTimeout) -> Any:
        method, url, headers, _, _ = await self._client.param_serialize(
            "GET",
            path,
            query_params=list(query),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        reply = await self._client.call_api(method, url, headers, _request_timeout=timeout)
        return reply.response

    async def list_page(self, kind: Kind, query: Sequence[tuple[str, str]]) -> Obj:
        """One page of a list, parsed; ApiError for an error Status."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        response = await self._get(kind.path, query, timeout)
        try:
            body = await response.read()
        finally:
            response.release()
        if response.status != 200:
            raise _error(response.status, body)
        doc = orjson.loads(body)
        if not isinstance(doc, dict):
            raise ApiError(response.status, "BadResponse", "a list that is not an object")
        return doc

    async def watch(
        self, kind: Kind, query: Sequence[tuple[str, str]], timeout_seconds: int
    ) -> AsyncIterator[list[Obj]]:
        """Watch events, a list per chunk read off the stream, until the server ends it (then returns)."""
        params = [*query, ("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        # No total timeout: the server ends the stream at timeoutSeconds. A silence longer than that
        # (plus the request timeout) means a dead peer.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=timeout_seconds + self._timeout)
        response = await self._get(kind.path, params, timeout)
        try:
            if response.status != 200:
                raise _error(response.status, await response.read())
            yield []  # connected: the watch is established
            pending = b""
            async for chunk in response.content.iter_any():
                lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
                pending = lines.pop()
                events = [orjson.loads(line) for line in lines if line.strip()]
                if events:
                    yield events
            if pending.strip():
                yield [orjson.loads(pending)]
        finally:
            response.release()
            response.close()


class Store(Protocol):
    """What a Reflector keeps equal to its kind. Called from the reflector's task, never concurrently."""

    def replace(self, items: list[Obj]) -> None:
        """The complete current set of objects (a list or a relist)."""

    def apply(self, events: list[tuple[str, Obj]]) -> None:
        """Changes in order: (`ADDED`|`MODIFIED`|`DELETED`, object)."""


class Reflector:
    """List-then-watch one `Kind` into one `Store` (see the module docstring)."""

    def __init__(
        self,
        kind: Kind,
        store: Store,
        *,
        page_size: int,
        watch_timeout: float,
        label_selector: str | None = None,
        on_listed: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.store = store
        self._page_size = page_size
        self._watch_timeout = max(1, int(watch_timeout))
        self._selector = label_selector
        self._on_listed = on_listed
        self.resource_version: str | None = None
        """The version everything up to which is in the store; None: a list is needed."""
        self.lists = 0
        self.watches = 0
        self.events = 0

    def mark_listed(self) -> None:
        if self._on_listed is not None:
            self._on_listed()

    def _query(self) -> list[tuple[str, str]]:
        return [("labelSelector", self._selector)] if self._selector else []

    async def run(self, api: Api, on_watching: Callable[[], None] | None = None) -> None:
        """List when needed, then watch, until an error other than 410 (raised).

        `on_watching` is called each time a watch is established (the store reflects the kind).
        """
        while True:
            if self.resource_version is None:
                items, version = await self.list(api)
                self.store.replace(items)
                self.resource_version = version
                self.lists += 1
                self.mark_listed()
            try:
                await self._watch(api, on_watching)
            except (Gone, TooLarge) as e:
                log.info("%s %s: %s; listing again", api.host, self.kind, e.message)
                self.resource_version = None

    async def list(self, api: Api) -> tuple[list[Obj], str]:
        """Every object, read in pages at one version; that version. Starts over on an expired continue token."""
        while True:
            items: list[Obj] = []
            token = ""
            try:
                while True:
                    query = [*self._query(), ("limit", str(self._page_size))]
                    if token:
                        query.append(("continue", token))
                    page = await api.list_page(self.kind, query)
                    items.extend(page.get("items") or ())
                    meta = page.get("metadata") or {}
                    token = str(meta.get("continue") or "")
                    if not token:
                        return items, str(meta.get("resourceVersion") or "")
            except Gone as e:
                if not token:
                    raise
                log.info("%s %s: continue token expired (%s); listing from the start", api.host, self.kind, e.message)

    async def _watch(self, api: Api, on_watching: Callable[[], None] | None) -> None:
        assert self.resource_version is not None
        query = [*self._query(), ("resourceVersion", self.resource_version)]
        self.watches += 1
        stream = api.watch(self.kind, query, self._watch_timeout)
        try:
            async for chunk in stream:
                if not chunk:
                    if on_watching is not None:
                        on_watching()
                    continue
                changes: list[tuple[str, Obj]] = []
                version = self.resource_version
                for event in chunk:
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if changes:
                            self.store.apply(changes)
                            self.resource_version = version
                        raise _error(int(obj.get("code") or 500), orjson.dumps(obj))
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        version = str(rv)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        changes.append((kind, obj))
                if changes:
                    self.events += len(changes)
                    self.store.apply(changes)
                self.resource_version = version
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
