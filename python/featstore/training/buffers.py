"""Where batch reads go: tensors over shared memory in a DataLoader worker, pinned or reused
buffers in the main process.

A fresh buffer costs a page fault and a zeroed page per 4 KiB, as much as the copy into it, so
the main process keeps a few per shape and refills one only when no tensor uses its memory any
more (a batch the training loop still holds is never overwritten).
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Batch buffers kept per shape for reuse in the main process.
POOLED_BUFFERS = 8


class BatchBuffers:
    """Uninitialized ``[rows, *shape]`` tensors to read batches into.

    Parameters
    ----------
    pin_memory : bool
        In the main process, allocate pinned memory (when CUDA is available) instead of reusing
        pooled buffers.
    """

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._pool: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    # The buffers belong to the process that made them: a pickled copy (a spawned worker) starts empty.
    def __getstate__(self) -> dict[str, Any]:
        return {"pin_memory": self.pin_memory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def take(self, rows: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor to read a batch into. In a DataLoader worker it is in shared memory (the batch
        then reaches the main process without another copy). In the main process it is pinned on
        request (torch's caching host allocator reuses pinned blocks once their copies to the GPU
        are done), else a pooled buffer that nothing else references any more."""
        if torch.utils.data.get_worker_info() is not None:
            nbytes = rows * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return tensor_on(torch.UntypedStorage._new_shared(nbytes), dtype, (rows, *shape))
        if self.pin_memory and torch.cuda.is_available():
            return torch.empty((rows, *shape), dtype=dtype, pin_memory=True)
        pool = self._pool.setdefault((dtype, rows, shape), [])
        for buf in pool:
            if _unreferenced(buf):
                return buf.view(buf.shape)  # a new view: while it lives, the buffer counts as used
        buf = torch.empty((rows, *shape), dtype=dtype)
        if len(pool) < POOLED_BUFFERS and _unreferenced(buf):
            pool.append(buf)
            return buf.view(buf.shape)
        return buf


def tensor_on(storage: torch.UntypedStorage, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over all of ``storage`` (no copy)."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return torch.empty((0,), dtype=dtype, device=storage.device).set_(storage, 0, shape, strides)


def _unreferenced(buf: torch.Tensor) -> bool:
    """True when no tensor but ``buf`` itself uses its memory (the pool may refill it). Without
    torch's storage use count, nothing is ever reused."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return bool(use_count(buf.untyped_storage()._cdata) <= 2)  # buf, and the wrapper made to ask
