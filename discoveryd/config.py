"""The YAML config file: schema, loading, and errors that point at the line.

`load(path)` reads the file, validates the daemon's own sections with the
models below and each entry of `registries:` with the config model of the
adapter registered for its `kind` (entry-point group `discoveryd.adapters`).
Any problem raises `ConfigError`, whose `problems` are `file:line: key: message`
strings, one per problem, all of them at once.

Relative paths in registry configs are resolved by the adapters against
`Config.base_dir`, the directory of the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from discoveryd.hostport import split_hostport as _split_hostport
from discoveryd.location import dotted, yaml_line
from discoveryd.logs import LogFormat
from discoveryd.registry import ENTRY_POINT_GROUP, AdapterSpec, Duration, RegistryConfig, parse_duration

__all__ = ["Config", "ConfigError", "Duration", "load", "parse_duration", "split_hostport"]

DEFAULT_PATHS = (Path("config/discoveryd.yaml"), Path("/etc/discoveryd/discoveryd.yaml"))


def split_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """A listen or upstream address of the config → (host, port); port 0 allowed (the system picks one)."""
    return _split_hostport(value, default_port, any_port=True)


def _hostport(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected host:port")
    split_hostport(value)
    return value


HostPort = Annotated[str, BeforeValidator(_hostport)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LbPolicy(StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"


class TlsConfig(_Section):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mTLS)."""


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class XdsConfig(_Section):
    listen: HostPort | None = "127.0.0.1:15010"
    """The plaintext listener; null turns it off (then `tls` must be set: at least one listener)."""
    tls_listen: HostPort = "127.0.0.1:15012"
    """Used only when `tls` is set."""
    tls: TlsConfig | None = None
    debounce_after: Duration = 0.1
    debounce_max: Duration = 1.0
    connect_timeout: Duration = 10.0
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    max_connection_age: Duration | None = 1800.0
    """A client connection is told to go away (HTTP/2 GOAWAY) after this long, give or take 10%, so
    clients spread over replicas after a rollout; null: never (Istio's default is 30m)."""
    max_connection_age_grace: Duration = 10.0
    """How long streams of such a connection may go on before it is closed."""
    root_namespace: str = "istio-system"
    """Istio's mesh root namespace (meshConfig.rootNamespace): its DestinationRules apply to every client
    that finds none in its own namespace or the service's."""

    @field_validator("root_namespace")
    @classmethod
    def _root_namespace(cls, value: str) -> str:
        if not _NAMESPACE.fullmatch(value):
            raise ValueError(f"{value!r} is not a namespace name (a DNS-1123 label)")
        return value


def _forward_target(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an upstream resolver 'ip' or 'ip:port'")
    host, _ = split_hostport(value, 53)
    ipaddress.ip_address(host)
    return value


class RrlConfig(_Section):
    """Response rate limiting of UDP answers per source prefix (`dns/rrl.py`)."""

    responses_per_second: float = Field(default=0.0, ge=0)
    """Per source prefix; 0 turns RRL off."""
    slip: int = Field(default=1, ge=0, le=100)
    """Every slip-th limited response goes out truncated (TC) instead of dropped; 0 drops them all."""
    ipv4_prefix: int = Field(default=24, ge=8, le=32)
    ipv6_prefix: int = Field(default=56, ge=16, le=128)
    table_size: int = Field(default=65536, ge=1, le=1 << 24)
    """Token buckets (prefixes that hash alike share one)."""


def _cookie_secret(value: Any) -> Any:
    if isinstance(value, str):
        try:
            if len(bytes.fromhex(value)) == 16:
                return value
        except ValueError:
            pass
        raise ValueError("a cookie secret is 32 hex digits (16 bytes)")
    return value


class DnsConfig(_Section):
    listen: list[HostPort] = Field(default_factory=lambda: ["127.0.0.1:15053"])
    zones: list[str] = Field(default_factory=list)
    ttl: Duration = 30.0
    forward: list[Annotated[str, BeforeValidator(_forward_target)]] = Field(default_factory=list)
    allow_forward_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=lambda: [
            ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128")
        ]
    )
    forward_timeout: Duration = 2.0
    """Per upstream, per try."""
    forward_case_randomization: bool = True
    """Random letter case in names sent upstream (0x20), checked in replies; off for upstreams that do not echo it."""
    cache_size: int = Field(default=10000, ge=0)
    """Forwarded answers kept (0: no cache)."""
    tcp_idle_timeout: Duration = 10.0
    """How long a TCP connection may go without a complete query; shorter while over half the slots are in use."""
    tcp_max_connections: int = Field(default=1024, ge=1)
    tcp_max_connections_per_source: int = Field(default=64, ge=1)
    """TCP connections one client may hold (an IPv4 address, an IPv6 /64); further ones are closed at once."""
    query_log: bool = False
    """One log line per answered query (client, name, type, rcode, duration) on logger discoveryd.dns.query."""
    query_log_rate: float = Field(default=100.0, gt=0)
    """Query log lines per second at most; the rest are counted and summarised."""
    rrl: RrlConfig = Field(default_factory=RrlConfig)
    nsid: str | None = None
    """NSID (RFC 5001): the server identifier sent to clients whose query carries an empty NSID
    option (`dig +nsid`), e.g. the host name of this replica; null (default): not sent."""
    cookies: bool = False
    """DNS server cookies (RFC 7873, RFC 9018 form): answers to queries with a client cookie carry
    a server cookie. Cookies are not required (no BADCOOKIE). Off by default."""
    cookie_secret: Annotated[str, BeforeValidator(_cookie_secret)] | None = None
    """32 hex digits shared by replicas so that they accept each other's cookies; null: random per start."""

    @field_validator("zones")
    @classmethod
    def _zones(cls, zones: list[str]) -> list[str]:
        return [z.strip().rstrip(".").lower() for z in zones]


