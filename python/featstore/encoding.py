"""Running an encoder on sources: what precompute and the training side's live encoding share.

:func:`decode_source` reads one source the way the encoder wants it (in a DataLoader worker) and
takes its stamp *before* reading, so a writer can refuse features of a source edited meanwhile;
:func:`encode_batch` runs one batch under ``inference_mode`` and checks what came back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from featstore.encoders.base import Capabilities, Encoder, capabilities, check_outputs
from featstore.inputs import InputValue, Stamp, as_read, stamp_of


def source_stamp(path: str) -> Stamp:
    """``(size, mtime_ns, ino, ctime_ns)`` of a source, as the writer compares it."""
    return stamp_of(path)


def decode_source(encoder: Encoder, path: str, caps: Capabilities | None = None
                  ) -> tuple[Any, str | None, Stamp | None]:
    """``(decoded or None, error or None, the source's stamp before reading)`` for one source:
    a uint8 ``[3, H, W]`` image, or whatever ``preprocess`` gives an encoder with
    ``encode_items`` (a caption). A bad source is an error string, never an exception. A loop
    over many sources passes the encoder's ``caps`` (asking costs more than a tiny source's
    decode)."""
    try:
        stamp = source_stamp(path)
        decoded = encoder.preprocess(path)
    except Exception as exc:  # a bad image is recorded, never fatal
        return None, f"{type(exc).__name__}: {exc}", None
    if (caps or capabilities(encoder)).items:
        return decoded, None, stamp
    if not isinstance(decoded, torch.Tensor):
        return None, f"preprocess returned {type(decoded).__name__}, not a [3, H, W] tensor", None
    if decoded.dim() != 3:
        return None, f"preprocess returned a tensor of shape {list(decoded.shape)}, not [3, H, W]", None
    return decoded, None, stamp


def read_inputs(encoder: Encoder, rel: str, root: str, caps: Capabilities | None = None
                ) -> tuple[dict[str, InputValue] | None, str | None]:
    """``(inputs, error)``: the encoder's other inputs of source ``rel`` (a caption file, a control
    image, a caption's text), each file stamped now. Call it *before* the encoder reads them
    (``preprocess``): the write then refuses features of a file edited in between. ``(None,
    None)`` for an encoder without ``inputs``; a missing caption is an error string."""
    if not (caps or capabilities(encoder)).inputs:
        return None, None
    try:
        return as_read(encoder.inputs(rel, os.path.join(root, rel)), root), None  # type: ignore[attr-defined]
    except Exception as exc:  # a missing caption is recorded, never fatal
        return None, f"{type(exc).__name__}: {exc}"


def encode_batch(enc: Encoder, dev: torch.device, batch: torch.Tensor | list[Any]
                 ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The encoder's outputs for one batch, checked and on the CPU: ``batch`` is uint8 images
    ``[B, 3, H, W]``, frame sets ``[B, S, 3, H, W]``, or a list of items for ``encode_items``
    (whose outputs may be lists of one tensor per item).
    Runs under ``inference_mode``: the outputs are inference tensors (clone them before autograd
    sees them)."""
    with torch.inference_mode():
        if isinstance(batch, list):
            raw = enc.encode_items(batch)  # type: ignore[attr-defined]
        elif batch.dim() == 5:  # frame sets [B, S, 3, H, W]
            raw = enc.encode_sets(batch.to(dev, non_blocking=True).float().div_(255))  # type: ignore[attr-defined]
        else:
            raw = enc.encode(batch.to(dev, non_blocking=True).float().div_(255))
        outputs = check_outputs(raw, len(batch), enc.name)
        return {k: [t.detach().to("cpu") for t in v] if isinstance(v, list) else v.detach().to("cpu")
                for k, v in outputs.items()}


def encode_histories(enc: Encoder, dev: torch.device, batch: torch.Tensor,
                     lengths: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The encoder's history outputs for one batch of lists, checked and on the CPU: ``batch`` is
    uint8 ``[B, T, 3, H, W]`` (``B`` lists of ``T`` frames, oldest first); every output is
    ``[B, T, ...]``, index ``k`` the prefix of length ``k + 1``. ``lengths``: the prefix lengths
    read (passed on when the encoder's ``encode_history`` takes them). Runs under
    ``inference_mode``."""
    caps = capabilities(enc)
    with torch.inference_mode():
        floats = batch.to(dev, non_blocking=True).float().div_(255)
        if caps.history_lengths and lengths is not None:
            raw = enc.encode_history(floats, lengths=lengths)  # type: ignore[attr-defined]
        else:
            raw = enc.encode_history(floats)  # type: ignore[attr-defined]
        outputs = check_outputs(raw, len(batch), enc.name)
        for k, v in outputs.items():
            if v.dim() < 2 or v.shape[1] != batch.shape[1]:
                raise TypeError(f"encoder {enc.name!r}: encode_history output {k!r} must be [B, T, ...] with "
                                f"T={batch.shape[1]}, got {tuple(v.shape)}")
        return {k: v.detach().to("cpu") for k, v in outputs.items()}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or other device) out-of-memory error: the caller halves its batch."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
