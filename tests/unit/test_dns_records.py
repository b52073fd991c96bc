"""Records built from services, table bookkeeping, resolution edge cases, and the raw question scanner."""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoveryd.dns import answer as answer_module
from discoveryd.dns import wire
from discoveryd.dns.answer import Authority, resolve
from discoveryd.dns.message import MAX_UDP, NOERROR, NXDOMAIN, PTR, RR, SOA, A, Rdata, pack
from discoveryd.dns.records import RecordTable, consul_hex, dashed, parse_ip, service_records
from discoveryd.dns.wire import cache_limit, scan, subkey
from discoveryd.model import (
    Endpoint,
    Health,
    Hostname,
    Port,
    Resolution,
    Service,
    Zone,
    ZoneFlavor,
)

MESH = Zone(Hostname("mesh.local"))
K8S = Zone(Hostname("cluster.local"), ZoneFlavor.KUBERNETES)
CONSUL = Zone(Hostname("consul"), ZoneFlavor.CONSUL)


def table(*services: Service, zones: tuple[Zone, ...] = (MESH, K8S, CONSUL)) -> RecordTable:
    t = RecordTable(zones, 30, ["127.0.0.1"], 1)
    t.load({s.hostname: s for s in services})
    return t


def text(rtype: int, rdata: Rdata) -> str:
    """Presentation form of one rdata, as dnspython reads it from our encoding."""
    message = dns.message.from_wire(pack(0, 0x8000, None, [RR((), rtype, 30, rdata)]))
    return str(message.answer[0][0].to_text())


def owners(svc: Service, zone: Zone | None) -> dict[str, list[str]]:
    return {name: sorted(text(*r) for r in node.records()) for name, node in service_records(svc, zone).items()}


def test_label_helpers() -> None:
    assert dashed("10.0.0.1") == "10-0-0-1"
    assert dashed("fd00::1") == "fd00-0000-0000-0000-0000-0000-0000-0001"
    assert consul_hex("192.0.2.42") == "c000022a"


def test_plain_service_skips_what_is_not_an_ip() -> None:
    svc = Service(
        Hostname("odd.mesh.local"),
        addresses=("10.0.0.0/24",),
        resolution=Resolution.NONE,
        endpoints=(
            Endpoint("unix:///run/app.sock"),
            Endpoint("not-an-ip.example"),
            Endpoint("fd00::5", hostname="Pod-A"),
            Endpoint("10.0.0.9", health=Health.UNHEALTHY),
        ),
    )
    got = owners(svc, MESH)
    assert got["odd.mesh.local"] == ["fd00::5"]
    assert got["pod-a.odd.mesh.local"] == ["fd00::5"]
    assert "10-0-0-9.odd.mesh.local" not in got
    assert list(got) == [
        "odd.mesh.local",
        "pod-a.odd.mesh.local",
        "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
    ]


def test_dns_serviceentry_resolving_its_own_host_claims_no_name() -> None:
    # A DNS ServiceEntry without endpoints gets one endpoint that is its own host:
    # no CNAME to itself (a loop), no records, so the name is forwarded upstream.
    own = Service(
        Hostname("api.payments.example.com"),
        ports=(Port(443, "https"),),
        resolution=Resolution.DNS,
        endpoints=(Endpoint("api.payments.example.com"),),
    )
    assert owners(own, None) == {}
    aliased = Service(
        Hostname("api.payments.example.com"),
        resolution=Resolution.DNS,
        endpoints=(Endpoint("api.payments.example.com"), Endpoint("edge.payments-cdn.example.net")),
    )
    assert owners(aliased, None) == {"api.payments.example.com": ["edge.payments-cdn.example.net."]}


def test_kubernetes_name_rules_apply_only_to_service_names() -> None:
    # Not <svc>.<ns>.svc.<domain>: plain rules (unknown health counts as serving), not headless rules.
    svc = Service(Hostname("odd.cluster.local"), endpoints=(Endpoint("10.0.0.1", health=Health.UNKNOWN),))
    assert owners(svc, K8S)["odd.cluster.local"] == ["10.0.0.1"]
    headless = Service(Hostname("h.ns.svc.cluster.local"), endpoints=(Endpoint("10.0.0.1", health=Health.UNKNOWN),))
    assert owners(headless, K8S) == {}


def test_consul_without_datacenter_uses_plain_addr_names() -> None:
    svc = Service(
        Hostname("web.service.consul"),
        ports=(Port(80, "http"),),
        endpoints=(Endpoint("10.0.0.1", tags=("V2",)),),
    )
    got = owners(svc, CONSUL)
    assert got["0a000001.addr.consul"] == ["10.0.0.1"]
    assert got["v2.web.service.consul"] == ["0 1 80 0a000001.addr.consul.", "10.0.0.1"]
    assert got["_web._v2.service.consul"] == ["0 1 80 0a000001.addr.consul."]


