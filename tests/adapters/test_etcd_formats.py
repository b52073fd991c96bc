"""The etcd key layouts and config, without a server: parse cases, config errors, incremental vs full sync."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aetcd import rpc
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters.etcd.config import EtcdConfig
from adapters.etcd.formats import FORMATS, EtcdNaming, FormatError, SkyDns, assemble
from adapters.etcd.registry import _Listing, _View
from discoveryd.index import Index
from discoveryd.model import Health, Hostname, Locality, PortProtocol, Resolution, SourceId

DOMAIN = Hostname("mesh.local")
SRC = SourceId("etcd/test")


def _value(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# -- etcd-naming ----------------------------------------------------------------------


def test_naming_minimal_value_is_a_grpc_endpoint() -> None:
    value = _value({"Op": 0, "Addr": "10.0.0.1:8080", "Metadata": None})
    (m,) = EtcdNaming(DOMAIN, SRC).parse("api/10.0.0.1:8080", value)
    assert m.service == "api.mesh.local"
    assert m.name == "api"
    assert m.endpoint.address == "10.0.0.1"
    assert m.endpoint.ports == {"grpc": 8080}
    assert m.endpoint.source == SRC
    assert m.port is not None and (m.port.name, m.port.number, m.port.protocol) == ("grpc", 8080, PortProtocol.GRPC)


def test_naming_metadata_is_mapped() -> None:
    value = {
        "Addr": "[fd00::7]:9090",
        "Metadata": {
            "weight": 30,
            "region": "eu",
            "zone": "eu-1a",
            "labels": {"version": "v2"},
            "protocol": "http",
            "health": "Draining",
            "network": "n1",
            "owner": "ignored",
        },
    }
    (m,) = EtcdNaming(DOMAIN, SRC).parse("Web/i-1", _value(value))
    ep = m.endpoint
    assert m.service == "web.mesh.local"
    assert ep.address == "fd00::7"
    assert ep.ports == {"http": 9090}
    assert ep.weight == 30
    assert ep.locality == Locality(region="eu", zone="eu-1a")
    assert ep.labels == {"version": "v2"}
    assert ep.health is Health.DRAINING
    assert ep.network == "n1"
    assert m.port is not None and m.port.protocol is PortProtocol.HTTP


@pytest.mark.parametrize(
    ("key", "value", "field", "message"),
    [
        ("api", b"{}", "", "<service>/<id>"),
        ("api/", b"{}", "", "<service>/<id>"),
        ("bad name!/1", _value({"Addr": "10.0.0.1:1"}), "", "DNS name"),
        ("api/1", b"{not json", "", "not JSON"),
        ("api/1", b"[1, 2]", "", "JSON object"),
        ("api/1", _value({"Metadata": {}}), "Addr", "required"),
        ("api/1", _value({"Addr": "10.0.0.1"}), "Addr", "ip:port"),
        ("api/1", _value({"Addr": "10.0.0.1:70000"}), "Addr", "ip:port"),
        ("api/1", _value({"Addr": "db.example.com:80"}), "Addr", "IP address"),
        ("api/1", _value({"Op": 1, "Addr": "10.0.0.1:1"}), "Op", "Op 0"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"weight": 0}}), "Metadata.weight", "1-65535"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"weight": True}}), "Metadata.weight", "integer"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"protocol": "smtp"}}), "Metadata.protocol", "unknown"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"health": "ok"}}), "Metadata.health", "expected"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"labels": {"a": 1}}}), "Metadata.labels", "string"),
        ("api/1", _value({"Addr": "10.0.0.1:1", "Metadata": {"zone": 5}}), "Metadata.zone", "string"),
    ],
)
def test_naming_rejects(key: str, value: bytes, field: str, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        EtcdNaming(DOMAIN, SRC).parse(key, value)
    assert caught.value.field == field
    assert message in caught.value.message


# -- skydns ---------------------------------------------------------------------------


def test_skydns_instance_key_serves_its_name_and_its_parent() -> None:
    value = _value({"host": "10.0.0.5", "port": 8080, "priority": 10, "weight": 20, "ttl": 60})
    own, parent = SkyDns(DOMAIN, SRC).parse("local/mesh/api/x1", value)
    assert own.service == "x1.api.mesh.local"
    assert parent.service == "api.mesh.local"
    assert parent.endpoint.hostname == "x1"
    for m in (own, parent):
        assert m.endpoint.address == "10.0.0.5"
        assert (m.endpoint.priority, m.endpoint.weight) == (10, 20)
        assert m.endpoint.ports == {"tcp": 8080}


def test_skydns_directory_key_and_parents_outside_the_zone() -> None:
    sky = SkyDns(DOMAIN, SRC)
    (apex,) = sky.parse("local/mesh/", _value({"host": "10.0.0.1"}))
    assert apex.service == "mesh.local" and apex.port is None and apex.endpoint.ports == {}
    (outside,) = sky.parse("com/example/www", _value({"host": "10.0.0.2"}))
    assert outside.service == "www.example.com"
    assert sky.parse("local/mesh/notes", _value({"text": "just text"})) == ()


def test_skydns_host_name_makes_a_dns_service() -> None:
    members = SkyDns(DOMAIN, SRC).parse("local/mesh/ext/a", _value({"host": "Backend.Example.COM.", "port": 443}))
    service = assemble(Hostname("ext.mesh.local"), [("k", members[1])], SRC)
    assert service is not None
    assert service.resolution is Resolution.DNS
    assert service.endpoints[0].address == "backend.example.com"


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("local//api", _value({"host": "10.0.0.1"}), ""),
        ("local/mesh/a b", _value({"host": "10.0.0.1"}), ""),
        ("local/mesh/api", b"nope", ""),
        ("local/mesh/api", _value({"port": 80}), "host"),
        ("local/mesh/api", _value({"host": "not a name"}), "host"),
        ("local/mesh/api", _value({"host": "10.0.0.1", "port": -1}), "port"),
        ("local/mesh/api", _value({"host": "10.0.0.1", "priority": "high"}), "priority"),
        ("local/mesh/api", _value({"host": 7}), "host"),
    ],
)
def test_skydns_rejects(key: str, value: bytes, field: str) -> None:
    with pytest.raises(FormatError) as caught:
        SkyDns(DOMAIN, SRC).parse(key, value)
    assert caught.value.field == field


def test_assemble_picks_the_common_port_and_keeps_each_endpoints_own() -> None:
    naming = EtcdNaming(DOMAIN, SRC)
    members = [
        (f"k{i}", naming.parse(f"api/{i}", _value({"Addr": f"10.0.0.{i}:{port}"}))[0])
        for i, port in enumerate((8080, 9090, 8080), start=1)
    ]
    service = assemble(Hostname("api.mesh.local"), members, SRC)
    assert service is not None
    (port,) = service.ports
    assert port.number == 8080
    assert [ep.port_for(port) for ep in service.endpoints] == [8080, 9090, 8080]
    assert service.resolution is Resolution.STATIC
    assert service.source == SRC
    assert assemble(Hostname("api.mesh.local"), [], SRC) is None


# -- config ---------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = EtcdConfig.model_validate({"kind": "etcd", "name": "main"})
    assert cfg.endpoints == ["http://127.0.0.1:2379"]
    assert (cfg.prefix, cfg.format, cfg.domain) == ("/services/", "etcd-naming", "mesh.local")
    assert not cfg.secure
    assert str(cfg.source) == "etcd/main"
    sky = EtcdConfig.model_validate({"kind": "etcd", "name": "dns", "format": "skydns", "domain": "Skydns.Local."})
    assert (sky.prefix, sky.domain) == ("/skydns/", "skydns.local")
    custom = EtcdConfig.model_validate({"kind": "etcd", "name": "x", "prefix": "/reg", "dial_timeout": "250ms"})
    assert (custom.prefix, custom.dial_timeout) == ("/reg/", 0.25)


def test_config_password_is_not_dumped() -> None:
    cfg = EtcdConfig.model_validate({"kind": "etcd", "name": "m", "username": "u", "password": "hunter2"})
    assert "hunter2" not in str(cfg.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"format": "kratos"}, "unknown format"),
        ({"endpoints": ["ftp://h:1"]}, "scheme"),
        ({"endpoints": ["http://h:99999"]}, "out of range"),
        ({"endpoints": []}, "at least 1"),
        ({"endpoints": ["http://a:1", "https://b:1"]}, "mixing"),
        ({"tls": {"ca_file": "ca.pem"}}, "https://"),
        ({"endpoints": ["https://a:1"], "tls": {"cert_file": "c.pem"}}, "go together"),
        ({"password": "p"}, "username"),
        ({"username": "u"}, "password"),
        ({"username": "u", "password": "p", "password_file": "f"}, "only one"),
        ({"domain": "bad domain"}, "DNS name"),
        ({"dial_timeout": "soon"}, "duration"),
        ({"watch": True}, "Extra inputs"),
    ],
)
def test_config_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        EtcdConfig.model_validate({"kind": "etcd", "name": "m", **extra})
    assert message in str(caught.value)


# -- incremental watch == full list -----------------------------------------------------

_KEYS = [
    "api/1",
    "api/2",
    "web/1",
    "local/mesh/db",
    "local/mesh/api/x1",
    "local/mesh/api/x2",
    "local/mesh/",
]
_VALUES = [
    _value({"Addr": "10.0.0.1:80"}),
    _value({"Addr": "10.0.0.2:81", "Metadata": {"protocol": "http", "weight": 3}}),
    _value({"host": "10.0.0.3", "port": 80, "priority": 5}),
    _value({"host": "backend.example.org", "port": 443}),
    _value({"host": "10.0.0.4"}),
    _value({"text": "txt only"}),
    b"{broken",
]


@pytest.mark.parametrize("fmt", ["etcd-naming", "skydns"])
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(_KEYS), st.none() | st.sampled_from(_VALUES)), max_size=30))
def test_watch_events_end_where_a_full_list_does(fmt: str, ops: list[tuple[str, bytes | None]]) -> None:
    """Any sequence of puts and deletes, applied as watch events, leaves the shard as a list of the end state."""
    prefix = "/p/"

    def view(index: Index) -> _View:
        shard = index.writer(SRC)
        return _View(FORMATS[fmt].create(DOMAIN, SRC), prefix, shard)

    watched, listed = Index(), Index()
    incremental = view(watched)
    asyncio.run(incremental.commit(_Listing(), 1))
    state: dict[str, bytes] = {}
    for revision, (key, value) in enumerate(ops, start=2):
        kv = rpc.KeyValue(key=(prefix + key).encode(), value=value or b"", mod_revision=revision)
        kind = rpc.Event.PUT if value is not None else rpc.Event.DELETE
        with watched.writer(SRC).batch():
            incremental.apply([rpc.Event(type=kind, kv=kv)])
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value

    full = view(listed)
    listing = _Listing()
    full.add(listing, [rpc.KeyValue(key=(prefix + k).encode(), value=v) for k, v in sorted(state.items())])
    asyncio.run(full.commit(listing, len(ops) + 1))

    assert dict(watched.snapshot.services) == dict(listed.snapshot.services)
    assert set(watched.snapshot.shards[SRC].problems) == set(listed.snapshot.shards[SRC].problems)
    assert incremental.revision == len(ops) + 1
