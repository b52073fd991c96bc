"""The TCP slot table (`dns.tcp.Slots`) on a hand-driven clock: caps, idle timeouts, who is closed."""

from __future__ import annotations

import pytest

from discoveryd.dns.tcp import MIN_IDLE, Conn, Refusal, Slots, source_key


class Closed(list[str]):
    def conn(self, name: str, source: str, now: float) -> Conn:
        return Conn(source, now, lambda: self.append(name))


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9%eth0", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_key(peer: str, key: str) -> None:
    assert source_key(peer) == key


def test_per_source_cap_refuses_and_release_frees_it() -> None:
    closed = Closed()
    slots = Slots(limit=100, per_source=2, idle=10.0)
    a, b = closed.conn("a", "x", 0.0), closed.conn("b", "x", 0.0)
    assert slots.admit(a) is None and slots.admit(b) is None
    assert slots.admit(closed.conn("c", "x", 0.0)) is Refusal.SOURCE_LIMIT
    assert slots.admit(closed.conn("d", "y", 0.0)) is None
    slots.release(a)
    slots.release(a)  # idempotent
    assert slots.admit(closed.conn("e", "x", 0.0)) is None
    assert len(slots) == 3 and closed == []


def test_idle_timeout_shrinks_linearly_above_half() -> None:
    closed = Closed()
    slots = Slots(limit=10, per_source=10, idle=11.0)
    timeouts = []
    for i in range(10):
        slots.admit(closed.conn(str(i), "x", 0.0))
        timeouts.append(slots.idle_timeout())
    assert timeouts[:5] == [11.0] * 5
    assert timeouts[5:] == pytest.approx([9.0, 7.0, 5.0, 3.0, MIN_IDLE])


def test_full_table_closes_the_least_recently_active() -> None:
    closed = Closed()
    slots = Slots(limit=3, per_source=3, idle=10.0)
    conns = [closed.conn(str(i), "x", 0.0) for i in range(3)]
    for c in conns:
        slots.admit(c)
    slots.touch(conns[0], 0.5)
    assert slots.admit(closed.conn("new", "y", 0.6)) is None
    assert closed == ["1"] and len(slots) == 3 and slots.shed == 1
    slots.release(conns[1])  # the closed connection's own cleanup later: no double count
    assert len(slots) == 3


def test_admission_under_pressure_closes_only_the_long_idle() -> None:
    closed = Closed()
    slots = Slots(limit=4, per_source=4, idle=30.0)
    old = closed.conn("old", "x", 0.0)
    recent = closed.conn("recent", "x", 0.0)
    slots.admit(old)
    slots.admit(recent)
    slots.touch(recent, 9.5)
    slots.admit(closed.conn("third", "x", 9.6))  # 3 of 4: timeout 15 s, nobody idle that long
    assert closed == []
    slots.admit(closed.conn("fourth", "x", 10.0))  # 4 of 4: timeout 1 s; "old" idle 10 s
    assert closed == ["old"] and len(slots) == 3


def test_touch_after_release_is_ignored() -> None:
    closed = Closed()
    slots = Slots(limit=4, per_source=4, idle=30.0)
    c = closed.conn("c", "x", 0.0)
    slots.admit(c)
    slots.release(c)
    slots.touch(c, 5.0)
    assert len(slots) == 0
