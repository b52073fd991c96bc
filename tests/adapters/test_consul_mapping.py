"""Consul health rows → Service (adapters/consul/mapping.py), table-driven on rows as Consul's API returns them."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.consul.mapping import Naming, build
from discoveryd.model import Health, PortProtocol, Resolution, SourceId

NAMING = Naming(source=SourceId("consul/t"), domain="consul", local_dc="dc1")


def row(
    address: str = "10.0.0.1",
    port: int = 80,
    *,
    node_address: str = "192.0.2.1",
    checks: tuple[str, ...] = ("passing",),
    node_checks: tuple[str, ...] = (),
    weights: dict[str, Any] | None = None,
    meta: dict[str, str] | None = None,
    tags: list[str] | None = None,
    tagged: dict[str, Any] | None = None,
    node_tagged: dict[str, str] | None = None,
    node: str = "n1",
) -> dict[str, Any]:
    return {
        "Node": {
            "Node": node,
            "Address": node_address,
            "Datacenter": "dc1",
            "TaggedAddresses": node_tagged or {"lan": node_address},
            "Meta": {"zone": "z1"},
        },
        "Service": {
            "ID": f"web-{node}",
            "Service": "web",
            "Tags": tags or [],
            "Address": address,
            "TaggedAddresses": tagged or {},
            "Meta": meta or {},
            "Port": port,
            "Weights": weights or {"Passing": 1, "Warning": 1},
        },
        "Checks": [{"CheckID": f"c{i}", "Status": s, "ServiceID": f"web-{node}"} for i, s in enumerate(checks)]
        + [{"CheckID": f"n{i}", "Status": s, "ServiceID": ""} for i, s in enumerate(node_checks)],
    }


@pytest.mark.parametrize(
    ("checks", "node_checks", "weights", "want"),
    [
        (("passing",), (), {"Passing": 7, "Warning": 2}, (Health.HEALTHY, 7)),
        (("passing", "warning"), (), {"Passing": 7, "Warning": 2}, (Health.HEALTHY, 2)),
        (("warning",), (), {"Passing": 7, "Warning": 0}, (Health.UNHEALTHY, 1)),
        (("passing",), ("warning",), {"Passing": 7, "Warning": 3}, (Health.HEALTHY, 3)),
        (("passing",), ("critical",), {"Passing": 7, "Warning": 3}, (Health.UNHEALTHY, 1)),
        (("warning", "critical"), (), {"Passing": 7, "Warning": 3}, (Health.UNHEALTHY, 1)),
        (("maintenance",), (), {"Passing": 7, "Warning": 3}, (Health.UNHEALTHY, 1)),  # not a known status
        ((), (), {"Passing": 100000, "Warning": 1}, (Health.HEALTHY, 65535)),  # no checks: passing; clamped
        (("passing",), (), {"Passing": "x"}, (Health.HEALTHY, 1)),  # not a number: the default
    ],
)
def test_health_and_weight(
    checks: tuple[str, ...], node_checks: tuple[str, ...], weights: dict[str, Any], want: tuple[Health, int]
) -> None:
    svc, problems = build("web", "dc1", [row(checks=checks, node_checks=node_checks, weights=weights)], NAMING)
    assert svc is not None and problems == []
    assert (svc.endpoints[0].health, svc.endpoints[0].weight) == want


@pytest.mark.parametrize(
    ("kwargs", "kind", "want"),
    [
        ({}, None, ("10.0.0.1", 80)),
        ({"address": ""}, None, ("192.0.2.1", 80)),  # Service.Address empty: Node.Address
        ({"tagged": {"lan_ipv4": {"Address": "10.1.0.1", "Port": 8080}}}, "lan", ("10.1.0.1", 8080)),
        ({"tagged": {"wan": {"Address": "203.0.113.9", "Port": 0}}}, "wan", ("203.0.113.9", 80)),
        ({"node_tagged": {"wan": "198.51.100.7"}}, "wan", ("198.51.100.7", 80)),  # the node's, else
        ({}, "wan", ("10.0.0.1", 80)),  # no WAN address anywhere: the plain rule
    ],
)
def test_addresses(kwargs: dict[str, Any], kind: str | None, want: tuple[str, int]) -> None:
    naming = Naming(source=NAMING.source, domain="consul", local_dc="dc1", tagged_address=kind)
    svc, _ = build("web", "dc1", [row(**kwargs)], naming)
    assert svc is not None
    ep = svc.endpoints[0]
    assert (ep.address, ep.port_for(svc.ports[0])) == want


def test_names_protocol_labels_locality() -> None:
    rows = [
        row(tags=["v1", "env=prod", "=x"], meta={"protocol": "GRPC", "env": "canary"}),
        row("10.0.0.2", 81, node="n2", meta={"protocol": "grpc"}),
        row("10.0.0.3", 81, node="n3", meta={"protocol": "grpc"}),
    ]
    svc, problems = build("Web", "dc1", rows, NAMING)
    assert svc is not None and problems == []
    assert (svc.hostname, svc.aliases, svc.name) == ("web.service.dc1.consul", ("web.service.consul",), "Web")
    assert [(p.name, p.number, p.protocol) for p in svc.ports] == [("grpc", 81, PortProtocol.GRPC)]
    first = next(ep for ep in svc.endpoints if ep.node_name == "n1")
    assert first.tags == ("v1", "env=prod", "=x")
    assert first.labels == {"env": "canary", "protocol": "GRPC"}  # meta wins over a key=value tag
    assert (first.locality.region, first.locality.zone) == ("dc1", "z1")
    assert first.port_for(svc.ports[0]) == 80
    remote, _ = build("web", "dc2", rows, NAMING)
    assert remote is not None and remote.aliases == () and remote.hostname == "web.service.dc2.consul"


def test_problems_and_skips() -> None:
    assert build("web_api", "dc1", [row()], NAMING)[0] is None
    assert build("a.b", "dc1", [row()], NAMING)[0] is None
    svc, problems = build("web", "dc1", [row(), row("", node_address="", node="n2"), "junk"], NAMING)
    assert svc is not None and len(svc.endpoints) == 1
    assert [p.where for p in problems] == ["dc1/n2/web-n2", "dc1/web"]
    svc, problems = build("web", "dc1", [row(meta={"protocol": "carrier-pigeon"})], NAMING)
    assert svc is not None and svc.ports[0].protocol is PortProtocol.TCP
    assert problems[0].field == "ServiceMeta.protocol"
    assert build("web", "dc1", [], NAMING) == (None, [])


def test_hostname_addresses_make_a_dns_service_and_tag_filter_drops_instances() -> None:
    svc, _ = build("web", "dc1", [row("web-1.example.org")], NAMING)
    assert svc is not None and svc.resolution is Resolution.DNS
    naming = Naming(source=NAMING.source, domain="consul", local_dc="dc1", tags=("prod",))
    svc, problems = build("web", "dc1", [row(tags=["prod"]), row("10.0.0.2", node="n2", tags=["dev"])], naming)
    assert svc is not None and [ep.address for ep in svc.endpoints] == ["10.0.0.1"] and problems == []
