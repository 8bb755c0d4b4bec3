"""Packed entries as the rest of featstore sees them: where a checked entry's bytes are (its own
file, or a range of a pack), and the sizes ``featstore pack`` takes (docs/design.md, "Packs")."""

from __future__ import annotations

import os
import re
from typing import Protocol

#: A pack is sealed once it holds this many bytes (``featstore pack --target-size``).
DEFAULT_TARGET_SIZE = 2 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


class Located(Protocol):
    """What a check says of where its entry is (``featstore._core.Check``)."""

    @property
    def entry(self) -> str | os.PathLike[str]: ...

    @property
    def packed(self) -> tuple[str | os.PathLike[str], int, int] | None: ...


def entry_location(check: Located) -> tuple[str, tuple[int, int] | None]:
    """``(file, span)`` of a checked entry: its own file and None, or the pack holding it and the
    entry's ``(offset, length)`` there, as :func:`featstore._core.read_header` and
    :func:`featstore._core.read_entry` take them."""
    if check.packed is not None:
        pack, offset, length = check.packed
        return os.fspath(pack), (offset, length)
    return os.fspath(check.entry), None


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GiB``, ``512M`` or ``1000000`` (binary units: ``G`` and ``GB``
    are 2**30 too). Raises ValueError, naming the form expected."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: write a positive number of bytes, or one with a unit such as "
                         "512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])
