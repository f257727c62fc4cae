"""Seeds and shards of the batch order: what makes a resumed or data-parallel run see the same batches."""
from __future__ import annotations


def _mix(*ints: int) -> int:
    """A deterministic 63-bit seed from a tuple of integers."""
    h = 1469598103934665603
    for v in ints:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def shard_of(n: int, rank: int, world: int) -> slice:
    """The contiguous part of a batch of ``n`` that process ``rank`` of ``world`` takes."""
    if n % world:
        raise ValueError(f"a batch of {n} does not split evenly over {world} processes")
    per = n // world
    return slice(rank * per, (rank + 1) * per)
