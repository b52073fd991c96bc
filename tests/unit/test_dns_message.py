"""The response packer, checked by decoding its bytes with dnspython: every record kind, compression, truncation."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from discoveryd.dns import answer, message, metrics, records, server, udp, wire
from discoveryd.dns.message import (
    AAAA,
    BADVERS,
    CNAME,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    Named,
    Rdata,
    Soa,
    header_flags,
    labels,
    opt_record,
    pack,
    srv,
    txt,
)

QNAME = labels("web.mesh.local")
SOA_DATA = Soa("ns.dns.mesh.local", "hostmaster.mesh.local", 2026112201, 7200, 1800, 86400, 30)


@pytest.mark.parametrize(
    ("rtype", "rdata", "presentation"),
    [
        (A, bytes((10, 0, 0, 1)), "10.0.0.1"),
        (AAAA, bytes.fromhex("fd000000000000000000000000000005"), "fd00::5"),
        (CNAME, Named(b"", "edge.cdn.example"), "edge.cdn.example."),
        (PTR, Named(b"", "web.mesh.local"), "web.mesh.local."),
        (NS, Named(b"", "ns.dns.mesh.local"), "ns.dns.mesh.local."),
        (SRV, srv(1, 100, 8080, "pod-a.web.mesh.local"), "1 100 8080 pod-a.web.mesh.local."),
        (SOA, SOA_DATA, "ns.dns.mesh.local. hostmaster.mesh.local. 2026112201 7200 1800 86400 30"),
        (TXT, txt(b"1.1.0"), '"1.1.0"'),
        (TXT, txt(b"a b", b""), '"a b" ""'),
    ],
)
def test_every_record_kind_decodes_to_its_presentation(rtype: int, rdata: Rdata, presentation: str) -> None:
    out = pack(0x1234, header_flags(NOERROR, aa=True), (QNAME, rtype, 1), [RR(QNAME, rtype, 30, rdata)])
    msg = dns.message.from_wire(out)
    assert msg.id == 0x1234 and msg.flags & dns.flags.QR and msg.flags & dns.flags.AA
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.question[0].name == dns.name.from_text("web.mesh.local.")
    (rrset,) = msg.answer
    assert (rrset.name, rrset.rdtype, rrset.rdclass, rrset.ttl) == (
        dns.name.from_text("web.mesh.local."),
        rtype,
        dns.rdataclass.IN,
        30,
    )
    assert [r.to_text() for r in rrset] == [presentation]


def test_names_are_compressed_against_the_question_and_each_other() -> None:
    answer = [
        RR(QNAME, CNAME, 30, Named(b"", "pod.web.mesh.local")),
        RR(labels("pod.web.mesh.local"), A, 30, bytes((10, 0, 0, 1))),
    ]
    out = pack(1, header_flags(NOERROR, aa=True), (QNAME, A, 1), answer, [RR(labels("mesh.local"), SOA, 5, SOA_DATA)])
    question_end = 12 + len(b"\x03web\x04mesh\x05local\x00") + 4
    # The first owner is a pointer to the question name at offset 12.
    assert out[question_end : question_end + 2] == b"\xc0\x0c"
    # The CNAME target writes its first label, then points at the question name.
    cname_rdata = out[question_end + 12 : question_end + 12 + 6]
    assert cname_rdata == b"\x03pod\xc0\x0c"
    # The A owner is one pointer, to the CNAME target.
    assert out[question_end + 18 : question_end + 20] == b"\xc0" + bytes((question_end + 12,))
    msg = dns.message.from_wire(out)
    assert [(str(r.name), r[0].to_text()) for r in msg.answer] == [
        ("web.mesh.local.", "pod.web.mesh.local."),
        ("pod.web.mesh.local.", "10.0.0.1"),
    ]
    assert msg.authority[0][0].to_text().startswith("ns.dns.mesh.local. hostmaster.mesh.local. ")
    assert len(out) < 12 + 20 + 2 * (len(b"\x03pod\x03web\x04mesh\x05local\x00") + 10) + 30


def test_srv_targets_are_never_compressed() -> None:
    target = "pod-a.web.mesh.local"
    out = pack(1, header_flags(NOERROR), (QNAME, SRV, 1), [RR(QNAME, SRV, 30, srv(0, 1, 80, target))])
    assert b"\x05pod-a\x03web\x04mesh\x05local\x00" in out
    assert dns.message.from_wire(out).answer[0][0].to_text() == f"0 1 80 {target}."


def test_owner_case_follows_the_question() -> None:
    mixed = (b"WeB", b"Mesh", b"LOCAL")
    out = pack(1, header_flags(NOERROR), (mixed, A, 1), [RR(mixed, A, 30, bytes(4))])
    assert str(dns.message.from_wire(out).answer[0].name) == "WeB.Mesh.LOCAL."


def test_opt_record_carries_size_do_and_extended_rcode() -> None:
    out = pack(7, header_flags(BADVERS), (QNAME, A, 1), opt=opt_record(True, BADVERS))
    msg = dns.message.from_wire(out)
    assert msg.edns == 0 and msg.payload == 1232 and msg.ednsflags & dns.flags.DO
    assert msg.rcode() == dns.rcode.BADVERS
    plain = dns.message.from_wire(pack(7, header_flags(NOERROR), (QNAME, A, 1), opt=opt_record(False)))
    assert plain.edns == 0 and not plain.ednsflags & dns.flags.DO and plain.rcode() == dns.rcode.NOERROR


def test_flags_and_rcode() -> None:
    out = pack(9, header_flags(NXDOMAIN, aa=True, rd=True, ra=True), (QNAME, A, 1))
    msg = dns.message.from_wire(out)
    assert msg.flags & ~0xF == dns.flags.QR | dns.flags.AA | dns.flags.RD | dns.flags.RA
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert pack(9, 0, None) == b"\x00\x09" + bytes(10)


def _addresses(n: int) -> list[RR]:
    return [RR(QNAME, A, 30, bytes((10, 0, i >> 8, i & 0xFF))) for i in range(n)]


def test_additional_section_is_dropped_before_truncating() -> None:
    answer = [RR(labels("_http._tcp.web.mesh.local"), SRV, 30, srv(0, 1, 80, "web.mesh.local"))]
    glue = _addresses(40)
    full = pack(1, header_flags(NOERROR), (QNAME, SRV, 1), answer, (), glue, opt_record(False))
    assert len(full) > 512
    out = pack(1, header_flags(NOERROR), (QNAME, SRV, 1), answer, (), glue, opt_record(False), limit=512)
    msg = dns.message.from_wire(out)
    assert not msg.flags & dns.flags.TC
    assert len(msg.answer) == 1 and not msg.additional and msg.edns == 0


def test_too_large_answer_is_truncated_keeping_question_and_opt() -> None:
    out = pack(1, header_flags(NOERROR, aa=True), (QNAME, A, 1), _addresses(100), opt=opt_record(False), limit=512)
    assert len(out) <= 512
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and msg.flags & dns.flags.AA
    assert not msg.answer and msg.question[0].name == dns.name.from_text("web.mesh.local.") and msg.edns == 0
    whole = pack(1, header_flags(NOERROR, aa=True), (QNAME, A, 1), _addresses(100), opt=opt_record(False))
    assert len(dns.message.from_wire(whole).answer[0]) == 100


_label = st.binary(min_size=1, max_size=20).map(lambda b: bytes(c % 26 + 97 for c in b))
_name = st.lists(_label, min_size=0, max_size=5).map(tuple)


@given(owners=st.lists(_name, min_size=1, max_size=12), targets=st.lists(_name, min_size=1, max_size=12))
def test_compression_round_trips(owners: list[tuple[bytes, ...]], targets: list[tuple[bytes, ...]]) -> None:
    records = [
        RR(owner, PTR, 60, Named(b"", ".".join(t.decode() for t in target)))
        for owner, target in zip(owners, targets, strict=False)
    ]
    out = pack(3, header_flags(NOERROR), (owners[0], PTR, 1), records)
    msg = dns.message.from_wire(out)
    got = [(rrset.name, rd.target) for rrset in msg.answer for rd in rrset]
    want = {(_dn(r.owner), _dn(labels(r.rdata.target))) for r in records if isinstance(r.rdata, Named)}
    assert set(got) == want


def _dn(name: tuple[bytes, ...]) -> dns.name.Name:
    return dns.name.Name((*name, b""))


@pytest.mark.parametrize("module", [answer, message, metrics, records, server, udp, wire])
def test_authoritative_answers_need_no_dns_library(module: ModuleType) -> None:
    # Only the forwarder reads upstream replies with dnslib; nothing on the way from the index to an answer does.
    tree = ast.parse(inspect.getsource(module))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] == "dnslib"}
