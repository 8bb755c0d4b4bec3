"""Read: from a cache hit to a tensor in hand.

featstore's ``get`` (map the entry, validate the header, hand the tensor over through DLPack: no
copy, so the time does not grow with the entry's size) against ``torch.load`` of a ``.pt``
sidecar and ``safetensors.torch.load_file``, at 1 MiB and 11 MiB. Pages of a mapped tensor are
read from the page cache when first touched. Target: <= 20 us per entry, >= 20x torch.load.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import record
from safetensors.torch import load_file

from featstore import FeatureStore

SIZES = {"1MiB": 1 << 18, "11MiB": 11 << 18}  # float32 elements


@pytest.fixture(scope="session", params=sorted(SIZES))
def read_tree(request, tmp_path_factory, full):
    n = 64 if full else 8
    root = tmp_path_factory.mktemp(f"read{request.param}")
    elems = SIZES[request.param]
    store = FeatureStore(root, "vggt")
    rels = []
    for i in range(n):
        rel = f"img_{i:04d}.jpg"
        (root / rel).write_bytes(b"image %d" % i)
        t = torch.randn(elems)
        store.put(rel, {"features": t})
        torch.save({"features": t, "path": str(root / rel)}, str(root / rel) + ".vggt_cache.pt")
        rels.append(rel)
    store.write_manifest(store.status(rels), rels)
    return request.param, str(root), rels


def test_read_featstore_get(benchmark, read_tree):
    size, root, rels = read_tree
    store = FeatureStore(root, "vggt")
    out = benchmark.pedantic(lambda: [store.get(r)["features"] for r in rels], rounds=50, warmup_rounds=1)
    assert len(out) == len(rels) and out[0].numel() == SIZES[size]
    record(benchmark, f"read {size} (per entry)", "featstore get (zero-copy)", len(rels))


def test_read_torch_load(benchmark, read_tree):
    size, root, rels = read_tree
    paths = [os.path.join(root, r) + ".vggt_cache.pt" for r in rels]
    out = benchmark.pedantic(lambda: [torch.load(p, map_location="cpu")["features"] for p in paths], rounds=5,
                             warmup_rounds=1)
    assert out[0].numel() == SIZES[size]
    record(benchmark, f"read {size} (per entry)", "torch.load(.pt sidecar)", len(rels))


def test_read_safetensors_load_file(benchmark, read_tree):
    size, root, rels = read_tree
    store = FeatureStore(root, "vggt")
    paths = [store.entry_path(r) for r in rels]
    out = benchmark.pedantic(lambda: [load_file(p)["features"] for p in paths], rounds=5, warmup_rounds=1)
    assert out[0].numel() == SIZES[size]
    record(benchmark, f"read {size} (per entry)", "safetensors.torch.load_file", len(rels))
