"""Decoding work items in DataLoader worker processes.

The encoder's ``preprocess`` gives uint8, so workers send a quarter of the bytes of float
images. Each item comes back with its sources' stamps taken before reading: the writer refuses
features of a source that changed after it was read. Workers take items in chunks of up to 32
consecutive ones: one hand-off (pickling, a queue, a wake-up) per item cost more than a cheap
encoder's whole work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from featstore.encoders import Capabilities, Encoder, capabilities
from featstore.encoding import decode_source, read_inputs
from featstore.models.vggt.preprocess import stack_uint8_images
from featstore.pipeline.items import Kind, WorkItem

#: ``(decoded or None, error or None, stamp(s) before reading or None)``.
Decoded = tuple[Any, str | None, Any]


def _decode_image(encoder: Encoder, caps: Capabilities, root: str, item: WorkItem) -> Decoded:
    """The image, and as what was read: its stamp and its other inputs, stamped before reading."""
    inputs, error = read_inputs(encoder, item.paths[0], root, caps)
    if error is not None:
        return None, error, None
    decoded, error, stamp = decode_source(encoder, os.path.join(root, item.paths[0]), caps)
    return decoded, error, (stamp, inputs)


def _decode_set(encoder: Encoder, caps: Capabilities, root: str, item: WorkItem) -> Decoded:
    """``[S, 3, H, W]``, smaller frames padded with white; one bad frame fails its set, never the run."""
    frames = [decode_source(encoder, os.path.join(root, r), caps) for r in item.paths]
    error = next((err for _, err, _ in frames if err is not None), None)
    if error is not None:
        return None, error, None
    try:
        return stack_uint8_images([f for f, _, _ in frames]), None, tuple(st for _, _, st in frames)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}", None


def _decode_history(encoder: Encoder, caps: Capabilities, root: str, item: WorkItem) -> Decoded:
    """``[T, 3, H, W]`` as for a set, but a frame that cannot be decoded only cuts the list there:
    the prefixes before it do not depend on it. Stamps: ``(the decoded frames' stamps, the bad
    frame's error or None)``; the writer writes the prefixes the decoded frames cover and fails
    the others."""
    frames: list[torch.Tensor] = []
    stamps = []
    error = None
    for rel in item.paths:
        frame, err, stamp = decode_source(encoder, os.path.join(root, rel), caps)
        if err is not None:
            error = f"frame {rel}: {err}"
            break
        frames.append(frame)
        stamps.append(stamp)
    if len(frames) < item.lengths[0]:
        return None, error, None
    try:
        return stack_uint8_images(frames), None, (tuple(stamps), error)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}", None


# How each kind's sources become one decoded item (see items.py).
_DECODERS: dict[Kind, Callable[[Encoder, Capabilities, str, WorkItem], Decoded]] = {
    "image": _decode_image, "set": _decode_set, "history": _decode_history}


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes chunk ``c`` of the work items (items ``c * chunk`` to ``(c + 1) * chunk - 1``) in a
    worker: ``[(index, decoded or None, error or None, stamp(s))]``. Decoded is a uint8 tensor,
    or for an encoder with ``encode_items`` whatever its ``preprocess`` returns (a caption)."""

    def __init__(self, encoder: Encoder, root: str, items: Sequence[WorkItem], chunk: int = 1) -> None:
        self.encoder, self.root, self.items, self.chunk = encoder, root, list(items), chunk
        self.caps = capabilities(encoder)  # asked once: asking per source cost more than a decode

    def __len__(self) -> int:
        return -(-len(self.items) // self.chunk)

    def __getitem__(self, c: int) -> tuple[torch.Tensor | np.ndarray | None, list[tuple[int, Any, str | None, Any]]]:
        indices = range(c * self.chunk, min(len(self.items), (c + 1) * self.chunk))
        decoded = [(i, *_DECODERS[self.items[i].kind](self.encoder, self.caps, self.root, self.items[i]))
                   for i in indices]
        return _packed(decoded) if torch.utils.data.get_worker_info() is not None else (None, decoded)


#: A chunk's images up to this many bytes travel inside the pickled chunk, not in shared memory.
SMALL_CHUNK_BYTES = 1 << 20


def _packed(decoded: list[tuple[int, Any, str | None, Any]]
            ) -> tuple[torch.Tensor | np.ndarray | None, list[tuple[int, Any, str | None, Any]]]:
    """``(the chunk's decoded images as one array, the items without them)`` when every item
    decoded to a tensor of one shape and dtype, else ``(None, the items)``. A worker hands each
    tensor over in a shared-memory segment of its own, passed as a file descriptor through a
    socket of torch's (about 2 ms here), which costs more than decoding a small image: one per
    chunk instead, and for a chunk of at most ``SMALL_CHUNK_BYTES`` none: its bytes go with the
    pickled chunk (a copy of under a megabyte)."""
    tensors = [d for _, d, _, _ in decoded if isinstance(d, torch.Tensor)]
    first = tensors[0] if tensors else None
    if first is None or len(tensors) != len(decoded) or len(tensors) < 2 \
            or any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        return None, decoded
    stacked = torch.stack(tensors)
    small = stacked.nbytes <= SMALL_CHUNK_BYTES and stacked.dtype in _NUMPY_DTYPES and stacked.device.type == "cpu"
    return stacked.detach().numpy() if small else stacked, [(i, None, error, stamp) for i, _, error, stamp in decoded]


#: Dtypes numpy holds as torch does (bfloat16 has no numpy dtype: such chunks stay tensors).
_NUMPY_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                 torch.float64, torch.bool)


def _identity(item: Any) -> Any:
    return item


def decode_loader(encoder: Encoder, root: str, items: Sequence[WorkItem], *, batch_size: int, num_workers: int,
                  pin_memory: bool) -> torch.utils.data.DataLoader:
    """A loader yielding chunks of decoded items, in order (:func:`each_item` takes them one by
    one), decoding ahead enough to keep two batches in flight (never more than all the items)."""
    chunk = max(1, min(32, batch_size)) if num_workers else 1
    chunks = DecodeDataset(encoder, root, items, chunk)
    return torch.utils.data.DataLoader(
        chunks, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity, pin_memory=pin_memory,
        prefetch_factor=_prefetch_factor(len(chunks), -(-batch_size // chunk), num_workers),
        persistent_workers=False, worker_init_fn=ExitWithParent() if num_workers else None)


def each_item(loader: Iterable[tuple[torch.Tensor | np.ndarray | None, list[tuple[int, Any, str | None, Any]]]]
              ) -> Iterator[tuple[int, Any, str | None, Any]]:
    """The decoded items of a :func:`decode_loader`, one by one (a packed chunk's images as rows
    of its tensor)."""
    for stacked, chunk in loader:
        if stacked is None:
            yield from chunk
        else:
            rows = torch.from_numpy(stacked) if isinstance(stacked, np.ndarray) else stacked
            for row, (i, _, error, stamp) in zip(rows, chunk, strict=True):
                yield i, row, error, stamp


class ExitWithParent:
    """``worker_init_fn``: a decoding worker ends itself once the process that started it is gone.

    A precompute killed with ``kill -9`` cannot stop its workers; torch's own watchdog notes the
    parent's pid when the worker starts, so a parent killed before that is never noticed and the
    worker waits for work forever, holding memory and the terminal's (or CI's) pipes. The pid
    here is taken in the parent, before the fork."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        def watch() -> None:
            while os.getppid() == self.parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, name="featstore-parent-watch", daemon=True).start()


def _prefetch_factor(items: int, batch_size: int, num_workers: int) -> int | None:
    """Items (here: chunks) each worker decodes ahead: two batches in flight across the workers
    (decoding never waits for a batch to encode), but no more than the items each worker has. The DataLoader
    queues ``prefetch_factor * num_workers`` indices when it starts, one by one, so an unbounded
    factor (``--batch-size 1000000000``) would keep it from ever starting."""
    if not num_workers:
        return None
    per_worker = -(-items // num_workers)
    return max(2, min(-(-2 * batch_size // num_workers), per_worker))
