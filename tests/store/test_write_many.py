"""FeatureStore.write_many: a batch written in parallel in Rust, each item judged as write()
judges it, one result per item in order."""

from __future__ import annotations

import os

import torch

from featstore import FeatureStore
from featstore.errors import FeatstoreError
from featstore.inputs import stamp_of


def test_a_batch_is_written_in_order_and_each_entry_serves_its_own_tensor(tree):
    root, rels = tree
    store = FeatureStore(root, "f", fingerprint="fp")
    items = [(rel, {"x": torch.full((4,), float(i))}, None, None) for i, rel in enumerate(rels)]
    results = store.write_many(items, durable=True)
    assert [os.path.basename(r["path"]) for r in results] == [os.path.basename(r) + ".f.safetensors" for r in rels]
    fresh = FeatureStore(root, "f", fingerprint="fp")
    for i, rel in enumerate(rels):
        assert torch.equal(fresh.get(rel)["x"], torch.full((4,), float(i)))


def test_one_bad_item_fails_alone(tree):
    root, rels = tree
    store = FeatureStore(root, "f", fingerprint="fp")
    edited, gone = rels[1], rels[2]
    seen = stamp_of(os.path.join(root, edited))
    with open(os.path.join(root, edited), "ab") as f:  # edited after the encoder read it
        f.write(b"more")
    os.remove(os.path.join(root, gone))
    items = [(rel, {"x": torch.ones(2)}, None, seen if rel == edited else None) for rel in rels[:4]]
    results = store.write_many(items)
    assert isinstance(results[1], FeatstoreError) and "after it was read" in str(results[1])
    assert isinstance(results[2], FileNotFoundError) and gone in str(results[2])
    for i in (0, 3):
        assert isinstance(results[i], dict) and store.contains(rels[i])
    assert not os.path.exists(os.path.join(root, edited + ".f.safetensors"))


def test_a_batch_in_the_dir_layout_creates_its_key_directories(tree, tmp_path):
    root, rels = tree
    store = FeatureStore(root, "f", fingerprint="fp", cache_dir=str(tmp_path / "cache"))
    results = store.write_many([(rel, {"x": torch.ones(1)}, None, None) for rel in rels], durable=True)
    assert all(isinstance(r, dict) for r in results)
    assert all(FeatureStore(root, "f", fingerprint="fp", cache_dir=str(tmp_path / "cache")).contains(r) for r in rels)


def test_a_sidecar_directory_that_leads_outside_the_root_is_refused_in_a_batch(tree, tmp_path):
    root, rels = tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(open(os.path.join(root, rels[0]), "rb").read())
    os.symlink(elsewhere, os.path.join(root, "linked"))
    store = FeatureStore(root, "f", fingerprint="fp")
    results = store.write_many([("linked/x.png", {"x": torch.ones(1)}, None, None),
                                (rels[0], {"x": torch.ones(1)}, None, None)])
    assert isinstance(results[0], FeatstoreError) and "--cache-dir" in str(results[0])
    assert isinstance(results[1], dict)
    assert not os.path.exists(elsewhere / "x.png.f.safetensors")
