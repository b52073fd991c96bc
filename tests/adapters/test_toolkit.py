"""The shared adapter helpers: one set of rules for names and addresses."""

from __future__ import annotations

import pytest
import yaml

from adapters.toolkit.hostport import split_hostport, split_url
from adapters.toolkit.location import dotted, yaml_line
from adapters.toolkit.names import is_dns1123_label, is_dns1123_subdomain, is_dns_label, is_dns_name, is_fqdn


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        ("10.0.0.1:8080", None, ("10.0.0.1", 8080)),
        ("[fd00::1]:53", None, ("fd00::1", 53)),
        ("name.example:53", None, ("name.example", 53)),
        ("10.0.0.1", 53, ("10.0.0.1", 53)),
        ("[::1]", 53, ("::1", 53)),
        ("::1", 53, ("::1", 53)),
    ],
)
def test_split_hostport(value: str, default: int | None, expected: tuple[str, int]) -> None:
    assert split_hostport(value, default) == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("10.0.0.1", "has no port"),
        ("10.0.0.1:0", "1-65535"),
        ("10.0.0.1:70000", "1-65535"),
        ("10.0.0.1:http", "1-65535"),
        ("fd00::1:80", "[address]:port"),
        ("[fd00::1:80", "missing ']'"),
        ("[name]:80", "only an IPv6 address"),
        (":80", "missing host"),
    ],
)
def test_split_hostport_errors(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        split_hostport(value)


def test_split_hostport_can_require_an_ip() -> None:
    with pytest.raises(ValueError, match="must be an IP address"):
        split_hostport("etcd-0:2379", require_ip=True)


def test_split_url() -> None:
    assert split_url("etcd-0", 2379) == ("http", "etcd-0", 2379)
    assert split_url("https://[::1]:2380", 2379) == ("https", "::1", 2380)
    for bad in ("ftp://x:1", "http://x:1/path", "http://user@x:1", "http://x:99999"):
        with pytest.raises(ValueError):
            split_url(bad, 2379)


def test_names() -> None:
    assert is_dns_name("a-b.example") and not is_dns_name("A.example") and is_dns_name("A.example", upper=True)
    assert not is_dns_name("_srv.example") and is_dns_name("_srv.example", underscore=True)
    assert not is_dns_name("a..b") and not is_dns_name("-a.b") and not is_dns_name("")
    assert not is_dns_name("a" * 64 + ".example") and is_dns_label("a" * 63)
    assert is_fqdn("Api.Example.com.") and not is_fqdn("api_x.example.com") and not is_fqdn("x" * 256)
    assert is_dns1123_label("shop") and not is_dns1123_label("Shop") and not is_dns1123_label("a.b")
    assert is_dns1123_subdomain("my.object-1") and not is_dns1123_subdomain("my_object")
    assert is_dns1123_subdomain("a" * 100) and not is_dns1123_subdomain("a" * 254)


def test_location() -> None:
    assert dotted(("spec", "ports", 1, "name")) == "spec.ports[1].name"
    assert dotted(("metadata", "labels", "app/x")) == 'metadata.labels["app/x"]'
    node = yaml.compose("a: 1\nspec:\n  ports:\n  - name: x\n  - name: y\n")
    assert yaml_line(node, ("spec", "ports", 1, "name")) == 5
    assert yaml_line(node, ("spec", "missing", 3)) == 2
