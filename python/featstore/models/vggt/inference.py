"""Inference helpers: mixed precision for the aggregator, float32 heads, no autograd.

VGGT's aggregator runs well under bfloat16 autocast (float16 on GPUs without bf16 support); the
heads are always evaluated in float32 (:class:`VGGT` disables autocast around them). Everything
here runs under :func:`torch.inference_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from featstore.models.vggt.aggregator import (
    Aggregator,
    LayerSelection,
    LayerSelectView,
    normalize_layer_selection,
)
from featstore.models.vggt.kv_cache import KVCache, normalize_window
from featstore.models.vggt.model import VGGT
from featstore.models.vggt.preprocess import to_unit_float

__all__ = [
    "AmpDtype",
    "autocast_dtype",
    "aggregator_autocast",
    "extract_layers",
    "run_vggt",
    "stream_history",
]

AmpDtype = Literal["auto"] | torch.dtype | None
"""``"auto"`` (bf16 where supported, else fp16, on CUDA only), an explicit dtype, or None (off)."""


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype VGGT's aggregator should use on ``device``.

    Parameters
    ----------
    device : torch.device or str
        The device the model runs on.

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16`` on CUDA GPUs of compute capability 8.0 or newer (Ampere+),
        ``torch.float16`` on older CUDA GPUs, ``None`` (no autocast) elsewhere: CPU autocast is
        slower than float32 on most CPUs and changes the numbers.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


@contextlib.contextmanager
def aggregator_autocast(device: torch.device | str, dtype: AmpDtype = "auto") -> Iterator[torch.dtype | None]:
    """Autocast context for the aggregator on ``device``.

    Parameters
    ----------
    device : torch.device or str
        The device the model runs on.
    dtype : "auto", torch.dtype, or None
        ``"auto"`` picks :func:`autocast_dtype`; ``None`` disables autocast.

    Yields
    ------
    torch.dtype or None
        The dtype in effect.
    """
    device = torch.device(device)
    if isinstance(dtype, str) and dtype != "auto":
        raise ValueError(f"amp dtype must be 'auto', a torch.dtype or None, got {dtype!r}")
    chosen = autocast_dtype(device) if isinstance(dtype, str) else dtype
    if chosen is None or chosen == torch.float32:
        yield None
        return
    with torch.autocast(device_type=device.type, dtype=chosen):
        yield chosen


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prepare_images(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Move to the model's device first and convert uint8 there, so the host sends 1 byte per value."""
    weight = next(model.parameters())
    images = to_unit_float(images.to(weight.device, non_blocking=True), dtype=weight.dtype)
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5:
        raise ValueError(
            f"expected images of shape [S, 3, H, W] or [B, S, 3, H, W], got {tuple(images.shape)}"
        )
    return images


def run_vggt(
    model: VGGT,
    images: torch.Tensor,
    *,
    amp_dtype: AmpDtype = "auto",
    frames_chunk_size: int | None = 8,
) -> dict[str, Any]:
    """Run the whole model for inference.

    Parameters
    ----------
    model : VGGT
        The model (put it in eval mode; :func:`load_vggt` does).
    images : Tensor
        ``[S, 3, H, W]`` or ``[B, S, 3, H, W]``, float in [0, 1] or uint8 (converted on the
        model's device).
    amp_dtype : "auto", torch.dtype, or None
        Autocast dtype of the aggregator (see :func:`aggregator_autocast`); heads run in float32.
    frames_chunk_size : int or None
        Frames the DPT heads process at once.

    Returns
    -------
    dict
        :meth:`VGGT.forward`'s predictions.
    """
    device = _model_device(model)
    with torch.inference_mode():
        images = _prepare_images(images, model)
        with aggregator_autocast(device, amp_dtype):
            return model(images, frames_chunk_size=frames_chunk_size)


