"""A full sync's write: `replace` in steps that yield to the loop when the writer offers it."""

from __future__ import annotations

from collections.abc import Iterable

from discoveryd.model import Service
from discoveryd.registry import ShardWriter, SteppedWriter


async def replace_all(shard: ShardWriter, services: Iterable[Service]) -> None:
    """Make `shard` hold exactly `services`: `replace_in_steps` with the index's writers (`SteppedWriter`),
    so 100k services do not hold DNS and xDS while they are compared; `replace` in one call otherwise."""
    if isinstance(shard, SteppedWriter):
        await shard.replace_in_steps(services)
    else:
        shard.replace(services)
