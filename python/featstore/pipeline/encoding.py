"""Encoding batches on the device, halving them on out-of-memory.

The encoding itself (``inference_mode``, the encoder's method for images, frame sets, items or
histories, checking what came back) is :func:`featstore.encoding.encode_batch` (and
:func:`featstore.encoding.encode_histories`), shared with the training side; this module adds what a
long run needs: a batch that does not fit is split in two and retried, and every later batch is no
larger, so one oversized batch costs one retry, not one per batch. For histories a batch is the
lists streamed together, so out-of-memory halves the number of lists.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from featstore.encoders import Encoder, capabilities
from featstore.encoding import encode_batch, encode_histories, is_out_of_memory
from featstore.pipeline.items import WorkItem
from featstore.pipeline.summary import Counts
from featstore.pipeline.writing import Outputs, Writer


class BatchEncoder:
    """Encodes batches of work items and hands their outputs to the writer.

    Parameters
    ----------
    encoder : Encoder
        Already on ``device``.
    device : torch.device
        Where batches are encoded.
    writer : Writer
        Takes each batch's outputs, and the items that fail even alone.
    counts : Counts
        Receives the seconds spent encoding, and the frame passes of histories (the encoder's
        ``frame_passes`` count when it keeps one, else one per frame of each list).
    batch_size : int
        Items per batch to start with; :attr:`batch_size` is the size in force (halved on
        out-of-memory), which the caller fills its batches to.
    """

    def __init__(self, encoder: Encoder, device: torch.device, writer: Writer, counts: Counts,
                 batch_size: int) -> None:
        self.encoder, self.device, self.writer, self.counts = encoder, device, writer, counts
        self.batch_size = batch_size
        self._counts_passes = capabilities(encoder).frame_passes

    def encode(self, items: list[WorkItem], batch: torch.Tensor | list[Any]) -> None:
        """Encodes ``batch`` (uint8 images or frame sets, or a list of items for
        ``encode_items``), one row per item, and submits the outputs; on out-of-memory halves it
        (and later batches) and retries."""
        t0 = time.perf_counter()
        history = items[0].kind == "history"
        passes_before = self._passes()
        outputs: Outputs
        try:
            if history:
                assert isinstance(batch, torch.Tensor)
                # Lists streamed together have one length (cut where a frame could not be
                # decoded); the union of their prefix lengths within it is what any of them reads.
                lengths = sorted({n for item in items for n in item.lengths if n <= batch.shape[1]})
                outputs = encode_histories(self.encoder, self.device, batch, lengths)
            else:
                outputs = encode_batch(self.encoder, self.device, batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._halve(items, batch, exc)
            return
        self.counts.stage_seconds["encode"] += time.perf_counter() - t0
        if history:
            assert isinstance(batch, torch.Tensor)
            counted = self._passes() - passes_before
            self.counts.frame_passes += counted if self._counts_passes else len(items) * int(batch.shape[1])
        self.writer.submit(items, outputs)

    def _passes(self) -> int:
        """The encoder's count of frame passes so far (0 when it keeps none)."""
        return int(self.encoder.frame_passes) if self._counts_passes else 0  # type: ignore[attr-defined]

    def _halve(self, items: list[WorkItem], batch: torch.Tensor | list[Any], exc: BaseException) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) == 1:
            self.writer.fail(items[0], f"out of memory even alone: {str(exc).splitlines()[0]}")
            return
        half = len(items) // 2
        self.batch_size = max(1, min(self.batch_size, half))
        print(f"featstore precompute: out of memory at batch {len(items)}; retrying with {half}", file=sys.stderr)
        self.encode(items[:half], batch[:half])
        self.encode(items[half:], batch[half:])
