"""discoveryd.model: the IP literal check the xDS and DNS builds use per endpoint."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from discoveryd.model import is_ip


def _parses(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@settings(max_examples=2000, deadline=None)
@given(
    st.text(alphabet="0123456789.:abcdef%x \n", max_size=20)
    | st.ip_addresses().map(str)
    | st.lists(st.integers(0, 300).map(str) | st.sampled_from(["00", "01", "010", ""]), min_size=3, max_size=5).map(
        ".".join
    )
)
def test_is_ip_agrees_with_the_parser(text: str) -> None:
    assert is_ip(text) == _parses(text)


def test_is_ip_rejects_what_the_parser_rejects() -> None:
    for text in ("01.2.3.4", "256.0.0.1", "1.2.3", "1.2.3.4.5", "1.2.3.4\n", " 1.2.3.4", "\u0661.2.3.4", ""):
        assert not is_ip(text), text
    for text in ("0.0.0.0", "255.255.255.255", "::1", "::ffff:10.0.0.1", "fe80::1%eth0"):
        assert is_ip(text), text
