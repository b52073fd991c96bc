"""DNS cookies (RFC 7873, RFC 9018 server cookies) as config options, checked with dnspython."""

from __future__ import annotations

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest

from discoveryd.config import DnsConfig
from discoveryd.dns.cookies import Cookies, siphash24
from discoveryd.index import Index
from discoveryd.model import Endpoint, Hostname, Service, SourceId
from tests.fakes.dns import MESH, running

SECRET = "000102030405060708090a0b0c0d0e0f"
CLIENT = bytes.fromhex("2464c4abcf10c957")


def test_siphash24_reference_vectors() -> None:
    key = bytes(range(16))
    assert siphash24(key, b"").hex() == "310e0edd47db6f72"
    assert siphash24(key, bytes(range(15))).hex() == "e545be4961ca29a1"


def test_server_cookies_are_bound_to_client_cookie_address_and_time() -> None:
    cookies = Cookies(bytes.fromhex(SECRET))
    server = cookies.server_cookie(CLIENT, "198.51.100.100", now=1_559_731_985)
    assert len(server) == 16 and server[:4] == b"\x01\x00\x00\x00"
    assert cookies.valid(CLIENT, server, "198.51.100.100", now=1_559_731_985 + 60)
    assert not cookies.valid(CLIENT, server, "198.51.100.101", now=1_559_731_985 + 60)
    assert not cookies.valid(b"\x00" * 8, server, "198.51.100.100", now=1_559_731_985 + 60)
    assert not cookies.valid(CLIENT, server, "198.51.100.100", now=1_559_731_985 + 7200)  # expired
    assert not Cookies().valid(CLIENT, server, "198.51.100.100", now=1_559_731_985)  # another secret


def test_cookie_secret_must_be_16_bytes_of_hex() -> None:
    assert DnsConfig(cookies=True, cookie_secret=SECRET).cookie_secret == SECRET
    with pytest.raises(ValueError, match="32 hex digits"):
        DnsConfig(cookies=True, cookie_secret="abc")


def _index() -> Index:
    index = Index()
    shard = index.writer(SourceId("files/local"))
    shard.replace([Service(Hostname("a.mesh.local"), endpoints=(Endpoint("10.0.0.1"),))])
    shard.mark_synced()
    return index


def _cookie(reply: dns.message.Message) -> bytes | None:
    for option in reply.options:
        if option.otype == dns.edns.COOKIE:
            return option.to_wire()
    return None


async def _ask(host: str, port: int, transport: str, cookie: bytes | None) -> dns.message.Message:
    options = [dns.edns.GenericOption(dns.edns.COOKIE, cookie)] if cookie is not None else []
    query = dns.message.make_query("a.mesh.local.", "A", use_edns=0, options=options)
    if transport == "udp":
        return await dns.asyncquery.udp(query, host, port=port, timeout=5)
    return await dns.asyncquery.tcp(query, host, port=port, timeout=5)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_clients_with_a_cookie_get_a_valid_server_cookie(transport: str) -> None:
    async with running(_index(), zones=(MESH,), cookies=True, cookie_secret=SECRET) as server:
        host, port = server.addresses[0]
        check = Cookies(bytes.fromhex(SECRET))
        sent = CLIENT
        for _ in range(3):  # a miss, then the answer cache, then the exact-bytes path
            reply = await _ask(host, port, transport, sent)
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            got = _cookie(reply)
            assert got is not None and got[:8] == CLIENT and len(got) == 24
            assert check.valid(CLIENT, got[8:], "127.0.0.1")
            sent = got  # the client sends its and our cookie back next time
        forged = CLIENT + b"\x01\x00\x00\x00" + b"\x00" * 12
        reply = await _ask(host, port, transport, forged)  # not ours: answered, with a fresh cookie
        got = _cookie(reply)
        assert reply.answer and got is not None and check.valid(CLIENT, got[8:], "127.0.0.1")
        plain = await _ask(host, port, transport, None)
        assert plain.answer and _cookie(plain) is None


async def test_cookies_are_off_by_default() -> None:
    async with running(_index(), zones=(MESH,)) as server:
        host, port = server.addresses[0]
        reply = await _ask(host, port, "udp", CLIENT)
        assert reply.answer and _cookie(reply) is None
