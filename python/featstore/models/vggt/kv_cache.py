"""The key/value cache of causal streaming: what each global block keeps of earlier frames.

JanusVLN-style models feed VGGT's aggregator one frame at a time; every global block attends
from the new frame to the keys and values of the frames before it. A :class:`KVCache` holds
those keys and values for one batch of sequences that are streamed together (see docs/causal-streaming.md,
"Causal streaming").
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["KVCache", "Window", "normalize_window", "window_frame_mask"]

Window = tuple[int, int]
"""``(start, recent)``: keep the first ``start`` and the last ``recent`` frames (JanusVLN: (8, 48))."""


def normalize_window(window: Sequence[int] | None) -> Window | None:
    """Check a ``(start, recent)`` window and return it as a tuple of two ints.

    Parameters
    ----------
    window : pair of int, or None
        Frames kept at the start and at the end of the stream; ``None`` keeps every frame.

    Returns
    -------
    (int, int) or None

    Raises
    ------
    ValueError
        For anything but two non-negative integers.
    """
    if window is None:
        return None
    items = tuple(window)
    if len(items) != 2 or not all(
        isinstance(item, numbers.Integral) and not isinstance(item, bool) and item >= 0 for item in items
    ):
        raise ValueError(
            f"window must be (start, recent), two non-negative integers (JanusVLN uses (8, 48)), got {window!r}"
        )
    return int(items[0]), int(items[1])


def _kept_after(frames: list[int], window: Window | None) -> list[int]:
    """The frames a window keeps once a frame was appended to ``frames``."""
    if window is None:
        return frames
    start, recent = window
    if len(frames) <= start + recent:
        return frames
    return frames[:start] + (frames[len(frames) - recent :] if recent else [])


def window_frame_mask(num_frames: int, window: Sequence[int] | None) -> torch.Tensor:
    """Which earlier frames each frame of a windowed stream attends to.

    Streaming ``num_frames`` frames through a cache with this window gives the same outputs as
    one call of the aggregator with this ``frame_mask``; with ``window=None`` it is the causal
    (lower-triangular) mask.

    Parameters
    ----------
    num_frames : int
        Frames in the stream.
    window : (int, int) or None
        The cache's window.

    Returns
    -------
    Tensor
        bool ``[num_frames, num_frames]``; entry ``[i, j]`` is True when frame ``i`` attends to
        frame ``j``.
    """
    window = normalize_window(window)
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    cached: list[int] = []
    for frame in range(num_frames):
        mask[frame, cached + [frame]] = True
        cached = _kept_after(cached + [frame], window)
    return mask


class KVCache:
    """Keys and values of earlier frames, per global block, for one batch of streamed sequences.

    Made by :meth:`Aggregator.new_kv_cache` and passed to every call of a stream
    (``aggregator(images[:, k:k + 1], kv_cache=cache)``). For each global block it holds, per
    cached frame, the keys and values **as the qkv projection produced them**, before q/k
    normalisation and RoPE, ``[B, heads, N, head_dim]`` each.

    A cache serves exactly one batch of ``B`` sequences, each row only ever attending to its
    own row's frames: the first call fixes ``B`` and the tokens per frame, and a call with a
    different batch size or image size raises instead of mixing sequences. Start each new batch
    of sequences (each episode) with a new cache, or :meth:`clear` this one.

    Parameters
    ----------
    num_blocks : int
        Global blocks of the aggregator (its depth).
    window : (int, int) or None
        ``(start, recent)``: after each frame, once more than ``start + recent`` frames are
        cached, keep only the first ``start`` and the last ``recent``; dropped frames are gone
        for every later frame. ``None`` keeps every frame.
    """

    def __init__(self, num_blocks: int, window: Sequence[int] | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.window = normalize_window(window)
        self._keys: list[list[torch.Tensor]]
        self._values: list[list[torch.Tensor]]
        self._frames: list[int]
        self._frames_seen: int
        self._batch_size: int | None
        self._tokens_per_frame: int | None
        self.clear()

    @property
    def frames_seen(self) -> int:
        """Frames fed through this cache so far, evicted ones included (one frame pass each)."""
        return self._frames_seen

    @property
    def frames(self) -> tuple[int, ...]:
        """Stream positions (0 = first frame fed) of the frames whose keys are cached, ascending."""
        return tuple(self._frames)

    @property
    def num_layers(self) -> int:
        """Global blocks holding keys: blocks 0..num_layers-1 (fewer than ``num_blocks`` after early exit)."""
        return len(self._keys)

    @property
    def batch_size(self) -> int | None:
        """Sequences streamed together through this cache, fixed by the first frame (None before)."""
        return self._batch_size

    @property
    def tokens_per_frame(self) -> int | None:
        """Tokens of each frame (special tokens included), fixed by the first frame (None before)."""
        return self._tokens_per_frame

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for block in (*self._keys, *self._values) for t in block)

    def __len__(self) -> int:
        """Frames currently cached."""
        return len(self._frames)

    def __repr__(self) -> str:
        return (
            f"KVCache(window={self.window}, frames_seen={self._frames_seen}, cached={len(self._frames)}, "
            f"layers={self.num_layers}/{self.num_blocks}, batch_size={self._batch_size})"
        )

    def clear(self) -> None:
        """Forget every frame: the next call is frame 0 of a new stream (of any batch size)."""
        self._keys, self._values, self._frames = [], [], []
        self._frames_seen = 0
        self._batch_size = self._tokens_per_frame = None

    def check_frame(self, batch_size: int, tokens_per_frame: int, blocks: int) -> None:
        """Raise unless a frame of this shape, running ``blocks`` global blocks, may join the stream.

        Parameters
        ----------
        batch_size : int
            Sequences in the call.
        tokens_per_frame : int
            Tokens of the new frame.
        blocks : int
            Global blocks the call runs (after early exit).

        Raises
        ------
        ValueError
            When the batch size or the tokens per frame differ from the stream's, when
            ``blocks`` exceeds what the cache can serve, or when earlier frames stopped before
            ``blocks`` (their keys for the deeper blocks were never computed).
        """
        if blocks > self.num_blocks:
            raise ValueError(f"the call runs {blocks} global blocks but the cache was made for {self.num_blocks}")
        if self._frames_seen == 0:
            return
        if batch_size != self._batch_size:
            raise ValueError(
                f"this KV cache streams {self._batch_size} sequence(s) but the frame has batch size "
                f"{batch_size}; a cache serves one batch of sequences: use new_kv_cache() for another"
            )
        if tokens_per_frame != self._tokens_per_frame:
            raise ValueError(
                f"this KV cache holds frames of {self._tokens_per_frame} tokens but the new frame has "
                f"{tokens_per_frame}: every frame of a stream must have the same image size"
            )
        if blocks > len(self._keys):
            raise ValueError(
                f"the call needs global blocks 0..{blocks - 1} but earlier frames of this stream stopped "
                f"after block {len(self._keys) - 1} (early exit); select the deepest layer from the first "
                "frame on, or start a new cache"
            )

    def past(self, block: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cached raw keys and values of global block ``block``, one tensor per cached frame.

        Returns
        -------
        keys, values : list of Tensor
            ``[B, heads, N, head_dim]`` each, in frame order; empty lists before the first frame.
        """
        if block >= len(self._keys):
            return [], []
        return list(self._keys[block]), list(self._values[block])

    def append_frame(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Record one new frame's raw keys and values of global blocks ``0..len(keys)-1``, then apply the window.

        The aggregator calls this once per frame, after every block ran, so a call that fails
        halfway leaves the cache as it was. Blocks deeper than ``len(keys)`` are dropped: their
        keys would lack this frame.

        Parameters
        ----------
        keys, values : sequence of Tensor
            Per block, ``[B, heads, N, head_dim]`` as the qkv projection produced them.
        """
        if len(keys) != len(values) or not keys:
            raise ValueError("append_frame needs the keys and the values of the same, non-empty, blocks")
        if len(keys) > self.num_blocks:
            raise ValueError(f"got keys of {len(keys)} blocks but the cache was made for {self.num_blocks}")
        if self._frames_seen and len(keys) > len(self._keys):
            raise ValueError("a frame cannot add blocks that earlier frames of the stream did not run")
        batch, _, tokens, _ = keys[0].shape
        if self._frames_seen == 0:
            self._batch_size, self._tokens_per_frame = batch, tokens
            self._keys = [[] for _ in keys]
            self._values = [[] for _ in values]
        del self._keys[len(keys) :], self._values[len(values) :]
        # The projection's output is one [B, N, 3C] tensor: contiguous copies let the queries go.
        for block, (key, value) in enumerate(zip(keys, values, strict=True)):
            self._keys[block].append(key.contiguous())
            self._values[block].append(value.contiguous())
        self._frames.append(self._frames_seen)
        self._frames_seen += 1
        kept = _kept_after(self._frames, self.window)
        if len(kept) != len(self._frames):
            positions = [self._frames.index(frame) for frame in kept]
            self._keys = [[block[i] for i in positions] for block in self._keys]
            self._values = [[block[i] for i in positions] for block in self._values]
            self._frames = kept