def test_consul_canonical_name_and_local_alias_from_typed_fields() -> None:
    # What the Consul adapter writes: canonical <svc>.service.<dc>.<domain>, alias <svc>.service.<domain>.
    svc = Service(
        Hostname("web.service.dc1.consul"),
        aliases=(Hostname("web.service.consul"),),
        ports=(Port(80, "http"),),
        endpoints=(
            Endpoint("10.0.0.1", tags=("Primary", "v2")),
            Endpoint("10.0.0.2", tags=("v2",), ports={"http": 8080}),
            Endpoint("10.0.0.3", tags=("v2",), health=Health.UNHEALTHY),
        ),
    )
    t = table(svc)
    got = {n: sorted(text(*r) for r in node.records()) for n, node in t.owners().items()}
    srv = ["0 1 80 0a000001.addr.dc1.consul.", "0 1 8080 0a000002.addr.dc1.consul."]
    for suffix in ("service.dc1.consul", "service.consul"):
        assert got[f"web.{suffix}"] == sorted([*srv, "10.0.0.1", "10.0.0.2"])
        assert got[f"_web._tcp.{suffix}"] == srv
        assert got[f"primary.web.{suffix}"] == ["0 1 80 0a000001.addr.dc1.consul.", "10.0.0.1"]
        assert got[f"_web._v2.{suffix}"] == srv
    assert got["0a000002.addr.dc1.consul"] == ["10.0.0.2"]
    assert "0a000002.addr.consul" not in got
    # PTR names the canonical datacenter's addr name once, not once per alias.
    assert got["2.0.0.10.in-addr.arpa"] == ["0a000002.addr.dc1.consul."]


def test_aliases_are_answered_like_the_hostname() -> None:
    svc = Service(
        Hostname("api.mesh.local"),
        aliases=(Hostname("api.example.org"), Hostname("api.default.svc.cluster.local")),
        addresses=("10.9.0.1",),
        ports=(Port(443, "https"),),
    )
    t = table(svc)
    for name in ("api.mesh.local", "api.example.org", "api.default.svc.cluster.local"):
        node = t.node(name)
        assert node is not None and [text(A, rd) for rd in node.get(A) or ()] == ["10.9.0.1"], name
    srv = t.node("_https._tcp.api.default.svc.cluster.local")
    assert srv is not None and [text(33, rd) for rd in srv.get(33) or ()] == [
        "0 100 443 api.default.svc.cluster.local."
    ]
    ptr = t.node("1.0.9.10.in-addr.arpa")
    assert ptr is not None and [text(PTR, rd) for rd in ptr.get(PTR) or ()] == ["api.mesh.local."]
    t.update({}, [svc.hostname])
    assert t.node("api.example.org") is None


def test_table_forgets_everything_it_was_given() -> None:
    svc = Service(Hostname("a.b.mesh.local"), ports=(Port(80, "http"),), endpoints=(Endpoint("10.0.0.1"),))
    t = table(svc)
    static = RecordTable((MESH, K8S, CONSUL), 30, ["127.0.0.1"], 1).names()
    assert t.names() > static and t.has_descendants("b.mesh.local")
    affected = t.update({}, [svc.hostname])
    assert {"a.b.mesh.local", "_http._tcp.a.b.mesh.local", "1.0.0.10.in-addr.arpa"} <= affected
    assert t.names() == static
    assert not t.has_descendants("b.mesh.local") and not t.has_descendants("in-addr.arpa")


def test_shared_owner_names_merge_and_unmerge() -> None:
    one = Service(Hostname("one.mesh.local"), addresses=("10.0.0.1",))
    two = Service(Hostname("two.mesh.local"), addresses=("10.0.0.1",))
    t = table(one, two)
    ptr = t.node("1.0.0.10.in-addr.arpa")
    assert ptr is not None and sorted(text(PTR, p) for p in ptr.get(PTR) or ()) == [
        "one.mesh.local.",
        "two.mesh.local.",
    ]
    t.update({one.hostname: one}, [two.hostname])
    ptr = t.node("1.0.0.10.in-addr.arpa")
    assert ptr is not None and [text(PTR, p) for p in ptr.get(PTR) or ()] == ["one.mesh.local."]


def test_wildcard_outside_zones_yields_to_a_closer_encloser() -> None:
    t = table(
        Service(Hostname("*.example.com"), addresses=("240.0.0.1",)),
        Service(Hostname("api.example.com"), addresses=("240.0.0.2",)),
    )
    assert resolve(t, "x.example.com", A) is not None
    assert resolve(t, "x.api.example.com", A) is None  # closest encloser api.example.com has no wildcard
    assert resolve(t, "example.com", A) is None


