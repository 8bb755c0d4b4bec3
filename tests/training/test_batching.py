"""Batches of CachedDataset samples: the zero-copy batch path, padding with a mask, and a clear
error for shapes that need padding."""

from __future__ import annotations

import pytest
import torch
from toy_datasets import Images, source_of

from featstore import CachedDataset, FeatureStore, collate

from .conftest import expected_features, precompute_some

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def test_a_batch_read_by_getitems_is_collated_without_a_copy(data):
    root, rels, _ = data
    precompute_some(root, rels)
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    ds.__getitems__([0])  # the first hit tells the entries' layout
    samples = ds.__getitems__([3, 1, 4, 5])
    batch = collate(samples)
    assert batch["features"].data_ptr() == samples[0]["features"].data_ptr()
    assert batch["features"].shape == (4, 48)
    for j, i in enumerate([3, 1, 4, 5]):
        torch.testing.assert_close(batch["features"][j], expected_features(root, rels[i]))


def test_padded_collate_pads_variable_length_entries_with_a_mask(data):
    root, rels, _ = data
    store = FeatureStore(root, "prompt_embed")
    lengths = [3, 7, 1, 5]
    for rel, n in zip(rels, lengths, strict=False):
        store.put(rel, {"prompt_embed": torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) + 1})
    ds = CachedDataset(Images(root, rels[:4]), store, path_fn=source_of, pad=["prompt_embed"], log_start=False)
    batch = next(iter(ds.loader(batch_size=4, num_workers=2)))
    assert batch["prompt_embed"].shape == (4, 7, 4)
    assert batch["prompt_embed_mask"].sum(1).tolist() == lengths
    for j, n in enumerate(lengths):
        assert (batch["prompt_embed"][j, :n] > 0).all() and not batch["prompt_embed"][j, n:].any()


def test_a_batch_mixing_shapes_without_pad_says_how_to_fix_it():
    with pytest.raises(ValueError, match="pad="):
        collate([{"x": torch.zeros(2), "cached": True}, {"cached": False}, {"x": torch.zeros(3), "cached": True}])


def test_a_padded_mask_is_padded_with_zeros_and_gets_no_mask_of_its_own():
    samples = [{"e": torch.ones(n, 2), "e_mask_ids": torch.ones(n, dtype=torch.int64),
                "prompt_embeds_mask": torch.ones(n, dtype=torch.int64)} for n in (2, 3)]
    batch = collate(samples, pad=["e", "prompt_embeds_mask", "e_mask_ids"])
    assert batch["prompt_embeds_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert "prompt_embeds_mask_mask" not in batch
    assert batch["e_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert "e_mask_ids_mask" in batch  # not named like a mask: it gets one


def test_a_miss_filled_in_the_main_process_keeps_a_padded_mask_unmasked(data):
    from featstore.training.batching import put_row

    batch = {"prompt_embeds_mask": torch.tensor([[1, 0]]).repeat(2, 1), "cached": torch.tensor([True, False])}
    put_row(batch, "prompt_embeds_mask", 1, torch.ones(3, dtype=torch.int64), 2, padded=True)
    assert batch["prompt_embeds_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert set(batch) == {"prompt_embeds_mask", "cached"}


def test_stacked_datasets_are_all_read_in_the_main_process(data):
    """One CachedDataset per feature, each wrapping the one before: the outermost loader hands
    every dataset's reads on to the main process (one read_batch per tensor, pooled buffers)."""
    root, rels, _ = data
    precompute_some(root, rels)
    other = FeatureStore(root, "other", fingerprint="other-v1")
    for rel in rels:
        other.put(rel, {"other": torch.full((3,), float(len(rel)))})
    inner = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False,
                          cached_key="toy_cached")
    outer = CachedDataset(inner, FeatureStore(root, "other", fingerprint="other-v1"), path_fn=source_of,
                          log_start=False, cached_key="other_cached")
    batches = list(outer.loader(batch_size=4, num_workers=2, prefetch=0))
    assert sum(len(b["index"]) for b in batches) == len(rels)
    for b in batches:
        assert b["toy_cached"].all() and b["other_cached"].all()
        assert not [k for k in b if k.startswith("_featstore_handoff")]
        for j, i in enumerate(b["index"].tolist()):
            torch.testing.assert_close(b["features"][j], expected_features(root, rels[i]))
            assert b["other"][j].tolist() == [float(len(rels[i]))] * 3
    # Both datasets' batch tensors came from their own pooled buffers in this process.
    assert inner._buffers._pool and outer._buffers._pool
