"""Locality-aware load balancing (Istio's localityLbSetting): one ClusterLoadAssignment, seen from a client.

Data flow: `resources.Builder` builds every assignment once, for everyone.
When the cluster's effective DestinationRule policy has an active
localityLbSetting it also keeps a `Plan` next to it (`View.localized`; for a
namespace's own assignment, `View.localized_over`).
A connection that knows its client's locality or labels (`Client`, from the
node of its first request) asks the view for the client's variant of such an
assignment (`View.localize`): the plan reduces the client to the `key` that
decides the result, and the variant of that key is built once and cached
(`resources.VariantCache`), so clients with the same key share one set of
bytes.

What a variant is, as Istio's EDS builds it for a proxy:

- failover (the default when `distribute` is not set; needs outlier
  detection on the cluster): each locality's priority relative to the
  client — same region, zone and subzone 0; same region and zone 1; same
  region 2; other regions 3, except that with a `failover` rule from the
  client's region, regions other than its `to` get 4 — then renumbered
  0..N without gaps.
- failoverPriority (label keys, `key=value` to match a fixed value): each
  endpoint's priority is the number of keys left once its labels stop
  matching the client's, in order (0 when all match; endpoints and client
  also carry the well-known topology labels of their locality and network);
  a locality holding several priorities is split into one group per
  priority. With `failover` too, the locality failover is applied on top
  (priority * 5 + the locality priority, renumbered).
- distribute: the first entry whose `from` matches the client's locality
  sets the weight of each destination locality (a wildcard destination
  shares its weight among the localities it matches, by their own weight);
  localities no destination names get no traffic (left out).

The key is the client's locality and label values cut down to what the
endpoints and the setting can tell apart: a value no endpoint (or failover
rule) holds is as good as any other such value. So whatever a client sends,
one plan has at most as many keys as there are distinct endpoint localities
(and failover regions, distribute entries, label value prefixes); a key that
changes nothing (a client in none of those) maps to the shared assignment
and builds nothing.

Pure functions over protobuf messages; event loop thread only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from discoveryd.model import Endpoint
from discoveryd.policy import LocalityLb

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
NETWORK_LABEL = "topology.istio.io/network"

LABELS_KEEP = 64
"""Node metadata LABELS kept per client (the rest are ignored); each key and value is cut to 256 characters."""
_TEXT_KEEP = 256


@dataclass(frozen=True, slots=True)
class Client:
    """What a client tells about where it runs: its node locality and labels (Istio's node metadata LABELS,
    with the topology labels of its locality and NETWORK)."""

    region: str = ""
    zone: str = ""
    subzone: str = ""
    labels: Mapping[str, str] | None = None


def client_of(node: Any) -> Client | None:
    """The `Client` of an xDS node, or None when it gives neither a locality nor labels."""
    loc = node.locality if node.HasField("locality") else None
    labels: dict[str, str] = {}
    if node.HasField("metadata"):
        meta = node.metadata.fields
        raw = meta.get("LABELS")
        if raw is not None and raw.HasField("struct_value"):
            for k, v in raw.struct_value.fields.items():
                if len(labels) >= LABELS_KEEP:
                    break
                if v.HasField("string_value"):
                    labels[k[:_TEXT_KEEP]] = v.string_value[:_TEXT_KEEP]
        network = meta.get("NETWORK")
        if network is not None and network.string_value:
            labels[NETWORK_LABEL] = network.string_value[:_TEXT_KEEP]
    region = zone = subzone = ""
    if loc is not None:
        region, zone, subzone = loc.region[:_TEXT_KEEP], loc.zone[:_TEXT_KEEP], loc.sub_zone[:_TEXT_KEEP]
        for key, value in ((REGION_LABEL, region), (ZONE_LABEL, zone), (SUBZONE_LABEL, subzone)):
            if value:
                labels[key] = value
    if loc is None and not labels:
        return None
    return Client(region, zone, subzone, labels)


def endpoint_labels(ep: Endpoint) -> Mapping[str, str]:
    """An endpoint's labels with the topology labels of its locality and network (as Istio augments them)."""
    extra = {
        k: v
        for k, v in (
            (REGION_LABEL, ep.locality.region),
            (ZONE_LABEL, ep.locality.zone),
            (SUBZONE_LABEL, ep.locality.subzone),
            (NETWORK_LABEL, ep.network),
        )
        if v
    }
    return {**ep.labels, **extra} if extra else ep.labels


def locality_match(region: str, zone: str | None, subzone: str | None, rule: str) -> bool:
    """Istio's match of a locality against `region[/zone[/subzone]]`, where `*` (or a missing part) is any."""
    parts = rule.split("/", 2)
    want = (*parts, "", "")[:3]
    return (
        (want[0] == "*" or want[0] == region)
        and (want[1] in ("*", "") or want[1] == zone)
        and (want[2] in ("*", "") or want[2] == subzone)
    )


Key = Hashable


