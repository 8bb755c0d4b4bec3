"""Packs against entries in files of their own: the same entries, read the same ways, in one run.

Two copies of one cache: one keeps each entry in its own file, the other is packed
(`featstore pack`). Measured on each: ``FeatureStore.get`` of every entry (a new store, so the
first lookups go through the index as a training process's do), and an epoch of
``CachedDataset.loader`` (2 workers, batches of 32, every page of each batch touched). Targets
(issue #21): a packed ``get`` within 2x of a file's, and training from packs at least as fast.
Full size (``FEATSTORE_BENCH_FULL=1``): 4,000 entries of bf16 ``[256, 256]`` (128 KiB each).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import SUBJECTS, Indices, record

from featstore import CachedDataset, FeatureStore
from featstore.examples import make_image_tree
from featstore.ops import pack

GET = "get of one entry: packed against its own file (per entry)"
EPOCH = "training epoch from packs against files (per sample)"
SUBJECTS[GET] = SUBJECTS[EPOCH] = "the packed read"
BATCH = 32


@pytest.fixture(scope="session")
def two_caches(tmp_path_factory, full):
    n, shape = (4000, (256, 256)) if full else (64, (16, 64))
    base_dir = tmp_path_factory.mktemp("packs")
    files = str(base_dir / "files")
    rels = make_image_tree(files, n, size=16)
    store = FeatureStore(files, "vggt")
    base = torch.randn(shape).to(torch.bfloat16)
    for i, rel in enumerate(rels):
        store.put(rel, {"features": base + i})
    store.write_manifest(store.status(rels), rels)
    packed = str(base_dir / "packed")
    shutil.copytree(files, packed)
    report = pack(FeatureStore(packed, "vggt"), rels, progress=False)
    assert report.moved == n
    return files, packed, rels


def _get_all(store: FeatureStore, rels: list[str]) -> int:
    return sum(store.get(r) is not None for r in rels)


@pytest.mark.parametrize("which", ["packed", "files"])
def test_get(benchmark, two_caches, which):
    files, packed, rels = two_caches
    root = packed if which == "packed" else files
    store = FeatureStore(root, "vggt")
    assert _get_all(store, rels) == len(rels)  # warm: pages cached, headers known
    hits = benchmark.pedantic(lambda: _get_all(store, rels), rounds=20, warmup_rounds=1)
    if hits is not None:
        assert hits == len(rels)
    record(benchmark, GET, f"get from {'a pack' if which == 'packed' else 'its own file'}", len(rels))


def _consume(loader) -> int:
    seen = 0
    for batch in loader:
        flat = batch["features"].view(-1).view(torch.uint8)
        flat[::4096].max()
        seen += batch["features"].shape[0]
    return seen


@pytest.mark.parametrize("which", ["packed", "files"])
def test_epoch(benchmark, two_caches, which):
    files, packed, rels = two_caches
    root = packed if which == "packed" else files
    paths = [os.path.join(root, r) for r in rels]
    ds = CachedDataset(Indices(len(paths)), FeatureStore(root, "vggt"), paths=paths, on_miss="error",
                       log_start=False)
    loader = ds.loader(batch_size=BATCH, num_workers=2, shuffle=True, persistent_workers=True)
    if not getattr(benchmark, "disabled", False):
        assert _consume(loader) == len(paths)
    seen = benchmark.pedantic(lambda: _consume(loader), rounds=3, iterations=1)
    if seen is not None:
        assert seen == len(paths)
    record(benchmark, EPOCH, f"ds.loader() from {'packs' if which == 'packed' else 'files'}, 2 workers", len(rels))
