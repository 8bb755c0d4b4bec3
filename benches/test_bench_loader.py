"""Training batches through a DataLoader: samples/s over a whole epoch of cached features.

Full size (``FEATSTORE_BENCH_FULL=1``): 1,500 entries of bf16 ``[1369, 2048]`` (5.6 MB each, 8.4
GB in all, the VGGT patch tokens of 518x518 images), batches of 32. Compared in one run:

- featstore: ``CachedDataset.loader`` with 2 workers: workers load the base samples and check the
  entries; the main process reads each batch with one parallel ``read_batch`` into a reused
  buffer, on a prefetch thread;
- featstore in a plain DataLoader with 2 workers and ``ds.collate``: each worker reads its batch
  with ``read_batch`` into one shared-memory tensor that ``collate`` passes on without stacking;
- ``torch.load`` of ``.pt`` sidecars in a DataLoader with 2 workers and the default collate
  (what the old training scripts did);
- recomputing the features with a small encoder (a 14x14 patch embedding to 2,048 channels; decode
  and encode in 2 workers), over the first 96 images.

Each pass runs once unmeasured first, so every scheme reads from a warm page cache. The consumer
touches every page of each batch (as a host-to-device copy would) and does no arithmetic.
Throughput is printed as samples/s and GB/s, beside one core's memcpy of the same bytes.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import RESULTS, Indices, one_core_memcpy, record

from featstore import CachedDataset, FeatureStore
from featstore.examples import make_image_tree

GROUP = "training batches through a DataLoader (per sample)"
BATCH = 32
RECOMPUTED = 96


class TorchLoadSidecars(torch.utils.data.Dataset):
    """The old loaders: ``torch.load(f"{image}.vggt_cache.pt")["features"]`` per sample."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.load(self.paths[i] + ".vggt_cache.pt", map_location="cpu")["features"]


class PatchEmbed(torch.nn.Module):
    """A small encoder with VGGT's output shape: 14x14 patches of a 518x518 image to 2,048 channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, channels, 14, stride=14)

    def preprocess(self, path: str) -> torch.Tensor:
        from featstore.models.vggt import preprocess_image_uint8

        return preprocess_image_uint8(path, "pad")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).to(torch.bfloat16)


def make_encoder(channels: int = 2048) -> PatchEmbed:
    return PatchEmbed(channels)


def make_small_encoder() -> PatchEmbed:
    return PatchEmbed(64)


@pytest.fixture(scope="session")
def loader_tree(tmp_path_factory, full):
    n, shape = (1500, (1369, 2048)) if full else (48, (1369, 64))
    root = str(tmp_path_factory.mktemp("loader"))
    rels = make_image_tree(root, n, size=518 if full else 64)
    store = FeatureStore(root, "vggt")
    base = torch.randn(shape).to(torch.bfloat16)
    for i, rel in enumerate(rels):
        t = base + i  # distinct entries without a randn per entry
        store.put(rel, {"features": t})
        torch.save({"features": t}, os.path.join(root, rel) + ".vggt_cache.pt")
    store.write_manifest(store.status(rels), rels)
    nbytes = shape[0] * shape[1] * 2
    return root, [os.path.join(root, r) for r in rels], nbytes


def _consume(loader, key: str | None = None) -> int:
    """Iterates an epoch, touching every page of each batch; returns the samples seen."""
    seen = 0
    for batch in loader:
        t = batch[key] if key else batch
        flat = t.view(-1).view(torch.uint8)
        flat[::4096].max()  # one byte per page: each page is mapped and read
        seen += t.shape[0]
    return seen


def _epoch(benchmark, loader, key: str | None, n: int, name: str) -> None:
    if not getattr(benchmark, "disabled", False):
        assert _consume(loader, key) == n  # warm the page cache (and the workers' imports)
    seen = benchmark.pedantic(lambda: _consume(loader, key), rounds=2, iterations=1)
    if seen is not None:
        assert seen == n
    record(benchmark, GROUP, name, n)


def test_loader_featstore_two_workers(benchmark, loader_tree):
    root, paths, _ = loader_tree
    ds = CachedDataset(Indices(len(paths)), FeatureStore(root, "vggt"), paths=paths, on_miss="error")
    loader = ds.loader(batch_size=BATCH, num_workers=2, shuffle=True, persistent_workers=True)
    _epoch(benchmark, loader, "features", len(paths), "featstore ds.loader(), 2 workers")


def test_loader_featstore_in_workers(benchmark, loader_tree):
    root, paths, _ = loader_tree
    ds = CachedDataset(Indices(len(paths)), FeatureStore(root, "vggt"), paths=paths, on_miss="error",
                       log_start=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=2, shuffle=True, collate_fn=ds.collate,
                                         persistent_workers=True)
    _epoch(benchmark, loader, "features", len(paths), "featstore in a plain DataLoader, 2 workers")


def test_loader_torch_load_two_workers(benchmark, loader_tree):
    _, paths, _ = loader_tree
    loader = torch.utils.data.DataLoader(TorchLoadSidecars(paths), batch_size=BATCH, num_workers=2, shuffle=True,
                                         persistent_workers=True)
    _epoch(benchmark, loader, None, len(paths), "torch.load(.pt) sidecars, 2 workers")


def test_loader_recompute_two_workers(benchmark, loader_tree, full):
    root, paths, _ = loader_tree
    subset = paths[:RECOMPUTED] if full else paths[:8]
    ds = CachedDataset(Indices(len(subset)), None, paths=subset, use_cache=False,
                       encoder=make_encoder if full else make_small_encoder, log_start=False)
    loader = ds.loader(batch_size=BATCH, num_workers=2, persistent_workers=True)
    _epoch(benchmark, loader, "features", len(subset), "recompute (patch-embed encoder), 2 workers")
    _report(loader_tree)


def _report(loader_tree) -> None:
    """Samples/s and GB/s of each pass, and the ratios the issue targets."""
    _, paths, nbytes = loader_tree
    rows = RESULTS.get(GROUP)
    if not rows:
        return
    memcpy = nbytes * BATCH / one_core_memcpy(nbytes * BATCH)  # bytes per second
    print(f"\none-core memcpy: {memcpy / 1e9:.2f} GB/s ({memcpy / nbytes:.0f} samples/s of {nbytes / 1e6:.1f} MB)")
    by_name = dict(rows)
    for name, per_sample in rows:
        print(f"  {name:52} {1 / per_sample:8.0f} samples/s  {nbytes / per_sample / 1e9:6.2f} GB/s  "
              f"({nbytes / per_sample / memcpy:.0%} of memcpy)")
    ours = by_name.get("featstore ds.loader(), 2 workers")
    theirs = by_name.get("torch.load(.pt) sidecars, 2 workers")
    if ours and theirs:
        print(f"  featstore (2 workers) / torch.load (2 workers): {theirs / ours:.2f}x (target >= 2.5x)")
