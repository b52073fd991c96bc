"""Configuration of a Consul registry (`kind: consul` in `registries:`).

The supervisor validates each `kind: consul` entry with `ConsulConfig`. The
ACL token is never part of the config: it is read from `token_file` (or the
environment, `CONSUL_HTTP_TOKEN_FILE` / `CONSUL_HTTP_TOKEN`) when the
registry connects, so it cannot reach /debug/configz, and a rotated token is
picked up on the next reconnect. Relative paths are relative to the config
file's directory.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from adapters.toolkit.backoff import check_backoff
from adapters.toolkit.hostport import split_url
from adapters.toolkit.names import domain_name, is_dns_label
from adapters.toolkit.tls import ClientTls
from discoveryd.registry import Duration, RegistryConfig

_MAX_WAIT = 600.0
"""Consul caps a blocking query's `wait` at 10 minutes."""


def split_address(url: str) -> tuple[str, str, int]:
    """`http://127.0.0.1:8500`, `https://[::1]:8501`, `consul:8500` → (scheme, host, port).

    Without a scheme: http; without a port: 8500 (http) or 8501 (https), Consul's defaults.
    """
    scheme, host, port = split_url(url, 0)
    return scheme, host, port or (8501 if scheme == "https" else 8500)


class Consistency(StrEnum):
    """Consul's read consistency modes (`?stale`, `?consistent`, or neither)."""

    DEFAULT = "default"
    STALE = "stale"
    CONSISTENT = "consistent"


ConsulTls = ClientTls
"""`tls:` of this registry (see `adapters.toolkit.tls`)."""


class ConsulConfig(RegistryConfig):
    """One Consul agent and the datacenters whose services are read through it."""

    kind: Literal["consul"]
    address: str = "http://127.0.0.1:8500"
    """The agent's HTTP(S) API."""
    token_file: Path | None = None
    """A file holding the ACL token; omitted: env CONSUL_HTTP_TOKEN_FILE, then CONSUL_HTTP_TOKEN, then none."""
    tls: ConsulTls | None = None
    """Only with an https:// address; omitted there: system CAs, no client certificate."""
    datacenters: list[str] = Field(default_factory=list)
    """Datacenters to read; empty: the agent's own (from /v1/agent/self)."""
    domain: str = "consul"
    """Hostnames are `<svc>.service.<dc>.<domain>` (+ `<svc>.service.<domain>` in the agent's own datacenter)."""
    consistency: Consistency = Consistency.DEFAULT
    tags: list[str] = Field(default_factory=list)
    """Only instances carrying every one of these tags (Consul's `?tag=` filter)."""
    tagged_address: Literal["lan", "wan"] | None = None
    """Use the instances' (else their nodes') `TaggedAddresses` of this kind.

    null: Service.Address, else Node.Address."""
    zone_node_meta: str = "zone"
    """The node meta key whose value becomes the endpoints' locality zone (region is the datacenter)."""
    namespace: str | None = None
    """Consul Enterprise: the namespace to read (`?ns=`); null: the token's default."""
    partition: str | None = None
    """Consul Enterprise: the admin partition to read (`?partition=`); null: the token's default."""
    wait: Duration = 300.0
    """The `wait` of each blocking query (Consul's default 5m, at most 10m); the agent adds up to wait/16."""
    min_interval: Duration = 0.05
    """Least time between two requests of one watch (a churning service cannot make us hammer the agent)."""
    connect_timeout: Duration = 5.0
    request_timeout: Duration = 30.0
    """Non-blocking requests (/v1/agent/self, first reads); blocking ones wait `wait` + wait/16 + this."""
    max_connections: int = Field(default=0, ge=0)
    """HTTP connections to the agent at most; 0: one per watch (a watch per service, +1 per datacenter).

    A Consul agent accepts `limits.http_max_conns_per_client` (default 200) connections per client
    address: above that many services, raise it on the agent, or cap here (watches beyond the cap
    then wait for a free connection, so their changes arrive up to `wait` late)."""
    initial_concurrency: int = Field(default=32, ge=1, le=1024)
    """Services read at once during a datacenter's full sync."""
    backoff_initial: Duration = 0.2
    backoff_max: Duration = 30.0
    acl_retry: Duration = 30.0
    """After a 403 (ACL): how long before asking again (with jitter)."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value.strip())
        return value.strip()

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value)

    @field_validator("datacenters")
    @classmethod
    def _datacenters(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for dc in value:
            name = dc.strip().lower()
            if not is_dns_label(name):
                raise ValueError(f"{dc!r} is not a datacenter name usable as a DNS label")
            if name in out:
                raise ValueError(f"{dc!r} is listed twice")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _check(self) -> ConsulConfig:
        if self.tls is not None and not self.secure:
            raise ValueError("tls: set, but the address is http:// (use an https:// address)")
        if not 0 < self.wait <= _MAX_WAIT:
            raise ValueError("wait: must be more than 0 and at most 10m (Consul's limit)")
        check_backoff(self.backoff_initial, self.backoff_max)
        if self.acl_retry <= 0 or self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("acl_retry, connect_timeout and request_timeout must be > 0")
        return self

    @property
    def secure(self) -> bool:
        return split_address(self.address)[0] == "https"
