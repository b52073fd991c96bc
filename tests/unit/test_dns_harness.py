"""The DNS test harness (tests/fakes/dns.py) checks itself: the upstream answers as configured."""

from __future__ import annotations

from collections import Counter

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from tests.fakes.dns import rrs, upstream_server


async def test_upstream_answers_over_udp_and_tcp() -> None:
    async with upstream_server("truncate") as up:
        query = dns.message.make_query("x.example.", "A")
        over_udp = await dns.asyncquery.udp(query, "127.0.0.1", port=up.port, timeout=5)
        over_tcp = await dns.asyncquery.tcp(query, "127.0.0.1", port=up.port, timeout=5)
    assert over_udp.flags & dns.flags.TC and not over_udp.answer
    assert rrs(over_tcp.answer) == ["x.example. 300 IN A 192.0.2.1", "x.example. 300 IN A 192.0.2.2"]
    assert up.queries == Counter(udp=1, tcp=1)


async def test_upstream_nxdomain_carries_soa() -> None:
    async with upstream_server("nxdomain") as up:
        reply = await dns.asyncquery.udp(dns.message.make_query("x.example.", "A"), "127.0.0.1", port=up.port)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
