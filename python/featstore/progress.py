"""Progress on stderr, one mechanism for every command.

:func:`bar` is a tqdm bar that appears only when the work lasts over half a second;
:func:`run_with_progress` shows the count of a Rust call that releases the GIL; :func:`each` yields
items and advances a bar after each one's work. ``show=None``
means "when it takes a while", ``False`` silences, ``True`` forces. :func:`counter` is what a long
run (precompute) reports through: a bar on a terminal, else :class:`LogLines`, a line at a steady
interval that a log file (nohup, Slurm) shows while the run goes on.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from featstore import _core

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

# Short jobs print nothing: a bar appears only after this many seconds.
_DELAY_S = 0.5


def on_terminal() -> bool:
    """Whether stderr is a terminal: off one (a log file, a pipe, CI) featstore writes whole lines
    only, never a bar redrawn with carriage returns."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def bar(total: int | None, desc: str, *, show: bool | None = None, unit: str = "files", **options: Any) -> tqdm:
    """A tqdm progress bar on stderr (tqdm is imported here, on first use, to keep start-up fast).
    ``show=None``: only on a terminal, and only once the work has lasted half a second."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, leave=False,
                disable=show is False or (show is None and not on_terminal()), delay=0 if show else _DELAY_S,
                **options)


def run_with_progress(work: Callable[[_core.Progress], T], desc: str, total: int | None = None,
                      show: bool | None = None, unit: str = "files") -> T:
    """Runs ``work(progress)`` (a Rust call that releases the GIL) while a thread shows its count
    on stderr. The bar appears only if the work takes longer than half a second, so small trees
    print nothing; ``show=False`` silences it."""
    progress = _core.Progress()
    if show is False or (show is None and not on_terminal()):
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


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s"


class LogLines:
    """Progress as whole lines, one every ``every`` seconds and one at the end, each flushed: what
    a log file shows of a long run (``desc: done/total unit (percent), rate, ETA, postfix``).

    It has the part of tqdm's interface a run uses (``update``, ``set_postfix``, ``close``, a
    context manager), so the run does not care which it got. A thread writes the lines, so they
    come at a steady interval even when one batch takes longer than ``every``.
    """

    def __init__(self, total: int, desc: str, *, every: float, unit: str = "img", file: TextIO | None = None,
                 duration: Callable[[float], str] = _seconds) -> None:
        self.total, self.desc, self.every, self.unit, self._age = total, desc, every, unit, duration
        self.n = 0
        self._file = file
        self._postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="featstore-progress-lines")
        self._thread.start()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        with self._lock:
            self._postfix = dict(values)

    def line(self) -> str:
        """The current line."""
        with self._lock:
            n, postfix = self.n, dict(self._postfix)
        seconds = time.monotonic() - self._start
        rate = n / seconds if seconds > 0 else 0.0
        parts = [f"{self.desc}: {n:,}/{self.total:,} {self.unit}"
                 + (f" ({100 * n / self.total:.0f}%)" if self.total else ""),
                 f"{rate:.2f} {self.unit}/s", f"elapsed {self._age(seconds)}"]
        if n < self.total:
            parts.append(f"ETA {self._age((self.total - n) / rate)}" if rate > 0 else "ETA unknown")
        parts.extend(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in postfix.items())
        return ", ".join(parts)

    def _write(self) -> None:
        out = self._file or sys.stderr
        print(self.line(), file=out, flush=True)

    def _tick(self) -> None:
        while not self._done.wait(self.every):
            self._write()

    def close(self) -> None:
        """Stops the thread and writes the last line (once)."""
        if self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        self._write()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counter(total: int, desc: str, *, show: bool | None, every: float, unit: str = "img",
            duration: Callable[[float], str] = _seconds, file: TextIO | None = None) -> Any:
    """How a long run reports its progress on stderr (or ``file``): a tqdm bar when ``show`` is
    True (a terminal), :class:`LogLines` every ``every`` seconds when ``show`` is None (stderr is a
    file or a pipe; ``every`` 0: nothing), nothing when ``show`` is False."""
    from tqdm import tqdm

    if show is None and every > 0:
        return LogLines(total, desc, every=every, unit=unit, duration=duration, file=file)
    return tqdm(total=total, desc=desc, unit=unit, file=file or sys.stderr, disable=not show, dynamic_ncols=True)
