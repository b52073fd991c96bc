"""Configuration of an etcd registry (`kind: etcd` in `registries:`).

The supervisor validates each `kind: etcd` entry with `EtcdConfig`; the
registry reads files named here (password, TLS material) only when it
connects, relative to the config file's directory, so that rotated
credentials are picked up on the next reconnect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from adapters.etcd.formats import FORMATS
from adapters.toolkit.backoff import check_backoff
from adapters.toolkit.hostport import split_url
from adapters.toolkit.names import domain_name
from adapters.toolkit.tls import ClientTls
from discoveryd.registry import Duration, RegistryConfig


def split_endpoint(url: str) -> tuple[str, str, int]:
    """`http://127.0.0.1:2379`, `https://[::1]:2379`, `etcd-0:2379` → (scheme, host, port).

    A URL without a scheme is `http`; without a port, 2379.
    """
    return split_url(url, 2379)


def _endpoint(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an etcd URL such as http://127.0.0.1:2379")
    split_endpoint(value.strip())
    return value.strip()


EtcdTls = ClientTls
"""`tls:` of this registry (see `adapters.toolkit.tls`)."""


class EtcdConfig(RegistryConfig):
    """One etcd cluster and the key layout its services are registered with."""

    kind: Literal["etcd"]
    endpoints: list[Annotated[str, BeforeValidator(_endpoint)]] = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1
    )
    """Members of one cluster, tried in turn (failover); all http or all https."""
    prefix: str = ""
    """Key prefix to watch; empty: the format's convention (`/services/`, `/skydns/`). Always ends in `/`."""
    format: str = "etcd-naming"
    domain: str = "mesh.local"
    """etcd-naming: services are `<service>.<domain>`. Both formats: the DNS zone served for them."""
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: EtcdTls | None = None
    """TLS settings; TLS is on when the endpoints are https."""
    dial_timeout: Duration = 5.0
    """Per endpoint, to connect (and authenticate)."""
    request_timeout: Duration = 30.0
    """Per range page and per watch creation."""
    keepalive: Duration = 10.0
    """gRPC keepalive pings on idle watch streams, to notice a dead member."""
    backoff_initial: Duration = 0.2
    backoff_max: Duration = 30.0
    page_size: int = Field(default=1000, ge=1, le=100_000)
    """Keys per range request during a full list."""

    @model_validator(mode="before")
    @classmethod
    def _default_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("prefix"):
            fmt = data.get("format", "etcd-naming")
            if isinstance(fmt, str) and fmt in FORMATS:
                return {**data, "prefix": FORMATS[fmt].default_prefix}
        return data

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return value if value.endswith("/") else value + "/"

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r} (known: {', '.join(sorted(FORMATS))})")
        return value

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value, underscore=True)

    @model_validator(mode="after")
    def _check(self) -> EtcdConfig:
        schemes = {split_endpoint(e)[0] for e in self.endpoints}
        if len(schemes) > 1:
            raise ValueError("endpoints: mixing http and https endpoints is not supported")
        if self.tls is not None and schemes == {"http"}:
            raise ValueError("tls: set, but the endpoints are http:// (use https:// endpoints)")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: set only one")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("username: required with a password")
        if self.username is not None and not has_password:
            raise ValueError("password or password_file: required with a username")
        check_backoff(self.backoff_initial, self.backoff_max)
        return self

    @property
    def secure(self) -> bool:
        return split_endpoint(self.endpoints[0])[0] == "https"
