"""NSID (RFC 5001) as a config option: `dns.nsid`, off by default, checked with dnspython."""

from __future__ import annotations

import dns.asyncquery
import dns.edns
import dns.message
import pytest

from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import MESH, running


def _index() -> Index:
    index = Index()
    shard = index.writer(SourceId("files/local"))
    shard.replace([Service(Hostname("a.mesh.local"), endpoints=(Endpoint("10.0.0.1"),))])
    shard.mark_synced()
    return index


def _nsid(reply: dns.message.Message) -> bytes | None:
    for option in reply.options:
        if option.otype == dns.edns.NSID:
            return option.to_wire()
    return None


async def _ask(host: str, port: int, transport: str, *, want: bool) -> dns.message.Message:
    options = [dns.edns.GenericOption(dns.edns.NSID, b"")] if want else []
    query = dns.message.make_query("a.mesh.local.", "A", use_edns=0, options=options)
    if transport == "udp":
        return await dns.asyncquery.udp(query, host, port=port, timeout=5)
    return await dns.asyncquery.tcp(query, host, port=port, timeout=5)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_nsid_is_sent_to_clients_that_ask(transport: str) -> None:
    async with running(_index(), zones=(MESH,), nsid="replica-1") as server:
        host, port = server.addresses[0]
        for _ in range(3):  # a miss, then the answer cache, then the exact-bytes path
            reply = await _ask(host, port, transport, want=True)
            assert [r.to_text() for r in reply.answer] == ["a.mesh.local. 30 IN A 10.0.0.1"]
            assert _nsid(reply) == b"replica-1"
            plain = await _ask(host, port, transport, want=False)
            assert plain.answer and _nsid(plain) is None


async def test_nsid_is_off_by_default() -> None:
    async with running(_index(), zones=(MESH,)) as server:
        host, port = server.addresses[0]
        reply = await _ask(host, port, "udp", want=True)
        assert reply.answer and _nsid(reply) is None
