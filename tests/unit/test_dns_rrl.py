"""Response rate limiting and the query log's name escaping, on a hand-driven clock."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import pytest

from discoveryd.dns.querylog import describe, presentation
from discoveryd.dns.rrl import DROP, PASS, RateLimiter, RrlSettings, truncated


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ip(text: str) -> bytes:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return socket.inet_pton(family, text)


RESPONSE = dns.message.make_response(dns.message.make_query("svc.mesh.local.", "A")).to_wire()


def test_rate_refills_over_time_and_slips_every_nth() -> None:
    clock = Clock()
    rrl = RateLimiter(RrlSettings(responses_per_second=2, slip=3), clock)
    ip = _ip("192.0.2.1")
    outs = [rrl.check(RESPONSE, ip) for _ in range(8)]
    assert outs[:2] == [RESPONSE, RESPONSE]
    assert [o is None for o in outs[2:]] == [True, True, False, True, True, False]
    assert rrl.dropped.n == 4 and rrl.slipped.n == 2
    clock.now += 0.5  # one token back
    assert rrl.check(RESPONSE, ip) is RESPONSE
    assert rrl.check(RESPONSE, ip) is None


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ("192.0.2.1", "192.0.2.200", True),
        ("192.0.2.1", "192.0.3.1", False),
        ("2001:db8:0:ab00::1", "2001:db8:0:abff::2", True),
        ("2001:db8:0:ab00::1", "2001:db8:0:ac00::1", False),
    ],
)
def test_buckets_are_per_prefix(a: str, b: str, shared: bool) -> None:
    rrl = RateLimiter(RrlSettings(responses_per_second=1, slip=0), Clock())
    assert rrl.check(RESPONSE, _ip(a)) is RESPONSE
    assert (rrl.check(RESPONSE, _ip(b)) is None) is shared


def test_prefixes_not_on_byte_boundaries() -> None:
    rrl = RateLimiter(RrlSettings(responses_per_second=1, slip=0, ipv4_prefix=20, ipv6_prefix=60), Clock())
    assert rrl.verdict(_ip("192.0.16.1")) == PASS
    assert rrl.verdict(_ip("192.0.31.254")) == DROP  # same /20
    assert rrl.verdict(_ip("192.0.32.1")) == PASS
    assert rrl.verdict(_ip("2001:db8:0:abc0::1")) == PASS
    assert rrl.verdict(_ip("2001:db8:0:abcf::1")) == DROP  # same /60


def test_slip_is_the_question_with_tc() -> None:
    query = dns.message.make_query("svc.mesh.local.", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("svc.mesh.local.", 30, "IN", "A", "10.9.0.1"))
    slip = truncated(response.to_wire())
    assert slip is not None
    parsed = dns.message.from_wire(slip)
    assert parsed.flags & dns.flags.TC and parsed.id == query.id
    assert parsed.question == query.question and not parsed.answer and not parsed.additional
    assert truncated(b"\x00" * 11) is None


def test_presentation_escapes_every_unsafe_byte() -> None:
    wire = b"\x00" * 12 + b"\x07a.b\\c d\x03\x00\n\xff\x05local\x00\x00\x10\x00\x01"
    assert presentation(wire) == ("a\\.b\\\\c\\032d.\\000\\010\\255.local.", len(wire) - 4)
    assert presentation(b"\x00" * 12 + b"\x00\x00\x01\x00\x01")[0] == "."
    assert describe(RESPONSE) == ("svc.mesh.local.", "A", "NOERROR")
