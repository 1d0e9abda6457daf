"""How work is split and seeded (bottom layer: no rapm imports).

Every stage that draws noise per item (a trajectory, an evaluation image) seeds it with
:func:`item_seed` of the run's seed and the item's index only, EDM style, so an item's bytes do not
depend on the shard, the batch or the number of processes that made it; :func:`shard_range` splits
``n`` items into balanced contiguous shards, and :func:`index_runs` lists the contiguous runs of a set of
items (the rows a resumed shard writes).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence


def item_seed(seed: int, i: int) -> int:
    """The noise seed of item ``i`` (a trajectory, an evaluation image) of a run seeded ``seed``."""
    return int(seed) + int(i)


def shard_range(n: int, shards: int, shard: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of shard ``shard`` of ``shards`` over ``n`` items, in whole units of ``unit`` items,
    balanced (shard sizes differ by at most one unit). Raises ``ValueError`` for a shard outside the range."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard index {shard} outside [0, {shards})")
    units = math.ceil(n / unit)
    return min(shard * units // shards * unit, n), min((shard + 1) * units // shards * unit, n)


def index_runs(indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Contiguous runs of sorted ``indices`` as (start, stop, offset into indices)."""
    offset = 0
    while offset < len(indices):
        end = offset + 1
        while end < len(indices) and indices[end] == indices[end - 1] + 1:
            end += 1
        yield indices[offset], indices[end - 1] + 1, offset
        offset = end
