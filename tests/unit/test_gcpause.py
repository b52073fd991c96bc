"""Overlapping pauses of the garbage collector (DNS sync, stepwise replace) resume it once, at the end."""

from __future__ import annotations

import gc

from discoveryd import gcpause


def test_overlapping_pauses_resume_the_collector_when_the_last_ends() -> None:
    assert gc.isenabled()
    first, second = gcpause.paused(), gcpause.paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first job ends while the second still runs: still paused
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
