"""Which work items this process takes: an index range, a ``--shard I/N``, the torchrun rank.

Shards and ranks split the sorted list by stride, so any set of them is disjoint and together
complete, and each one's journal is named by its position in the combined split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from featstore import env

T = TypeVar("T")


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun (from the environment), else ``(0, 1)``."""
    return env.distributed_rank()


def check_range(start_idx: int | None, end_idx: int | None) -> None:
    """ValueError when an index is negative (it would silently count from the end of a list the
    user never sees) or ``--end-idx`` comes before ``--start-idx`` (the range selects nothing)."""
    for flag, value in (("--start-idx", start_idx), ("--end-idx", end_idx)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value} is negative: give an index into the sorted source list, from 0 "
                             "(`featstore scan ROOT` lists it)")
    if start_idx is None or end_idx is None:
        return
    if end_idx < start_idx:
        raise ValueError(f"--start-idx {start_idx} comes after --end-idx {end_idx}: the range selects nothing; "
                         "give the first index and the end (exclusive) after it")


def select(paths: Sequence[T], *, start_idx: int | None = None, end_idx: int | None = None,
           shard: tuple[int, int] | None = None, rank: tuple[int, int] = (0, 1)) -> list[T]:
    """The sources this process works on: ``[start:end]`` of the sorted list, then every N-th
    for a shard, then every world-th for a torchrun rank (disjoint, together complete).

    Raises
    ------
    ValueError
        The range is reversed (:func:`check_range`).
    """
    check_range(start_idx, end_idx)
    chosen = list(paths[start_idx:end_idx])
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    r, world = rank
    return chosen[r::world] if world > 1 else chosen


def split_position(rank: tuple[int, int], shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(position, count)`` of this process among all shards times all ranks: what names its
    journal, so that no two processes of a split append to the same one."""
    world = max(rank[1], 1) * (shard[1] if shard else 1)
    me = rank[0] + (shard[0] * rank[1] if shard else 0)
    return me, world


def join_process_group(world: int) -> bool:
    """Under torchrun, joins (or reuses) the process group so ranks can wait for each other
    before rank 0 compacts their journals. gloo: the group only ever sends a barrier."""
    if world <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
    return True
