"""FeatureStore.read_batch: many entries straight into one tensor, misses reported per slot."""

import os

import pytest
import torch

from featstore import BatchReadError, FeatureStore, StaleEntryError


def test_reads_a_batch_equal_to_per_entry_gets(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    for i, r in enumerate(rels):
        store.put(r, {"features": torch.full((5, 4), float(i), dtype=torch.bfloat16), "ids": torch.arange(3)})
    fresh = FeatureStore(root, "vggt")
    batch = fresh.read_batch(rels, "features")
    assert batch.shape == (len(rels), 5, 4) and batch.dtype == torch.bfloat16
    for i, r in enumerate(rels):
        assert torch.equal(batch[i], store.get(r)["features"])
    out = torch.empty(len(rels), 3, dtype=torch.int64)
    assert fresh.read_batch(rels, "ids", out=out) is out and torch.equal(out[2], torch.arange(3))


def test_misses_are_reported_per_slot_and_others_are_filled(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    for r in rels[:3]:
        store.put(r, {"features": torch.ones(2, 2)})
    store.put(rels[3], {"features": torch.ones(3, 2)})  # another shape
    with open(os.path.join(root, rels[1]), "ab") as f:
        f.write(b"edit")  # stale
    with pytest.raises(BatchReadError) as info:
        FeatureStore(root, "vggt").read_batch(rels[:5], "features")
    failed = {i: why for i, _, why in info.value.failed}
    assert set(failed) == {1, 3, 4}
    assert failed[1].startswith("stale") and "the batch holds" in failed[3] and failed[4].startswith("missing")
    assert torch.equal(info.value.out[0], torch.ones(2, 2)) and torch.equal(info.value.out[2], torch.ones(2, 2))


def test_no_valid_entry_and_bad_out(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    with pytest.raises(StaleEntryError, match="precompute"):
        store.read_batch(rels[:2], "features")
    store.put(rels[0], {"features": torch.ones(2)})
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        store.read_batch(rels[:1], "features", out=torch.empty(2, 2))
    with pytest.raises(BatchReadError, match="the batch holds F32 \\[3\\]"):
        store.read_batch(rels[:1], "features", out=torch.empty(1, 3))


def test_empty_tensors_still_report_missing_entries(tree):
    """A batch of zero-size tensors copies nothing, but each entry is still checked."""
    root, rels = tree
    store = FeatureStore(root, "vggt")
    store.put(rels[0], {"features": torch.empty(0, 4)})
    out = torch.empty(2, 0, 4)
    with pytest.raises(BatchReadError) as info:
        store.read_batch(rels[:2], "features", out=out)
    assert [i for i, _, _ in info.value.failed] == [1]


def test_an_out_dtype_entries_cannot_hold_is_a_clear_error(tree):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.ones(2)})
    with pytest.raises(ValueError, match="complex64.*use one of"):
        FeatureStore(root, "vggt").read_batch(rels[:1], "features", out=torch.empty(1, 2, dtype=torch.complex64))


def test_an_entry_of_another_encoder_is_foreign_to_read_batch_and_state_alike(tree):
    root, rels = tree
    FeatureStore(root, "vggt", fingerprint="fpA").put(rels[0], {"features": torch.ones(2)})
    store = FeatureStore(root, "vggt", fingerprint="fpB")
    with pytest.raises(BatchReadError, match="foreign"):
        store.read_batch(rels[:1], "features", out=torch.empty(1, 2))
    assert store.state(rels[0]) == "foreign"
