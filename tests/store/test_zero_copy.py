"""Reads are zero-copy: tensors live inside the entry's mapping, and holding and reading 2 GB of
entries grows file-backed memory only, never anonymous memory."""

import os

import torch

from featstore import FeatureStore, _core


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_tensor_memory_lies_inside_the_mapping(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt", read_mode="map")
    store.put(rels[0], {"features": torch.randn(256, 512)})
    capsules, _, (addr, length) = _core.read_entry(store.entry_path(rels[0]))
    t = torch.from_dlpack(capsules[0][1])
    assert addr <= t.data_ptr() < t.data_ptr() + t.nbytes <= addr + length
    # And through the public API: the tensor is not in any torch-allocated block we could copy.
    got = store.get(rels[0])["features"]
    assert got.data_ptr() % 64 == 0 and torch.equal(got, t)


def test_holding_2gb_of_entries_does_not_grow_anonymous_memory(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    store = FeatureStore(root, "vggt", read_mode="map")
    chunk = torch.arange(32 << 20, dtype=torch.float32)  # 128 MiB
    n = 16  # 2 GiB of entries
    for i in range(n):
        (root / f"{i}.jpg").write_bytes(b"img%d" % i)
        store.put(f"{i}.jpg", {"features": chunk})
    del chunk
    store = FeatureStore(root, "vggt", read_mode="map")
    before = rss_anon_bytes()
    held = [store.get(f"{i}.jpg")["features"] for i in range(n)]
    total = sum(float(t[:: 4096].sum()) for t in held)  # touch a value on every page
    total += sum(float(t[-1]) for t in held)
    grown = rss_anon_bytes() - before
    assert total > 0
    assert sum(t.nbytes for t in held) == n * (128 << 20)
    assert grown < 64 << 20, f"anonymous memory grew by {grown / 2**20:.0f} MiB while reading 2 GiB"


def test_pread_mode_copies_into_owned_memory(tree):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.ones(1000)})
    store = FeatureStore(root, "vggt", read_mode="pread")
    got = store.get(rels[0])["features"]
    assert torch.equal(got, torch.ones(1000)) and got.data_ptr() % 64 == 0
    got.add_(1)  # owned memory: writable, the file never changes
    assert torch.equal(FeatureStore(root, "vggt").get(rels[0])["features"], torch.ones(1000))
    assert os.path.exists(store.entry_path(rels[0]))
