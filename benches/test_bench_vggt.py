"""The layer-selecting VGGT aggregator against the full one (same weights, same run).

What is compared, for the full aggregator (every layer computed and stored) and for selections:
``keep 4`` (layers 4, 11, 17, 23: what the DPT heads read; every layer still runs), ``exit 11``
(about half the work) and ``exit 22`` (JanusVLN's layer):

- equality of the selected layers with the full aggregator's (bit for bit);
- forward time; peak memory above the weights (CUDA peak allocation on a GPU, peak RSS from
  ``/proc/self/status`` otherwise); bytes of the stored layer outputs;
- ratios against the full aggregator, printed as a table in the same run.

The small configuration (24 layers, width 64) runs in seconds, also in CI with
``--benchmark-disable``. The default configuration (VGGT-1B's aggregator, 518x518 frames) is
opt-in: ``FEATSTORE_BENCH_FULL=1``; ``FEATSTORE_BENCH_FRAMES=1,2,4,8`` picks the sequence lengths
(default 1,2,4,8 on CUDA, 1 on CPU) and ``FEATSTORE_BENCH_REPEATS`` the timed runs per variant
(default 3 on CUDA, 1 on CPU) and ``FEATSTORE_BENCH_THREADS`` the torch CPU threads. Run with
``-s`` to see the tables::

    FEATSTORE_BENCH_FULL=1 pytest benches/test_bench_vggt.py -s
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from featstore.models.vggt import Aggregator, LayerSelectView

RUN_FULL = os.environ.get("FEATSTORE_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

VARIANTS: dict[str, tuple[int, ...] | None] = {
    "full": None,
    "keep 4 (4,11,17,23)": (4, 11, 17, 23),
    "exit 11": (11,),
    "exit 22": (22,),
}

SMALL = {
    "img_size": 112,
    "patch_size": 14,
    "embed_dim": 64,
    "depth": 24,
    "num_heads": 4,
    "patch_embed": "conv",
}
SMALL_FRAMES, SMALL_SIDE = 4, 112
DEFAULT: dict[str, Any] = {}  # VGGT-1B's aggregator: DINOv2 ViT-L/14 patch embed, width 1024, 24 layers
DEFAULT_SIDE = 518


def _default_frames() -> list[int]:
    spec = os.environ.get("FEATSTORE_BENCH_FRAMES", "1,2,4,8" if DEVICE.type == "cuda" else "1")
    return [int(n) for n in spec.split(",") if n.strip()]


# --- memory measurement ----------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        # glibc keeps freed heap pages resident; without a trim the next run reuses them and its
        # RSS peak would look smaller than it is.
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _peak_memory() -> Iterator[dict[str, int]]:
    """Measure the peak memory above the starting point while the block runs (bytes, -1 if unknown)."""
    result = {"peak": -1}
    _release_free_memory()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        yield result
        torch.cuda.synchronize(DEVICE)
        result["peak"] = torch.cuda.max_memory_allocated(DEVICE) - base
        return
    try:
        base = _status_bytes("VmRSS")
        # Writing 5 resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, RuntimeError):
        yield result
        return
    yield result
    result["peak"] = _status_bytes("VmHWM") - base


# --- the comparison -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One variant's numbers."""

    name: str
    layers_run: int
    stored_layers: int
    stored_bytes: int
    seconds: float
    cpu_seconds: float
    peak_bytes: int
    equal: bool | None
    expected_time: float


def _stored(output: list[torch.Tensor] | LayerSelectView) -> tuple[int, int]:
    if isinstance(output, LayerSelectView):
        return len(output.layers), output.nbytes
    return len(output), sum(t.numel() * t.element_size() for t in output)


def _forward(aggregator: Aggregator, images: torch.Tensor, selection: tuple[int, ...] | None):
    aggregator.selected_layer_idx = selection
    with torch.inference_mode():
        output, _ = aggregator(images)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return output


