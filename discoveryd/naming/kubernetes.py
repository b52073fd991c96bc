"""Kubernetes DNS naming (the Kubernetes DNS specification 1.1.0) under a cluster domain.

A service is `<svc>.<ns>.svc.<domain>`. A ClusterIP service answers its VIPs,
with SRV records (weight 100) pointing at the service name; a headless service
answers its ready endpoints only, one name per endpoint (`<hostname or
a-b-c-d>.<svc>...`) with SRV records pointing at those (none ready: no
records, NXDOMAIN); ExternalName is a CNAME. `dns-version.<domain>` is a TXT
record with the schema version. Other names under the domain get the generic
rules.
"""

from __future__ import annotations

from discoveryd.model import Hostname, Service, Zone
from discoveryd.naming.base import RecordSink

DNS_VERSION = "1.1.0"
"""The schema version answered at `dns-version.<cluster domain>`."""


def is_service_name(host: str, zone: Zone) -> bool:
    """Whether `host` is `<svc>.<ns>.svc.<zone>`."""
    rest = host[: -len(zone.name) - 1].split(".") if host.endswith("." + zone.name) else []
    return len(rest) == 3 and rest[2] == "svc"


def service_name(name: str, namespace: str, domain: str) -> Hostname:
    """The DNS name of Service `name` in `namespace`: `<name>.<namespace>.svc.<domain>`."""
    return Hostname(f"{name}.{namespace}.svc.{domain}")


class KubernetesNaming:
    """The `ZoneNaming` of ZoneFlavor.KUBERNETES zones."""

    def service(self, svc: Service, zone: Zone, out: RecordSink, canonical: Hostname) -> bool:
        if not is_service_name(svc.hostname, zone):
            return False
        out.plain(svc, vip_srv_weight=100, healthy_only=True)
        return True

    def zone(self, zone: Zone, out: RecordSink) -> None:
        out.txt(f"dns-version.{zone.name}", DNS_VERSION.encode())


NAMING = KubernetesNaming()
