"""Lookup: is there a usable cached feature for this image?

featstore's ``contains`` (two stats, and it catches edited images) against the two schemes it
replaces: the cache directory keyed by ``sha256(path + image bytes)[:16]`` (every lookup reads the
whole image) and the bare ``os.path.exists(image + ".vggt_cache.pt")`` (fast, but serves features
of an edited image). Target: >= 100x faster than the SHA256 scheme, within 3x of the bare check.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from conftest import record

from featstore import FeatureStore
from featstore.examples import make_image_tree


@pytest.fixture(scope="session")
def lookup_tree(tmp_path_factory, full):
    n, image_bytes, feat_elems = (2000, 300_000, 1 << 18) if full else (40, 20_000, 1 << 10)
    root = str(tmp_path_factory.mktemp("lookup") / "data")
    rels = make_image_tree(root, n, target_bytes=image_bytes, png_every=0)
    store = FeatureStore(root, "vggt")
    legacy_dir = os.path.join(os.path.dirname(root), "legacy_cache")
    os.makedirs(legacy_dir)
    feature = torch.randn(feat_elems)  # 1 MiB of float32 at full size
    paths = [os.path.join(root, r) for r in rels]
    for rel, path in zip(rels, paths, strict=True):
        store.put(rel, {"features": feature})
        open(path + ".vggt_cache.pt", "wb").close()  # the old sidecar: only its existence is checked
        with open(path, "rb") as f:
            key = hashlib.sha256(path.encode() + f.read()).hexdigest()[:16]
        open(os.path.join(legacy_dir, key + ".pt"), "wb").close()
    store.write_manifest(store.status(rels), rels)
    return root, paths, legacy_dir


def legacy_sha256_lookup(path: str, cache_dir: str) -> bool:
    # What the old data loader did for every sample.
    hasher = hashlib.sha256()
    hasher.update(path.encode("utf-8"))
    with open(path, "rb") as f:
        hasher.update(f.read())
    return os.path.exists(os.path.join(cache_dir, hasher.hexdigest()[:16] + ".pt"))


def test_lookup_featstore_contains(benchmark, lookup_tree):
    root, paths, _ = lookup_tree
    store = FeatureStore(root, "vggt")  # a new process: the manifest index seeds the check
    result = benchmark.pedantic(lambda: sum(map(store.contains, paths)), rounds=20, warmup_rounds=1)
    assert result == len(paths)
    record(benchmark, "lookup (per image)", "featstore contains (2 stats, catches edits)", len(paths))


def test_lookup_legacy_sha256(benchmark, lookup_tree):
    _, paths, legacy_dir = lookup_tree
    result = benchmark.pedantic(lambda: sum(legacy_sha256_lookup(p, legacy_dir) for p in paths), rounds=3,
                                warmup_rounds=1)
    assert result == len(paths)
    record(benchmark, "lookup (per image)", "legacy sha256(path + bytes) + exists", len(paths))


def test_lookup_bare_exists(benchmark, lookup_tree):
    _, paths, _ = lookup_tree
    result = benchmark.pedantic(lambda: sum(os.path.exists(p + ".vggt_cache.pt") for p in paths), rounds=20,
                                warmup_rounds=1)
    assert result == len(paths)
    record(benchmark, "lookup (per image)", "os.path.exists(path + suffix), no validity", len(paths))
