"""How featstore writes numbers, times and lists of failures in its reports and messages."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``"512 B"``, ``"1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def count(n: int, one: str, many: str | None = None) -> str:
    """``n`` and the noun in the right number: ``"1 file"``, ``"2 files"``, ``"1,000 entries"``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def error_lines(errors: Sequence[tuple[str, str]], what: str, what_many: str | None = None,
                limit: int = 10) -> list[str]:
    """The report lines of paths that could not be handled: a count, then the first ``limit``.
    ``what`` is said of one path, ``what_many`` of several (default: ``what`` as given)."""
    more = f" (first {limit}):" if len(errors) > limit else ":"
    said = what if len(errors) == 1 or what_many is None else what_many
    return [f"{len(errors):,} {said}{more}", *(f"  {p}: {why}" for p, why in errors[:limit])]


def timestamp(ns: int) -> str:
    """A local timestamp with nanoseconds (mtimes differ in the last digits after a touch)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9:09d}"


def age(seconds: float) -> str:
    """A duration in the unit a reader wants: ``"45 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def shown(base: str, path: str) -> str:
    """``path`` relative to ``base`` when inside it (shorter lines)."""
    rel = os.path.relpath(path, base) if base else path
    return path if rel.startswith("..") else rel
