"""Batch read: a training batch of cached features, from paths to one [B, ...] tensor.

featstore's ``read_batch`` (one ``pread`` per entry into a preallocated tensor, parallel, GIL
released) against ``torch.load`` of ``.pt`` sidecars then ``torch.stack`` (what the old loaders
did per sample) and against stacking zero-copy ``get`` views (one copy, but page faults on the
mapping). Entries are bf16 ``[1369, 2048]`` (5.6 MB, VGGT layer 22 patch tokens of a 518x518
image); throughput is printed as GB/s next to a single-core memcpy of the same bytes, the floor
of any approach that hands the batch over in one tensor.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import RESULTS, one_core_memcpy, record

from featstore import FeatureStore


@pytest.fixture(scope="session")
def batch_tree(tmp_path_factory, full):
    n, shape = (64, (1369, 2048)) if full else (8, (37, 64))
    root = tmp_path_factory.mktemp("batch")
    store = FeatureStore(root, "vggt")
    rels = []
    for i in range(n):
        rel = f"img_{i:04d}.jpg"
        (root / rel).write_bytes(b"image %d" % i)
        t = torch.randn(shape).to(torch.bfloat16)
        store.put(rel, {"features": t})
        torch.save({"features": t}, str(root / rel) + ".vggt_cache.pt")
        rels.append(rel)
    store.write_manifest(store.status(rels), rels)
    return str(root), rels, n * shape[0] * shape[1] * 2


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def test_batch_featstore_read_batch(benchmark, batch_tree):
    root, rels, nbytes = batch_tree
    store = FeatureStore(root, "vggt")
    out = torch.empty((len(rels), *store.get(rels[0])["features"].shape), dtype=torch.bfloat16)
    benchmark.pedantic(lambda: store.read_batch(rels, "features", out=out), rounds=10, warmup_rounds=1)
    record(benchmark, "batch read (per sample)", "featstore read_batch (pread into one tensor)", len(rels))
    if RESULTS.get("batch read (per sample)"):
        memcpy = one_core_memcpy(nbytes)
        ours = RESULTS["batch read (per sample)"][0][1] * len(rels)
        print(f"\nread_batch {_gbps(nbytes, ours)}; one-core memcpy {_gbps(nbytes, memcpy)} "
              f"({100 * memcpy / ours:.0f}% of memcpy speed)")


def test_batch_stack_of_gets(benchmark, batch_tree):
    root, rels, _ = batch_tree
    store = FeatureStore(root, "vggt")
    benchmark.pedantic(lambda: torch.stack([store.get(r)["features"] for r in rels]), rounds=10, warmup_rounds=1)
    record(benchmark, "batch read (per sample)", "torch.stack of featstore get views", len(rels))


def test_batch_torch_load_stack(benchmark, batch_tree):
    root, rels, _ = batch_tree
    paths = [os.path.join(root, r) + ".vggt_cache.pt" for r in rels]
    benchmark.pedantic(lambda: torch.stack([torch.load(p)["features"] for p in paths]), rounds=3, warmup_rounds=1)
    record(benchmark, "batch read (per sample)", "torch.load(.pt) per sample + torch.stack", len(rels))
