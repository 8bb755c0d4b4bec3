"""Conversions between torch tensors and the Rust core (imported only where torch is needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# safetensors dtype names of the torch dtypes featstore stores.
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        TORCH_TO_SAFETENSORS[getattr(torch, _name)] = _code
SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}

RawTensor = tuple[str, str, list[int], int, int]


def to_raw(tensors: Mapping[str, Any]) -> tuple[list[RawTensor], list[torch.Tensor]]:
    """Describes tensors for the Rust writer without copying them.

    Returns ``(raw, keep)``: ``raw`` holds ``(name, dtype, shape, data_ptr, nbytes)`` of
    contiguous CPU tensors and ``keep`` those tensors, which the caller must hold until the Rust
    call returns (the pointers are only valid while they live).
    """
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError(f"expected a non-empty dict of name -> torch.Tensor, got {type(tensors).__name__}")
    raw: list[RawTensor] = []
    keep: list[torch.Tensor] = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        code = TORCH_TO_SAFETENSORS.get(t.dtype)
        if code is None:
            raise TypeError(f"{name!r}: dtype {t.dtype} cannot be stored; use one of "
                            f"{sorted(str(d) for d in TORCH_TO_SAFETENSORS)}")
        keep.append(t)
        raw.append((name, code, list(t.shape), t.data_ptr(), t.numel() * t.element_size()))
    return raw, keep


def rows_to_raw(outputs: Mapping[str, Any], n: int) -> tuple[list[list[RawTensor]], list[torch.Tensor]]:
    """Describes row ``i`` of each batch output (first axis ``n``) as item ``i``'s tensors, for
    the Rust writer: the batch is made contiguous on the CPU once, and each row is a pointer into
    it (no copy, no tensor object per row). Returns ``(rows, keep)`` as :func:`to_raw` does."""
    whole, keep = to_raw(outputs)
    rows: list[list[RawTensor]] = [[] for _ in range(n)]
    for name, code, shape, ptr, nbytes in whole:
        if not shape or shape[0] != n:
            raise ValueError(f"{name!r}: expected a batch of {n} rows, got shape {shape}")
        row = nbytes // n
        for i in range(n):
            rows[i].append((name, code, shape[1:], ptr + i * row, row))
    return rows, keep


def from_capsules(capsules: list[tuple[str, Any]], device: Any = None, dtype: Any = None) -> dict[str, torch.Tensor]:
    """Turns the core's DLPack capsules into tensors (zero-copy unless a device or dtype is asked)."""
    out = {name: torch.from_dlpack(cap) for name, cap in capsules}
    if device is not None or dtype is not None:
        out = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in out.items()}
    return out
