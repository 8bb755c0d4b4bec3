"""The shapes of a feature's entries, summed up: for each tensor name, its dtype and its shape
with ``None`` in every axis whose length differs between entries.

Precompute records this summary in the manifest (``"tensors"``), so a training dataset knows
when it is built which tensors must be padded to batch them (VGGT's "crop" preprocessing gives
images of other aspect ratios other token counts), and which cannot be batched at all, instead
of failing in the middle of an epoch. Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: A tensor's summary: its dtype name and its shape (``None`` for an axis that varies between
#: entries; a shape of ``None``: the tensors do not even have the same number of axes).
Summary = tuple[str, "tuple[int | None, ...] | None"]
Shapes = dict[str, Summary]

#: Marks a tensor whose dtype differs between entries.
MIXED_DTYPES = "mixed"


def observe(shapes: Shapes, tensors: Iterable[tuple[str, str, Sequence[int]]]) -> bool:
    """Adds one entry's ``(name, dtype, shape)`` triples to ``shapes``; True when that changed it."""
    return merge(shapes, {name: (dtype, tuple(int(n) for n in shape)) for name, dtype, shape in tensors})


def merge(into: Shapes, other: Mapping[str, Summary]) -> bool:
    """Adds every summary of ``other`` to ``into``; True when that changed it."""
    changed = False
    for name, summary in other.items():
        old = into.get(name)
        new = summary if old is None else _join(old, summary)
        if new != old:
            into[name] = new
            changed = True
    return changed


def _join(a: Summary, b: Summary) -> Summary:
    dtype = a[0] if a[0] == b[0] else MIXED_DTYPES
    if a[1] is None or b[1] is None or len(a[1]) != len(b[1]):
        return dtype, None
    return dtype, tuple(x if x == y else None for x, y in zip(a[1], b[1], strict=True))


def padded_names(shapes: Mapping[str, Summary]) -> list[str]:
    """The tensors whose entries differ in the length of their first axis only: a batch pads
    them along it (with a mask)."""
    return sorted(n for n, (_, shape) in shapes.items()
                  if shape is not None and shape and shape[0] is None and None not in shape[1:])


def unbatchable(shapes: Mapping[str, Summary], padded: Iterable[str]) -> dict[str, str]:
    """``{name: why}`` for the tensors that cannot be batched: shapes that differ in an axis
    other than the first, in their number of axes, in the first axis without ``padded`` naming
    them, or dtypes that differ."""
    padded = set(padded)
    why: dict[str, str] = {}
    for name, (dtype, shape) in shapes.items():
        if dtype == MIXED_DTYPES:
            why[name] = "its dtype differs between entries"
        elif shape is None:
            why[name] = "its number of axes differs between entries"
        elif None in shape[1:]:
            why[name] = f"its shape {describe_shape(shape)} differs between entries beyond the first axis"
        elif shape and shape[0] is None and name not in padded:
            why[name] = f"its first axis differs between entries ({describe_shape(shape)}) and it is not padded"
    return why


def describe_shape(shape: Sequence[int | None] | None) -> str:
    """``[*, 2048]``: a shape with ``*`` for the axes that vary."""
    if shape is None:
        return "[varying axes]"
    return "[" + ", ".join("*" if n is None else str(n) for n in shape) + "]"


def to_json(shapes: Mapping[str, Summary]) -> dict[str, Any]:
    """The manifest's ``"tensors"`` field: ``{name: {"dtype": ..., "shape": [..., null, ...]}}``."""
    return {n: {"dtype": d, "shape": None if s is None else list(s)} for n, (d, s) in sorted(shapes.items())}


def from_json(value: Any) -> Shapes | None:
    """Reads a ``"tensors"`` field; None when there is none or it is not one featstore wrote."""
    if not isinstance(value, dict):
        return None
    shapes: Shapes = {}
    for name, item in value.items():
        if not isinstance(item, dict) or not isinstance(item.get("dtype"), str):
            return None
        shape = item.get("shape")
        if shape is not None and (not isinstance(shape, list)
                                  or not all(n is None or (isinstance(n, int) and n >= 0) for n in shape)):
            return None
        shapes[name] = (item["dtype"], None if shape is None else tuple(shape))
    return shapes


def read_file(path: str) -> Shapes:
    """The summary a precompute process saved (:func:`save_file`); empty when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return from_json(json.load(f)) or {}
    except (OSError, ValueError):
        return {}


def save_file(path: str, shapes: Mapping[str, Summary]) -> None:
    """Saves a process's summary atomically (a killed run leaves the last whole one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_json(shapes), f)
    os.replace(tmp, path)
