"""History entries: one causal pass per episode against recomputing every sample online.

One episode of T frames whose every step is a sample (sample k is frames 0..k, what a
JanusVLN-style model trains on). featstore's history precompute streams the episode once and
writes an entry per prefix: T frame passes. A model that computes its geometry features online
runs a streaming pass over each sample's frames (decoding them, as its data loader does): T(T+1)/2
frame passes per epoch. Both frame-pass counts are counted (the encoder's ``frame_passes``), not
derived, and asserted exactly; seconds and the ratios are printed.

Then reading: a batch of the T history entries (``get_history`` checks every frame of each
history) against a batch of T per-image entries of the same shape (``get`` and ``read_batch``);
both are featstore's, so the ratio is printed on its own line, not in the table.

Sizes: the tiny random VGGT on 56-pixel frames (4 x 4 patches), T=8 by default (CI runs it once
with ``--benchmark-disable``), T=64 with ``FEATSTORE_BENCH_FULL=1``. ``FEATSTORE_BENCH_VGGT1B=1``
uses VGGT-1B's size instead (random weights, 518-pixel frames; for a GPU, ``DEVICE=cuda``).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import record

from featstore import FeatureStore
from featstore.encoders import VGGTEncoder
from featstore.encoders.base import digest_of
from featstore.examples import make_image_tree
from featstore.models.vggt import preprocess_image_uint8
from featstore.pipeline import precompute
from featstore.pipeline.planning import default_device

VGGT1B = os.environ.get("FEATSTORE_BENCH_VGGT1B") == "1"
SIDE = 518 if VGGT1B else 56

# name -> (frame passes, seconds) of the last run of each side, for the printed comparison.
MEASURED: dict[str, tuple[int, float]] = {}
READS: dict[str, float] = {}


class BenchVGGT(VGGTEncoder):
    """The benchmark's VGGT: tiny (or VGGT-1B sized with FEATSTORE_BENCH_VGGT1B=1), random weights,
    frames of SIDE pixels."""

    def __init__(self, **options) -> None:
        super().__init__(random_weights_seed=0, config={} if VGGT1B else None, device=default_device(), **options)

    def preprocess(self, path: str) -> torch.Tensor:
        return preprocess_image_uint8(path, self.mode, target_size=SIDE)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        return digest_of(super().fingerprint(), SIDE)


@pytest.fixture(scope="session")
def episode(tmp_path_factory, full):
    frames = 64 if full else 8
    root = str(tmp_path_factory.mktemp("history") / "data")
    rels = make_image_tree(root, frames, scenes=1, size=64, png_every=0)
    with open(os.path.join(root, "episode.jsonl"), "w") as f:
        for k in range(1, frames + 1):
            f.write(json.dumps({"images": rels[:k]}) + "\n")
    return root, rels


@pytest.fixture(autouse=True)
def _torch_threads():
    """Both sides compute with the threads precompute gives torch beside one decoding worker."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    yield
    torch.set_num_threads(previous)


def test_history_precompute_featstore(benchmark, episode):
    root, rels = episode
    T = len(rels)
    runs: list[tuple[int, float]] = []

    def go():
        enc = BenchVGGT(history=True)
        t0 = time.perf_counter()
        s = precompute(root, encoder=enc, jsonl="images", overwrite=True, num_workers=1, progress=False)
        runs.append((s["frame_passes"], time.perf_counter() - t0))
        assert s["written"] == T and s["frame_passes"] == enc.frame_passes

    benchmark.pedantic(go, rounds=1 if VGGT1B else 3, warmup_rounds=0)
    assert runs[-1][0] == T  # one streaming pass over the episode: T frame passes
    MEASURED["featstore"] = runs[-1]
    record(benchmark, f"history precompute, T={T} episode (per sample)", "featstore history precompute", T)


def test_history_recompute_every_sample(benchmark, episode):
    root, rels = episode
    T = len(rels)
    runs: list[tuple[int, float]] = []

    def go():
        enc = BenchVGGT(history=True)
        enc.to(default_device())
        t0 = time.perf_counter()
        for k in range(1, T + 1):  # what an online model does for sample k: decode and stream its frames
            frames = torch.stack([enc.preprocess(os.path.join(root, r)) for r in rels[:k]])
            with torch.inference_mode():
                batch = frames[None].to(default_device()).float().div_(255)
                enc.encode_history(batch, lengths=[k])["features"][0, -1].cpu()
        runs.append((enc.frame_passes, time.perf_counter() - t0))

    benchmark.pedantic(go, rounds=1 if VGGT1B else 3, warmup_rounds=0)
    assert runs[-1][0] == T * (T + 1) // 2
    MEASURED["recompute"] = runs[-1]
    record(benchmark, f"history precompute, T={T} episode (per sample)", "recompute every sample (online model)", T)
    if "featstore" in MEASURED:
        (fp, fs), (rp, rs) = MEASURED["featstore"], MEASURED["recompute"]
        print(f"\nhistory, T={T}: featstore {fp} frame passes in {fs:.2f} s; recomputing every sample {rp} frame "
              f"passes in {rs:.2f} s: {rp / fp:.1f}x the frame passes, {rs / fs:.1f}x the time")


@pytest.fixture(scope="session")
def entries(episode):
    """History entries of every step, and per-image entries of the same shape for every frame."""
    root, rels = episode
    precompute(root, encoder=BenchVGGT(history=True), jsonl="images", num_workers=0, progress=False)
    precompute(root, encoder=BenchVGGT(), files_from=None, num_workers=0, progress=False)
    history = FeatureStore(root, "vggt", fingerprint=BenchVGGT(history=True).fingerprint())
    per_image = FeatureStore(root, "vggt", fingerprint=BenchVGGT().fingerprint())
    return history, per_image, rels


def _timed(name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    READS[name] = time.perf_counter() - t0
    return out


def test_read_history_batch(benchmark, entries):
    history, _, rels = entries
    samples = [rels[:k] for k in range(1, len(rels) + 1)]
    out = benchmark.pedantic(
        lambda: _timed("history", lambda: torch.stack([history.get_history(s)["features"] for s in samples])),
        rounds=20, warmup_rounds=1)
    assert out.shape[0] == len(rels)


def test_read_per_image_batch(benchmark, entries):
    history, per_image, rels = entries
    out = benchmark.pedantic(
        lambda: _timed("per-image", lambda: torch.stack([per_image.get(r)["features"] for r in rels])),
        rounds=20, warmup_rounds=1)
    assert out.shape == (len(rels), *history.get_history(rels)["features"].shape)
    batch = _timed("read_batch", lambda: per_image.read_batch(rels, "features"))
    assert torch.equal(batch, out)
    if "history" in READS:
        h, p, b = READS["history"], READS["per-image"], READS["read_batch"]
        print(f"\nread a batch of {len(rels)}: history entries {1e6 * h / len(rels):.0f} us per entry, per-image "
              f"get {1e6 * p / len(rels):.0f} us ({h / p:.2f}x), per-image read_batch {1e6 * b / len(rels):.0f} us "
              f"({h / b:.2f}x)")