def _compare(aggregator: Aggregator, images: torch.Tensor, repeats: int) -> list[Measurement]:
    """Measure every variant ``repeats`` times, round-robin so that load changes hit all alike."""
    # Warm-up (kernels, allocator) on one small frame: a full-size one would cost a whole forward.
    side = 8 * aggregator.patch_size
    _forward(aggregator, images[:, :1, :, :side, :side], None)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peaks: dict[str, list[int]] = {name: [] for name in VARIANTS}
    stored: dict[str, tuple[int, int]] = {}
    equal: dict[str, bool | None] = {}
    full: list[torch.Tensor] | None = None
    for _ in range(repeats):
        for name, selection in VARIANTS.items():
            with _peak_memory() as peak:
                start, cpu_start = time.perf_counter(), time.process_time()
                output = _forward(aggregator, images, selection)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
            peaks[name].append(peak["peak"])
            stored[name] = _stored(output)
            if selection is None:
                full = full if full is not None else output  # type: ignore[assignment]
                equal[name] = None
            elif name not in equal:
                assert full is not None
                equal[name] = all(torch.equal(output[layer], full[layer]) for layer in selection)
            del output
    del full
    _release_free_memory()
    # Work model: every transformer block costs the same (the DINOv2 patch embed's blocks have the
    # aggregator's width and token count; a conv patch embed costs next to nothing).
    embed_blocks = len(getattr(aggregator.patch_embed, "blocks", ()))

    def expected(layers_run: int) -> float:
        return (embed_blocks + 2 * layers_run) / (embed_blocks + 2 * aggregator.depth)

    return [
        Measurement(
            name=name,
            layers_run=aggregator.depth if selection is None else max(selection) + 1,
            stored_layers=stored[name][0],
            stored_bytes=stored[name][1],
            seconds=statistics.median(times[name]),
            cpu_seconds=statistics.median(cpu_times[name]),
            peak_bytes=max(peaks[name]),
            equal=equal[name],
            expected_time=expected(aggregator.depth if selection is None else max(selection) + 1),
        )
        for name, selection in VARIANTS.items()
    ]


