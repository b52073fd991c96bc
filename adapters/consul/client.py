"""A thin asyncio client for the few Consul HTTP API reads the registry needs.

The registry owns one `ConsulClient` per session (connect → sync → follow),
opened and closed in its task. Each call is one HTTP request; a blocking read
(`index` > 0) holds the connection up to `wait` plus Consul's jitter
(wait/16), so its socket read timeout is `wait + wait/16 + request_timeout`.

Errors come out as two types: `ConsulUnavailable` (no connection, a timeout,
a reset, an answer that is not the JSON expected) and `ConsulHTTPError` (the
agent answered with a status; `status` tells 403 ACL from 429 from 5xx, and
`retry_after` carries a 429's hint). Neither ever contains the token: it is
sent only in the `X-Consul-Token` header and never formatted into a message.

Why not py-consul's `consul.aio`: its health and catalog reads take no
consistency mode (`?stale`, `?consistent`), no namespace or partition, no
per-request read timeout, and it folds 429 and 5xx into exception strings,
losing the status and `Retry-After` the backoff needs. The tests still check
the fake agent with py-consul, so the two agree on the wire.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from adapters.consul.config import Consistency, ConsulConfig, split_address

_BODY_LIMIT = 200
"""Characters of an error answer's body kept in the message."""


class ConsulError(Exception):
    """A request to the agent did not give a usable answer."""


class ConsulUnavailable(ConsulError):
    """No answer: refused, reset, timed out, or not the JSON the API documents."""


class ConsulHTTPError(ConsulError):
    """The agent answered with an error status."""

    def __init__(self, status: int, path: str, body: str, retry_after: float | None = None) -> None:
        body = " ".join(body.split())[:_BODY_LIMIT]
        hint = {403: " (ACL: the token lacks read access, or is unknown)", 429: " (rate limited)"}.get(status, "")
        super().__init__(f"{path}: HTTP {status}{hint}: {body or '(no body)'}")
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Reply:
    """One read: its `X-Consul-Index` (0 when absent or unparsable) and the decoded JSON body."""

    index: int
    data: Any


def read_token(config: ConsulConfig, base_dir: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The ACL token: `token_file`, else env CONSUL_HTTP_TOKEN_FILE, else env CONSUL_HTTP_TOKEN, else None.

    Raises ConsulUnavailable (naming the file, never its content) when a token file cannot be read.
    """
    env = os.environ if environ is None else environ
    path: Path | None = None
    if config.token_file is not None:
        path = base_dir / config.token_file.expanduser()
    elif env.get("CONSUL_HTTP_TOKEN_FILE"):
        path = Path(env["CONSUL_HTTP_TOKEN_FILE"]).expanduser()
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConsulUnavailable(f"token file {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        return token or None
    return env.get("CONSUL_HTTP_TOKEN") or None


def _ssl_context(config: ConsulConfig, base_dir: Path) -> ssl.SSLContext | None:
    if not config.secure:
        return None
    tls = config.tls
    try:
        ctx = ssl.create_default_context(
            cafile=str(base_dir / tls.ca_file.expanduser()) if tls is not None and tls.ca_file else None
        )
        if tls is not None and tls.cert_file is not None and tls.key_file is not None:
            ctx.load_cert_chain(base_dir / tls.cert_file.expanduser(), base_dir / tls.key_file.expanduser())
    except (OSError, ssl.SSLError) as e:
        raise ConsulUnavailable(f"TLS material: {e}") from None
    return ctx


def _wait_param(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds * 1000))}ms"


class ConsulClient:
    """HTTP(S) reads against one agent with one token; used by one registry's tasks, closed by its session."""

    def __init__(self, config: ConsulConfig, base_dir: Path, token: str | None) -> None:
        self._config = config
        scheme, host, port = split_address(config.address)
        self._base = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        self._headers = {"X-Consul-Token": token} if token else {}
        self._ssl = _ssl_context(config, base_dir)
        self._server_name = config.tls.server_name if config.tls is not None else None
        # One connection per request in flight; `max_connections` caps them with a fair (FIFO) semaphore,
        # so a watch that just got its answer queues behind the ones waiting instead of starving them.
        self._slots = asyncio.Semaphore(config.max_connections) if config.max_connections else None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl if self._ssl is not None else False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
            raise_for_status=False,
        )

    def set_token(self, token: str | None) -> None:
        """Use `token` from the next request on (a rotated token file)."""
        self._headers = {"X-Consul-Token": token} if token else {}

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _params(self, dc: str | None, index: int, tags: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        cfg = self._config
        params: list[tuple[str, str]] = []
        if dc:
            params.append(("dc", dc))
        if index > 0:
            params += [("index", str(index)), ("wait", _wait_param(cfg.wait))]
        if cfg.consistency is Consistency.STALE:
            params.append(("stale", ""))
        elif cfg.consistency is Consistency.CONSISTENT:
            params.append(("consistent", ""))
        if cfg.namespace:
            params.append(("ns", cfg.namespace))
        if cfg.partition:
            params.append(("partition", cfg.partition))
        params += [("tag", t) for t in tags]
        return params

    async def _get(self, path: str, params: list[tuple[str, str]], blocking: bool) -> Reply:
        if self._slots is None:
            return await self._request(path, params, blocking)
        async with self._slots:
            return await self._request(path, params, blocking)

    async def _request(self, path: str, params: list[tuple[str, str]], blocking: bool) -> Reply:
        cfg = self._config
        read = cfg.request_timeout + (cfg.wait + cfg.wait / 16 if blocking else 0.0)
        try:
            async with self._session.get(
                self._base + path,
                params=params,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=read),
                server_hostname=self._server_name,
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    retry = resp.headers.get("Retry-After", "")
                    raise ConsulHTTPError(
                        resp.status,
                        path,
                        body.decode("utf-8", "replace"),
                        float(retry) if retry.isdigit() else None,
                    )
                raw_index = resp.headers.get("X-Consul-Index", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise ConsulUnavailable(f"{path}: {reason}") from None
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ConsulUnavailable(f"{path}: the answer is not JSON: {e}") from None
        index = int(raw_index) if raw_index.lstrip("-").isdigit() else 0
        return Reply(index, data)

    async def agent_self(self) -> Reply:
        """`/v1/agent/self`: the agent's config, including its `Datacenter`."""
        return await self._get("/v1/agent/self", [], False)

    async def services(self, dc: str, index: int) -> Reply:
        """`/v1/catalog/services` of `dc`: {service name: [tags of any instance]}; blocks when `index` > 0."""
        return await self._get("/v1/catalog/services", self._params(dc, index), index > 0)

    async def health(self, service: str, dc: str, index: int, tags: tuple[str, ...] = ()) -> Reply:
        """`/v1/health/service/<service>` of `dc`: every instance with its node and checks; blocks when `index` > 0."""
        path = "/v1/health/service/" + quote(service, safe="")
        return await self._get(path, self._params(dc, index, tags), index > 0)