class Plan:
    """How one assignment changes with the client. Immutable once built; shared by views."""

    __slots__ = (
        "_distribute",
        "_failover",
        "_groups",
        "_labels",
        "_priority",
        "_regions",
        "_subzones",
        "_values",
        "_zones",
        "base",
        "digest",
        "setting",
    )

    def __init__(
        self, base: endpoint_pb2.ClusterLoadAssignment, members: Sequence[Sequence[Endpoint]], setting: LocalityLb
    ) -> None:
        self.base = base
        self.setting = setting
        self._distribute = bool(setting.distribute)
        self._failover = dict(reversed(setting.failover))  # the first rule for a region wins
        self._priority: tuple[tuple[str, str | None], ...] = tuple(
            (k, v if sep else None) for k, sep, v in (p.partition("=") for p in setting.failover_priority)
        )
        localities = [(g.locality.region, g.locality.zone, g.locality.sub_zone) for g in base.endpoints]
        self._regions = {r for r, _, _ in localities}
        self._zones = {(r, z) for r, z, _ in localities}
        self._subzones = set(localities)
        self._labels: list[list[Mapping[str, str]]] = []
        self._values: list[set[str]] = []
        if self._priority and not self._distribute:
            self._labels = [[endpoint_labels(ep) for ep in group] for group in members]
            self._values = [
                {labels.get(k, "") for group in self._labels for labels in group} for k, _ in self._priority
            ]
        body = base.SerializeToString(deterministic=True)
        self.digest = hashlib.blake2b(body + repr(setting).encode(), digest_size=8).hexdigest()

    def key(self, client: Client) -> Key | None:
        """What of `client` decides its variant; None: the shared assignment applies (nothing to build)."""
        if self._distribute:
            for i, d in enumerate(self.setting.distribute):
                if locality_match(client.region, client.zone, client.subzone, d.origin):
                    return ("distribute", i)
            return None
        labels: tuple[str, ...] | None = None
        if self._priority and client.labels:
            values: list[str] = []
            for (k, fixed), present in zip(self._priority, self._values, strict=True):
                v = fixed if fixed is not None else client.labels.get(k, "")
                if v not in present:
                    break
                values.append(v)
            labels = tuple(values)
        place: tuple[str, str | None, str | None] | None = None
        if not self._priority or self._failover:
            r = client.region
            if r in self._regions or r in self._failover:
                z = client.zone if (r, client.zone) in self._zones else None
                s = client.subzone if z is not None and (r, z, client.subzone) in self._subzones else None
                place = (r, z, s)
        if not labels and place is None:
            return None
        return (labels, place)

    def build(self, key: Key) -> endpoint_pb2.ClusterLoadAssignment:
        """The variant of `key` (a value `key()` returned)."""
        cla = endpoint_pb2.ClusterLoadAssignment()
        cla.CopyFrom(self.base)
        assert isinstance(key, tuple)
        if key[0] == "distribute":
            self._weigh(cla, key[1])
            return cla
        labels, place = key
        if labels:
            self._split_by_labels(cla, labels)
        if place is not None:
            self._by_locality(cla, place)
        return cla

    def _weigh(self, cla: endpoint_pb2.ClusterLoadAssignment, index: int) -> None:
        groups = list(cla.endpoints)
        left = set(range(len(groups)))
        for dest, weight in self.setting.distribute[index].weights:
            matched = [
                i
                for i in sorted(left)
                if locality_match(groups[i].locality.region, groups[i].locality.zone, groups[i].locality.sub_zone, dest)
            ]
            left.difference_update(matched)
            total = sum(max(1, groups[i].load_balancing_weight.value) for i in matched)
            for i in matched:
                share = max(1, groups[i].load_balancing_weight.value) * weight / total
                groups[i].load_balancing_weight.value = max(1, math.ceil(share))
        kept = [g for i, g in enumerate(groups) if i not in left]
        del cla.endpoints[:]
        cla.endpoints.extend(kept)

    def _split_by_labels(self, cla: endpoint_pb2.ClusterLoadAssignment, values: tuple[str, ...]) -> None:
        n = len(self._priority)
        out: list[endpoint_components_pb2.LocalityLbEndpoints] = []
        for group, labels in zip(cla.endpoints, self._labels, strict=True):
            by_priority: dict[int, list[int]] = {}
            for i, ep_labels in enumerate(labels):
                j = 0
                while j < len(values) and ep_labels.get(self._priority[j][0], "") == values[j]:
                    j += 1
                by_priority.setdefault(0 if j == n else n - j, []).append(i)
            for priority in sorted(by_priority):
                part = endpoint_components_pb2.LocalityLbEndpoints(priority=priority)
                part.locality.CopyFrom(group.locality)
                members = [group.lb_endpoints[i] for i in by_priority[priority]]
                part.lb_endpoints.extend(members)
                part.load_balancing_weight.value = sum(max(1, m.load_balancing_weight.value) for m in members)
                out.append(part)
        _renumber(out)
        del cla.endpoints[:]
        cla.endpoints.extend(out)

    def _by_locality(self, cla: endpoint_pb2.ClusterLoadAssignment, place: tuple[str, str | None, str | None]) -> None:
        region, zone, subzone = place
        to = self._failover.get(region)
        for group in cla.endpoints:
            loc = group.locality
            if loc.region != region:
                p = 3 if to is None or loc.region == to else 4
            elif loc.zone != zone:
                p = 2
            elif loc.sub_zone != subzone:
                p = 1
            else:
                p = 0
            group.priority = group.priority * 5 + p
        _renumber(list(cla.endpoints))


def _renumber(groups: Sequence[endpoint_components_pb2.LocalityLbEndpoints]) -> None:
    """Priorities 0..N without gaps, in the order of the values given (Envoy and gRPC require no gaps)."""
    rank = {p: i for i, p in enumerate(sorted({g.priority for g in groups}))}
    for g in groups:
        g.priority = rank[g.priority]


def plan_for(
    cla: endpoint_pb2.ClusterLoadAssignment,
    members: Sequence[Sequence[Endpoint]],
    setting: LocalityLb | None,
    outlier_detection: bool,
) -> Plan | None:
    """The plan of one assignment under its cluster's effective locality setting, or None when that
    setting changes nothing (absent, disabled, or failover without outlier detection)."""
    if setting is None or not setting.active(outlier_detection) or not cla.endpoints:
        return None
    return Plan(cla, members, setting)


__all__ = ["Client", "Plan", "client_of", "endpoint_labels", "locality_match", "plan_for"]