def _table(title: str, rows: list[Measurement], depth: int) -> str:
    full = rows[0]
    mb = 1024 * 1024
    lines = [
        f"\n### {title}",
        "| variant | layers run | stored layers | stored MB | stored vs full | forward s | time vs full "
        "| CPU s | CPU vs full | expected time | peak MB | peak vs full | equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = f"{row.peak_bytes / mb:.1f}" if row.peak_bytes >= 0 else "n/a"
        peak_ratio = (
            f"{row.peak_bytes / full.peak_bytes:.2f}"
            if row.peak_bytes >= 0 and full.peak_bytes > 0
            else "n/a"
        )
        equal = "-" if row.equal is None else ("yes" if row.equal else "NO")
        stored_ratio = row.stored_bytes / full.stored_bytes
        lines.append(
            f"| {row.name} | {row.layers_run}/{depth} | {row.stored_layers} | {row.stored_bytes / mb:.2f} "
            f"| {stored_ratio:.3f} ({100 * (1 - stored_ratio):.1f}% less) "
            f"| {row.seconds:.4f} | {row.seconds / full.seconds:.2f} "
            f"| {row.cpu_seconds:.4f} | {row.cpu_seconds / full.cpu_seconds:.2f} "
            f"| {row.expected_time:.2f} "
            f"| {peak} | {peak_ratio} | {equal} |"
        )
    lines.append(
        f"expected time = share of the transformer blocks that run, patch embed included (it always "
        f"runs); CPU s = process CPU time, which a busy machine distorts less than wall time; "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    return "\n".join(lines)


def _check(rows: list[Measurement]) -> None:
    by_name = {row.name: row for row in rows}
    assert all(row.equal in (None, True) for row in rows), "a selected layer differs from the full aggregator"
    keep4 = by_name["keep 4 (4,11,17,23)"]
    # A deterministic target (no timing threshold in tests): 4 of 24 layers is 1/6 of the bytes.
    assert keep4.stored_bytes <= 0.2 * by_name["full"].stored_bytes
    assert by_name["exit 22"].stored_layers == by_name["exit 11"].stored_layers == 1


def _build(config: dict[str, Any]) -> Aggregator:
    torch.manual_seed(0)
    return Aggregator(**config).to(DEVICE).eval()


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- small configuration (always) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_aggregator() -> Aggregator:
    return _build(SMALL)


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return torch.rand(
        1, SMALL_FRAMES, 3, SMALL_SIDE, SMALL_SIDE, generator=torch.Generator().manual_seed(0)
    ).to(DEVICE)


# Tiny ops: one CPU thread avoids OpenMP hand-offs that cost more than the work on a busy machine.
_SMALL_THREADS = 1 if DEVICE.type == "cpu" else None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_aggregator_forward(
    benchmark: Any, small_aggregator: Aggregator, small_images: torch.Tensor, variant: str
) -> None:
    benchmark.group = "vggt aggregator, small (24 layers, width 64, 4 frames 112x112)"
    with _threads(_SMALL_THREADS):
        output = benchmark(_forward, small_aggregator, small_images, VARIANTS[variant])
    assert len(output) == 24


def test_small_report(
    small_aggregator: Aggregator, small_images: torch.Tensor, capsys: pytest.CaptureFixture
) -> None:
    with _threads(_SMALL_THREADS):
        rows = _compare(small_aggregator, small_images, repeats=5)
        table = _table(
            f"small aggregator on {DEVICE.type}, S={SMALL_FRAMES} at {SMALL_SIDE}x{SMALL_SIDE}", rows, 24
        )
    with capsys.disabled():
        print(table)
    _check(rows)


# --- default configuration (opt-in) ----------------------------------------------------------------------

needs_full = pytest.mark.skipif(
    not RUN_FULL, reason="set FEATSTORE_BENCH_FULL=1 for the VGGT-1B-size benchmark"
)


@pytest.fixture(scope="module")
def default_aggregator() -> Aggregator:
    return _build(DEFAULT)


def _default_images(frames: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(frames)
    return torch.rand(1, frames, 3, DEFAULT_SIDE, DEFAULT_SIDE, generator=generator).to(DEVICE)


@needs_full
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_default_aggregator_forward(benchmark: Any, default_aggregator: Aggregator, variant: str) -> None:
    frames = _default_frames()[0]
    benchmark.group = f"vggt aggregator, default (VGGT-1B), S={frames} at 518x518"
    images = _default_images(frames)
    output = benchmark.pedantic(
        _forward, args=(default_aggregator, images, VARIANTS[variant]), rounds=1, iterations=1
    )
    assert len(output) == 24


@needs_full
def test_default_report(default_aggregator: Aggregator, capsys: pytest.CaptureFixture) -> None:
    repeats = int(os.environ.get("FEATSTORE_BENCH_REPEATS", "3" if DEVICE.type == "cuda" else "1"))
    threads = os.environ.get("FEATSTORE_BENCH_THREADS")
    with _threads(int(threads) if threads else None):
        _default_report(default_aggregator, capsys, repeats)


def _default_report(default_aggregator: Aggregator, capsys: pytest.CaptureFixture, repeats: int) -> None:
    for frames in _default_frames():
        images = _default_images(frames)
        try:
            rows = _compare(default_aggregator, images, repeats=repeats)
        except torch.OutOfMemoryError:
            with capsys.disabled():
                print(f"\nS={frames}: out of memory, stopping here")
            break
        finally:
            del images
        with capsys.disabled():
            print(_table(f"default aggregator (VGGT-1B) on {DEVICE.type}, S={frames} at 518x518", rows, 24))
        _check(rows)
