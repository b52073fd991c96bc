"""`host:port` and `scheme://host:port`: the one parser of addresses given by people or registries.

Used by the config (listen and upstream addresses) and, through `adapters.toolkit.hostport`, by adapters.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from discoveryd.model import is_ip

__all__ = ["is_ip", "split_hostport", "split_url"]


def split_hostport(
    value: str, default_port: int | None = None, *, require_ip: bool = False, any_port: bool = False
) -> tuple[str, int]:
    """`10.0.0.1:8080`, `[fd00::1]:8080`, `name:53` (or, with `default_port`, `10.0.0.1`, `[::1]`) → (host, port).

    The port is 1-65535, or 0-65535 with `any_port` (a listen address: 0 lets the system pick one).
    Raises ValueError naming what is wrong.
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected [address]:port")
        port_text = rest[1:]
        if not is_ip(host) or ":" not in host:
            raise ValueError(f"{value!r}: only an IPv6 address goes in brackets")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif text.count(":") > 1 and default_port is not None and is_ip(text):
        host, port_text = text, ""  # a bare IPv6 address
    elif ":" in text:
        raise ValueError(f"{value!r}: an IPv6 address with a port is written [address]:port")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if require_ip and not is_ip(host):
        raise ValueError(f"the host in {value!r} must be an IP address")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected host:port)")
        return host, default_port
    lowest = 0 if any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number {lowest}-65535")
    return host, int(port_text)


def split_url(url: str, default_port: int, schemes: tuple[str, ...] = ("http", "https")) -> tuple[str, str, int]:
    """`http://127.0.0.1:2379`, `https://[::1]:2379`, `etcd-0:2379` → (scheme, host, port).

    A URL without a scheme gets the first of `schemes`; without a port, `default_port`.
    Nothing but scheme, host and port is allowed.
    """
    parts = urlsplit(url if "://" in url else f"{schemes[0]}://{url}")
    if parts.scheme not in schemes:
        raise ValueError(f"{url!r}: the scheme must be {' or '.join(schemes)}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r}: expected scheme://host:port and nothing else")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: missing host")
    return parts.scheme, parts.hostname, port if port is not None else default_port
