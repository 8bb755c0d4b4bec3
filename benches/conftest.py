"""Benchmark support: sizes, and a ratio table printed at the end of the run.

``FEATSTORE_BENCH_FULL=1`` runs the sizes docs/benchmarks.md reports (2,000 images of about
300 KB, 1 MiB and 11 MiB features, 200,000 files to scan); the default ``small`` keeps CI's single
``--benchmark-disable`` pass to seconds so the benchmarks cannot rot.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

FULL = os.environ.get("FEATSTORE_BENCH_FULL") == "1"

# group -> [(name, seconds per item)] in the order measured; the first entry is featstore's.
RESULTS: dict[str, list[tuple[str, float]]] = defaultdict(list)
# group -> what its first entry is, where it is not featstore against another scheme (packs
# against files of their own): the ratio lines name it.
SUBJECTS: dict[str, str] = {}


class Indices:
    """The base dataset: nothing but the index (the cached features are the sample)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i}


def record(benchmark, group: str, name: str, items: int) -> None:
    """Remembers the median time per item of a finished pytest-benchmark run."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return
    RESULTS[group].append((name, stats.stats.median / items))


def one_core_memcpy(nbytes: int, repeats: int = 5) -> float:
    """Seconds one core takes to copy ``nbytes`` between two touched buffers (the floor of any
    approach that hands a batch over in one tensor)."""
    import time

    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)  # touched: no first-fault cost in the timing
    dst = torch.zeros_like(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        return (time.perf_counter() - t0) / repeats
    finally:
        torch.set_num_threads(threads)


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:9.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:9.2f} ms"
    return f"{seconds:9.2f} s "


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    w = terminalreporter
    w.section(f"featstore vs the schemes it replaces ({'full' if FULL else 'small'} sizes, median per item)")
    for group, rows in RESULTS.items():
        base_name, base = rows[0]
        subject = SUBJECTS.get(group, "featstore")
        w.write_line(f"{group}")
        for name, t in rows:
            if name == base_name:
                w.write_line(f"  {name:44} {_fmt(t)}")
            elif t >= base:
                w.write_line(f"  {name:44} {_fmt(t)}   {subject} is {t / base:8.1f}x faster")
            else:
                w.write_line(f"  {name:44} {_fmt(t)}   {subject} takes {base / t:6.2f}x its time")


@pytest.fixture(scope="session")
def full() -> bool:
    return FULL
