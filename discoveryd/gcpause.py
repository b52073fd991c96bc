"""Pausing the cyclic garbage collector around bulk work, nested safely.

Bulk jobs that make no reference cycles (a record table build, the DNS sync,
a stepwise index replace) pause the collector: a collection in their middle
rescans the objects they just made, 0.1-0.4 s at 100k services in one step.
Jobs on the event loop overlap (they yield between steps), so the pauses nest:
the collector is resumed when the last one ends, and only if it was enabled
when the first began.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_resume = False


@contextmanager
def paused() -> Iterator[None]:
    """The collector is off inside (and inside any overlapping `paused()`), as it was after the last."""
    global _depth, _resume
    if _depth == 0:
        _resume = gc.isenabled()
        gc.disable()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _resume:
            gc.enable()
