"""Registries' DNS naming rules, kept out of the DNS server (as CoreDNS keeps Kubernetes naming in
its kubernetes plugin): the server assembles records generically and asks the rules of a zone's
flavor (`Zone.flavor`, chosen by the adapter that offers the zone) for the names they cover.

- `kubernetes`: `<svc>.<ns>.svc.<domain>`, headless services, `dns-version`.
- `consul`: `[tag.]<svc>.service[.<dc>].<domain>`, RFC 2782 SRV forms, `addr` targets.

Adapters import the name builders from here (`consul.canonical_name`, `kubernetes.service_name`),
so a registry's names are spelt in one place. The rules write through `base.RecordSink` and
import nothing of the DNS server.
"""

from __future__ import annotations

from discoveryd.model import ZoneFlavor
from discoveryd.naming import consul, kubernetes
from discoveryd.naming.base import RecordSink, ZoneNaming

__all__ = ["RecordSink", "ZoneNaming", "naming_of"]

_NAMINGS: dict[ZoneFlavor, ZoneNaming] = {
    ZoneFlavor.KUBERNETES: kubernetes.NAMING,
    ZoneFlavor.CONSUL: consul.NAMING,
}


def naming_of(flavor: ZoneFlavor) -> ZoneNaming | None:
    """The naming rules of zones of `flavor`; None: the generic rules only (PLAIN)."""
    return _NAMINGS.get(flavor)
