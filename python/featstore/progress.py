"""Progress on stderr, one mechanism for every command.

:func:`bar` is a tqdm bar that appears only when the work lasts over half a second;
:func:`run_with_progress` shows the count of a Rust call that releases the GIL; :func:`each` yields
items and advances a bar after each one's work. ``show=None``
means "when it takes a while", ``False`` silences, ``True`` forces.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from featstore import _core

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

# Short jobs print nothing: a bar appears only after this many seconds.
_DELAY_S = 0.5


def bar(total: int | None, desc: str, *, show: bool | None = None, unit: str = "files", **options: Any) -> tqdm:
    """A tqdm progress bar on stderr (tqdm is imported here, on first use, to keep start-up fast)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, leave=False,
                disable=show is False, delay=0 if show else _DELAY_S, **options)


def run_with_progress(work: Callable[[_core.Progress], T], desc: str, total: int | None = None,
                      show: bool | None = None, unit: str = "files") -> T:
    """Runs ``work(progress)`` (a Rust call that releases the GIL) while a thread shows its count
    on stderr. The bar appears only if the work takes longer than half a second, so small trees
    print nothing; ``show=False`` silences it."""
    progress = _core.Progress()
    if show is False:
        return work(progress)
    done = threading.Event()

    def render() -> None:
        if done.wait(_DELAY_S):
            return
        with bar(total, desc, show=True, unit=unit) as b:
            while not done.wait(0.1):
                b.update(progress.count - b.n)
            b.update(progress.count - b.n)

    thread = threading.Thread(target=render, daemon=True)
    thread.start()
    try:
        return work(progress)
    finally:
        done.set()
        thread.join()


def each(items: Sequence[T], desc: str, show: bool | None, unit: str) -> Iterator[T]:
    """Yields ``items``, advancing a bar on stderr after each one's work is done."""
    with bar(len(items), desc, show=show, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)