def test_cname_loop_terminates() -> None:
    t = table(
        Service(Hostname("a.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("b.mesh.local"),)),
        Service(Hostname("b.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("a.mesh.local"),)),
    )
    resolved = resolve(t, "a.mesh.local", A)
    assert resolved is not None and resolved.rcode == NOERROR
    assert 2 <= len(resolved.answer) <= 8


def test_cname_to_missing_in_zone_name_is_nxdomain() -> None:
    t = table(Service(Hostname("a.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("gone.mesh.local"),)))
    resolved = resolve(t, "a.mesh.local", A)
    assert resolved is not None and resolved.rcode == NXDOMAIN and len(resolved.answer) == 1
    assert [rr.rtype for rr in resolved.authority] == [SOA]


def test_authority_forgets_changed_names_and_their_ancestors() -> None:
    svc = Service(Hostname("x.y.mesh.local"), endpoints=(Endpoint("10.0.0.1"),))
    authority = Authority(table(svc))
    for name in ("x.y.mesh.local", "y.mesh.local", "other.mesh.local"):
        authority.answer(tuple(p.encode() for p in name.split(".")), A, 1, None, False, 1, 0x0100)
    assert authority.cached() == 3
    authority.update({}, [svc.hostname])
    assert authority.cached() == 1  # other.mesh.local's NXDOMAIN does not depend on x.y


@given(
    name=st.sampled_from(["a.mesh.local.", "WWW.Example.COM.", ".", "_http._tcp.x.y."]),
    rdtype=st.sampled_from(["A", "AAAA", "SRV", "HTTPS", "ANY"]),
    edns=st.sampled_from([False, 0]),
    payload=st.integers(0, 65535),
    do=st.booleans(),
    tcp=st.booleans(),
)
def test_scan_reads_what_dnspython_wrote(
    name: str, rdtype: str, edns: int | bool, payload: int, do: bool, tcp: bool
) -> None:
    query = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload, want_dnssec=do and edns is not False)
    wire = query.to_wire()
    qend = 12 + len(query.question[0].name.to_wire())
    if edns is False:
        limit, want_do = 512, False
    else:
        limit, want_do = cache_limit(max(512, min(payload, MAX_UDP))), do
    expected = subkey(dns.rdatatype.from_text(rdtype), 1, 0xFFFF if tcp else limit, want_do, edns is not False)
    assert scan(wire, tcp) == (qend, expected)


def test_scan_declines_everything_but_plain_queries() -> None:
    wire = dns.message.make_query("a.mesh.local.", "A", use_edns=0).to_wire()
    response = bytearray(wire)
    response[2] |= 0x80
    version1 = dns.message.make_query("a.mesh.local.", "A", use_edns=1).to_wire()
    assert scan(bytes(response), False) is None
    assert scan(version1, False) is None
    assert scan(wire + b"\x00", False) is None
    assert scan(wire[:-1], False) is None
    assert scan(wire[:20], False) is None


def test_names_that_cannot_go_on_the_wire_are_left_out() -> None:
    long_label = "x" * 64
    svc = Service(
        Hostname(f"{long_label}.mesh.local"),
        ports=(Port(80, "http"),),
        endpoints=(Endpoint("10.0.0.1"),),
    )
    assert owners(svc, MESH) == {}
    ext = Service(Hostname("ext.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("a..b.example"),))
    assert owners(ext, MESH) == {}
    pod = Service(Hostname("p.mesh.local"), endpoints=(Endpoint("10.0.0.2", hostname=long_label),))
    assert sorted(owners(pod, MESH)) == ["p.mesh.local"]


def test_cache_stays_bounded_under_random_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answer_module, "_CACHE_LIMIT", 50)
    wildcard = Service(Hostname("*.w.mesh.local"), resolution=Resolution.DNS, endpoints=(Endpoint("t.mesh.local"),))
    target = Service(Hostname("t.mesh.local"), endpoints=(Endpoint("10.0.0.1"),))
    authority = Authority(table(wildcard, target))
    for i in range(500):
        out = authority.answer((f"r{i}".encode(), b"w", b"mesh", b"local"), A, 1, None, False, i, 0)
        assert out is not None
    assert authority.cached() == 50
    assert len(authority._deps["t.mesh.local"]) == 50
    authority.update({wildcard.hostname: wildcard}, [target.hostname])
    assert authority.cached() == 0 and not authority._deps


def test_parse_reads_question_and_opt_past_other_sections() -> None:
    query = dns.message.make_query("Mixed.Case.example.", "SRV", use_edns=0, payload=1400, want_dnssec=True)
    query.answer.append(dns.rrset.from_text("x.example.", 30, "IN", "A", "192.0.2.1"))
    parsed = wire.parse(query.to_wire())
    assert parsed.qid == query.id and parsed.opcode == 0
    assert parsed.question == ((b"Mixed", b"Case", b"example"), dns.rdatatype.SRV, 1)
    assert (parsed.opts, parsed.udp_size, parsed.edns_version, parsed.do) == (1, 1400, 0, True)


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"\xc0\x0c\x00\x01\x00\x01", "pointer to itself"),
        (b"\xc0\x20\x00\x01\x00\x01", "pointer forwards"),
        (b"\x41abc\x00\x00\x01\x00\x01", "label type 01"),
        (b"\x05ab", "cut inside a label"),
        (b"\x01a\x00\x00", "cut inside the question"),
        ((b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "name > 255"),
    ],
)
def test_parse_rejects_malformed_names(tail: bytes, why: str) -> None:
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    with pytest.raises(wire.FormatError):
        wire.parse(header + tail)


@given(st.binary(min_size=12, max_size=300))
def test_parse_raises_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(wire.FormatError):
        wire.parse(data)


@pytest.mark.parametrize(
    "value", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "010.0.0.1", "1", "0x0a.0.0.1", "10.0.0.1 ", "1.2.3", "fd00::5"]
)
def test_parse_ip_agrees_with_ipaddress(value: str) -> None:
    try:
        expected: object = ipaddress.ip_address(value)
    except ValueError:
        expected = None
    assert parse_ip(value) == expected


@given(st.ip_addresses())
def test_parse_ip_reads_every_canonical_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_ip(str(ip)) == ip


def test_a_changed_wildcard_forgets_the_names_answered_from_it() -> None:
    old = Service(Hostname("*.w.mesh.local"), addresses=("10.0.0.1",))
    new = Service(Hostname("*.w.mesh.local"), addresses=("10.0.0.2",))
    other = Service(Hostname("v.mesh.local"), addresses=("10.0.0.3",))
    authority = Authority(table(old, other))
    for name in ((b"X", b"w", b"mesh", b"local"), (b"v", b"mesh", b"local")):
        assert authority.answer(name, A, 1, None, False, 1, 0) is not None
    authority.update({new.hostname: new, other.hostname: other}, [new.hostname])
    assert authority.cached() == 1
    out = authority.answer((b"x", b"W", b"mesh", b"local"), A, 1, None, False, 1, 0)
    assert out is not None
    assert [r.to_text() for r in dns.message.from_wire(out).answer[0]] == ["10.0.0.2"]


_HOSTS = [Hostname(f"{n}.mesh.local") for n in ("a", "b", "c.a")] + [Hostname("*.w.mesh.local")]
_SERVICE = st.builds(
    lambda host, ips, vip: Service(
        host,
        ports=(Port(80, "http"),),
        addresses=(vip,) if vip else (),
        endpoints=tuple(Endpoint(ip) for ip in ips),
    ),
    st.sampled_from(_HOSTS),
    st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"]), max_size=3),
    st.sampled_from(["", "10.0.0.1", "10.9.0.1"]),
)


@given(st.lists(st.one_of(_SERVICE, st.sampled_from(_HOSTS)), min_size=1, max_size=12))
def test_updates_end_where_a_fresh_load_starts(steps: list[Service | Hostname]) -> None:
    # Each step upserts a service or deletes a hostname; names shared between services merge and unmerge.
    services: dict[Hostname, Service] = {}
    t = table()
    for step in steps:
        if isinstance(step, Service):
            services[step.hostname] = step
            t.update(services, [step.hostname])
        else:
            services.pop(step, None)
            t.update(services, [step])
    fresh = table(*services.values())
    # A name several services share lists its records in the order they arrived: compare as sets.
    assert {n: Counter(node.records()) for n, node in t.owners().items()} == {
        n: Counter(node.records()) for n, node in fresh.owners().items()
    }
    assert dict(t._below.items()) == dict(fresh._below.items())


def test_one_name_asked_several_ways_is_cached_once_per_way() -> None:
    svc = Service(Hostname("x.mesh.local"), addresses=("10.0.0.1",))
    authority = Authority(table(svc))
    name = (b"x", b"mesh", b"local")
    edns = answer_module.Edns(udp_size=4096, do=False)
    for _ in range(2):
        for opt, tcp in ((None, False), (edns, False), (None, True)):
            assert authority.answer(name, A, 1, opt, tcp, 7, 0x0100) is not None
    assert authority.cached() == 3
    authority.update({}, [svc.hostname])
    assert authority.cached() == 0
