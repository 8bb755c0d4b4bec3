"""Inference helpers: mixed precision for the aggregator, float32 heads, no autograd.

VGGT's aggregator runs well under bfloat16 autocast (float16 on GPUs without bf16 support); the
heads are always evaluated in float32 (:class:`VGGT` disables autocast around them). Everything
here runs under :func:`torch.inference_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from featstore.models.vggt.aggregator import (
    Aggregator,
    LayerSelection,
    LayerSelectView,
    normalize_layer_selection,
)
from featstore.models.vggt.model import VGGT
from featstore.models.vggt.preprocess import to_unit_float

__all__ = ["AmpDtype", "autocast_dtype", "aggregator_autocast", "extract_layers", "run_vggt"]

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