def extract_layers(
    model: VGGT | Aggregator,
    images: torch.Tensor,
    layers: LayerSelection,
    *,
    amp_dtype: AmpDtype = "auto",
) -> LayerSelectView:
    """Run only the aggregator and keep ``layers``, stopping after the deepest one.

    This is what feature caches need: no heads run, and layers after the deepest selected one
    are never computed.

    Parameters
    ----------
    model : VGGT or Aggregator
        The model or its aggregator.
    images : Tensor
        ``[S, 3, H, W]`` or ``[B, S, 3, H, W]``, float in [0, 1] or uint8.
    layers : int or iterable of int
        Absolute layer numbers (negatives count from the end).
    amp_dtype : "auto", torch.dtype, or None
        Autocast dtype (see :func:`aggregator_autocast`).

    Returns
    -------
    LayerSelectView
        The selected layers, each ``[B, S, N, 2C]``; patch tokens start at
        ``aggregator.patch_start_idx``.
    """
    aggregator = model.aggregator if isinstance(model, VGGT) else model
    selection = normalize_layer_selection(layers, aggregator.depth)
    if selection is None:
        raise ValueError("extract_layers needs a layer selection; call the aggregator itself for all layers")
    device = _model_device(aggregator)
    with torch.inference_mode():
        images = _prepare_images(images, aggregator)
        with aggregator_autocast(device, amp_dtype):
            view, _ = aggregator.forward_layers(images, selection)
    return view


def stream_history(
    model: VGGT | Aggregator,
    images: torch.Tensor,
    window: Sequence[int] | None = None,
    *,
    layers: LayerSelection,
    tokens: Literal["patch", "all"] = "patch",
    amp_dtype: AmpDtype = "auto",
    kv_cache: KVCache | None = None,
) -> LayerSelectView:
    """Stream histories causally in one pass: frame ``k``'s layers as computed from frames ``0..k``.

    Each frame is fed once through a key/value cache (``T`` frame passes for ``T`` frames), so
    the last-frame features of every prefix of a history (what a JanusVLN-style sample of steps
    ``1..k`` uses) come out of a single pass instead of ``T(T+1)/2`` frame passes.

    Parameters
    ----------
    model : VGGT or Aggregator
        The model or its aggregator.
    images : Tensor
        ``[B, T, 3, H, W]`` (or ``[T, 3, H, W]``, then ``B = 1``): ``B`` histories of ``T``
        frames, oldest first, float in [0, 1] or uint8. To feed a history last to first, flip it.
    window : (int, int) or None
        ``(start, recent)`` window of a new cache (see :meth:`Aggregator.new_kv_cache`).
    layers : int or iterable of int
        Absolute layer numbers to keep (negatives count from the end); nothing after the
        deepest is computed.
    tokens : "patch" or "all"
        Keep only the patch tokens (what JanusVLN uses), or every token.
    amp_dtype : "auto", torch.dtype, or None
        Autocast dtype (see :func:`aggregator_autocast`).
    kv_cache : KVCache, optional
        Continue this stream (its frames come before ``images``; its window applies) instead
        of starting a new one. Its ``frames_seen`` counts the frame passes.

    Returns
    -------
    LayerSelectView
        The kept layers, each ``[B, T, P, 2C]`` (``P`` patch tokens, or all ``N`` tokens with
        ``tokens="all"``); index ``k`` on the frame axis holds frame ``k`` given frames ``0..k``.
    """
    if tokens not in ("patch", "all"):
        raise ValueError(f"tokens must be 'patch' or 'all', got {tokens!r}")
    aggregator = model.aggregator if isinstance(model, VGGT) else model
    selection = normalize_layer_selection(layers, aggregator.depth)
    if selection is None:
        raise ValueError("stream_history needs a layer selection (e.g. layers=22 for JanusVLN)")
    if kv_cache is None:
        kv_cache = aggregator.new_kv_cache(window)
    elif window is not None and normalize_window(window) != kv_cache.window:
        raise ValueError(f"window={window!r} differs from the given cache's window {kv_cache.window}")
    start = aggregator.patch_start_idx if tokens == "patch" else 0
    device = _model_device(aggregator)
    kept: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        images = _prepare_images(images, aggregator)
        batch, frames = images.shape[:2]
        with aggregator_autocast(device, amp_dtype):
            for frame in range(frames):
                view, _ = aggregator.forward_layers(images[:, frame : frame + 1], selection, kv_cache=kv_cache)
                for layer, output in view.items():
                    if layer not in kept:
                        kept[layer] = output.new_empty(batch, frames, output.shape[2] - start, output.shape[3])
                    kept[layer][:, frame] = output[:, 0, start:]
    return LayerSelectView(aggregator.depth, kept)