class AdminConfig(_Section):
    listen: HostPort = "127.0.0.1:15014"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class _Document(_Section):
    registries: list[dict[str, Any]] = Field(default_factory=list)
    xds: XdsConfig = Field(default_factory=XdsConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT
    state_dir: str | None = None
    ready_timeout: Duration = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config file."""

    path: Path
    registries: tuple[RegistryConfig, ...]
    xds: XdsConfig
    dns: DnsConfig
    admin: AdminConfig
    log_level: LogLevel
    log_format: LogFormat = LogFormat.TEXT
    state_dir: Path | None = None
    """Where the index snapshot for warm restarts lives (discoveryd/state.py); None: no snapshot."""
    ready_timeout: float = 30.0
    """Seconds a registry may take to sync (or be restored) before it stops blocking readiness."""

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def to_dict(self) -> dict[str, Any]:
        """For /debug/configz: the effective config, defaults filled in."""
        return {
            "path": str(self.path),
            "registries": [r.model_dump(mode="json") for r in self.registries],
            "xds": self.xds.model_dump(mode="json"),
            "dns": self.dns.model_dump(mode="json"),
            "admin": self.admin.model_dump(mode="json"),
            "log_level": self.log_level.value,
            "log_format": self.log_format.value,
            "state_dir": None if self.state_dir is None else str(self.state_dir),
            "ready_timeout": self.ready_timeout,
        }


class ConfigError(Exception):
    """The config cannot be used; `problems` are `file:line: key: message` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def adapter_kinds() -> list[str]:
    """Registry kinds installed (entry-point group `discoveryd.adapters`), without importing them."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


@cache
def adapter(kind: str) -> AdapterSpec[Any] | None:
    """The adapter for `kind`, imported on first use; None when no such kind is installed."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=kind):
        spec = ep.load()
        if not isinstance(spec, AdapterSpec):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not an AdapterSpec")
        return spec
    return None


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def load(path: str | os.PathLike[str]) -> Config:
    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from e
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    """Validate config text as if read from `path` (for line numbers and base_dir)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}{line}: invalid YAML: {reason}"]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the config must be a mapping of sections"])

    problems: list[str] = []
    try:
        doc = _Document.model_validate(data)
    except ValidationError as e:
        problems.extend(_format(e, path, node, ()))
        raise ConfigError(problems) from None

    registries: list[RegistryConfig] = []
    seen: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(doc.registries):
        loc: tuple[str | int, ...] = ("registries", i)
        kind = raw.get("kind")
        spec = adapter(kind) if isinstance(kind, str) else None
        if spec is None:
            known = ", ".join(adapter_kinds()) or "none installed"
            where = _where(path, node, (*loc, "kind") if "kind" in raw else loc)
            problems.append(f"{where}: registries[{i}].kind: unknown registry kind {kind!r} (known: {known})")
            continue
        try:
            reg = spec.config_model.model_validate(raw)
        except ValidationError as e:
            problems.extend(_format(e, path, node, loc))
            continue
        key = (reg.kind, reg.name)
        if key in seen:
            where = _where(path, node, (*loc, "name"))
            problems.append(
                f"{where}: registries[{i}].name: {reg.kind}/{reg.name} is already defined by registries[{seen[key]}]"
            )
            continue
        seen[key] = i
        registries.append(reg)
    if doc.xds.listen is None and doc.xds.tls is None:
        where = _where(path, node, ("xds", "listen"))
        problems.append(f"{where}: xds.listen: null turns off the plaintext listener; set xds.tls to serve over TLS")
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        registries=tuple(registries),
        xds=doc.xds,
        dns=doc.dns,
        admin=doc.admin,
        log_level=doc.log_level,
        log_format=doc.log_format,
        state_dir=None if doc.state_dir is None else path.parent / Path(doc.state_dir).expanduser(),
        ready_timeout=doc.ready_timeout,
    )


def _format(e: ValidationError, path: Path, node: yaml.Node | None, prefix: tuple[str | int, ...]) -> list[str]:
    out = []
    for err in e.errors():
        loc = (*prefix, *(p for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-")))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(f"{_where(path, node, loc)}: {dotted(tuple(loc)) or '(top)'}: {msg}")
    return out


def _where(path: Path, node: yaml.Node | None, loc: Sequence[str | int]) -> str:
    """`file:line` of the deepest YAML node along `loc` that exists."""
    return f"{path}:{1 if node is None else yaml_line(node, tuple(loc))}"
