"""History entries at the cost of per-image entries: featstore's own work on one episode whose
every step is a sample (sample k is frames 0..k), with an encoder that costs nothing, so that only
featstore's own costs show.

- Reading: ``get_history`` of the whole T=64 list (it stats the 64 frames and checks the entry's
  chains) against a per-image ``get`` of one of its frames (target: within 3x), and against the
  floor of any check of the history, a ``stat`` of each of its frames (from Python) and its
  chains (the stats and the key hashes, from Rust); each the fastest of several passes.
- Writing: the history precompute of one T=64 episode against one T=256 episode (T entries each,
  the frames stamped and digested once per pass, each entry's header of constant size).
  Linear is 4x; target: within 4.5x. Entry bytes per episode are printed too.

``FEATSTORE_BENCH_FULL=1`` adds a T=1024 episode.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from scale_tree import Trivial

from featstore import FeatureStore, _core
from featstore.history import history_entry_files
from featstore.pipeline import precompute

LENGTHS = (64, 256)
RESULTS: dict[str, float] = {}


class TrivialHistory(Trivial):
    """``encode_history`` of the scale benchmark's trivial encoder: each frame's 48 bytes as floats."""

    name = "trivial"

    def fingerprint(self) -> str:
        return "trivial-history-bench-v1"

    def encode_history(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": batch.float().flatten(2)}


def _episode(root: str, frames: int) -> list[str]:
    os.makedirs(os.path.join(root, "ep"), exist_ok=True)
    rels = [f"ep/{i:05d}.bin" for i in range(frames)]
    past = time.time() - 3600  # outside the racy window: lookups trust the stamps
    for i, rel in enumerate(rels):
        path = os.path.join(root, rel)
        with open(path, "wb") as f:
            f.write(bytes([i % 251]) * 64)
        os.utime(path, (past, past))
    with open(os.path.join(root, "episode.jsonl"), "w") as f:
        for k in range(1, frames + 1):
            f.write(json.dumps({"images": rels[:k]}) + "\n")
    return rels


def _precompute(root: str) -> tuple[float, float]:
    """Seconds of the history precompute of the episode under ``root``, and of its write stage
    (the fastest of two fresh runs: the first also warms the imports and the page cache)."""
    runs = []
    for _ in range(2):
        for p in history_entry_files(FeatureStore(root, "trivial")):
            os.unlink(p)
        t0 = time.perf_counter()
        s = precompute(root, encoder=TrivialHistory(), jsonl="images", extensions=["bin"], num_workers=0,
                       progress=False, durable=False)
        assert s["failed"] == 0 and s["written"] > 0, s
        runs.append((time.perf_counter() - t0, s["stage_seconds"]["write"]))
    return min(runs)


@pytest.fixture(scope="module")
def lengths(full):
    return (*LENGTHS, 1024) if full else LENGTHS


def test_history_precompute_is_linear_in_the_episode(benchmark, tmp_path_factory, lengths):
    seconds: dict[int, tuple[float, float]] = {}
    sizes: dict[int, int] = {}

    def run():
        for t in lengths:
            root = str(tmp_path_factory.mktemp(f"episode{t}"))
            rels = _episode(root, t)
            seconds[t] = _precompute(root)
            store = FeatureStore(root, "trivial")
            files = history_entry_files(store)
            assert len(files) == t and store.history_state(rels) == "valid"
            sizes[t] = sum(os.path.getsize(p) for p in files)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    base = lengths[0]
    (b_all, b_write) = seconds[base]
    for t in lengths:
        total, write = seconds[t]
        RESULTS[f"precompute T={t}"] = total
        print(f"\nhistory precompute, one episode of T={t}, every step a sample: {total:.3f} s (write stage "
              f"{write:.3f} s), {sizes[t] / 1024:.0f} KiB of entries ({sizes[t] / t:.0f} B each); vs T={base}: "
              f"{total / b_all:.2f}x the time, write stage {write / b_write:.2f}x, for {t / base:.0f}x the frames "
              f"(target at T=256: within 4.5x; the .jsonl itself lists T(T+1)/2 paths)")


def _fastest(fn, calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def test_get_history_of_64_frames_against_a_per_image_get(benchmark, tmp_path):
    root = str(tmp_path)
    rels = _episode(root, 64)
    _precompute(root)
    precompute(root, encoder=Trivial(), feature="image", extensions=["bin"], num_workers=0, progress=False,
               durable=False)
    histories = FeatureStore(root, "trivial")
    images = FeatureStore(root, "image")
    assert histories.get_history(rels) is not None and images.get(rels[-1]) is not None
    assert histories._core.read_history(rels) is not None  # what is timed is the stamps-only read
    calls = 200

    paths = [os.path.join(root, r) for r in rels]

    def run():
        RESULTS["get_history T=64"] = _fastest(lambda: histories.get_history(rels), calls)
        RESULTS["get"] = _fastest(lambda: images.get(rels[-1]), calls)
        RESULTS["stat 64"] = _fastest(lambda: [os.stat(p) for p in paths], calls)
        RESULTS["chains 64"] = _fastest(lambda: _core.history_links(root, rels, last_only=True), calls)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    h, g, s, c = (RESULTS[k] for k in ("get_history T=64", "get", "stat 64", "chains 64"))
    print(f"\nget_history of a T=64 history: {h * 1e6:.1f} us; per-image get: {g * 1e6:.1f} us ({h / g:.2f}x; "
          f"target: within 3x); os.stat of its 64 frames from Python: {s * 1e6:.1f} us ({h / s:.2f}x); "
          f"its chains alone (the 64 stats and key hashes any check needs, from Rust): {c * 1e6:.1f} us "
          f"({h / c:.2f}x)")
