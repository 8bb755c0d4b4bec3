"""torch, and featstore's torch helpers (:mod:`featstore._torch`), imported on first use: opening
a store (and ``import featstore``) stays fast, and commands that never touch a tensor never load
torch. Each loader keeps what it imported, so a hot path pays a global lookup, not an import."""

from __future__ import annotations

from typing import Any

_HELPERS: Any = None
_FROM_DLPACK: Any = None


def helpers() -> Any:
    """:mod:`featstore._torch` (it imports torch)."""
    global _HELPERS
    if _HELPERS is None:
        from featstore import _torch

        _HELPERS = _torch
    return _HELPERS


def from_dlpack() -> Any:
    """``torch.from_dlpack``: what a read turns each capsule into a tensor with."""
    global _FROM_DLPACK
    if _FROM_DLPACK is None:
        import torch

        _FROM_DLPACK = torch.from_dlpack
    return _FROM_DLPACK
