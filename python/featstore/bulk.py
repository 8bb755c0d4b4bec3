"""Building a million small objects: the cyclic garbage collector paused meanwhile.

Planning a precompute makes a few objects per source (a work item, its tuple of paths, a state)
and no reference cycles. Each of CPython's collections walks every tracked object still alive,
and allocating a million of them triggers collections all along: at a million sources they took
about a third of a no-op rerun. Reference counting still frees everything as usual; only the
search for cycles waits until the bulk work is done.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector disabled for the block (left as it was found after it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

