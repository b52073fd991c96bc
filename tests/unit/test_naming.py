"""Registries' DNS naming rules (`discoveryd.naming`): chosen by zone flavor, and the names adapters build fit them."""

from __future__ import annotations

from discoveryd.model import Hostname, Zone, ZoneFlavor
from discoveryd.naming import consul, kubernetes, naming_of


def test_rules_are_chosen_by_the_zone_flavor() -> None:
    assert naming_of(ZoneFlavor.PLAIN) is None
    assert naming_of(ZoneFlavor.KUBERNETES) is kubernetes.NAMING
    assert naming_of(ZoneFlavor.CONSUL) is consul.NAMING


def test_names_the_adapters_build_are_the_names_the_rules_cover() -> None:
    cluster = Zone(Hostname("cluster.local"), ZoneFlavor.KUBERNETES)
    assert kubernetes.is_service_name(kubernetes.service_name("web", "shop", "cluster.local"), cluster)
    assert not kubernetes.is_service_name("web.shop.cluster.local", cluster)
    domain = Zone(Hostname("consul"), ZoneFlavor.CONSUL)
    assert consul.name_parts(consul.canonical_name("web", "dc1", "consul"), domain) == ("web", "dc1")
    assert consul.name_parts(consul.local_name("web", "consul"), domain) == ("web", "")
    assert consul.name_parts("web.node.dc1.consul", domain) is None
    assert consul.hex_address("192.0.2.42") == "c000022a"
