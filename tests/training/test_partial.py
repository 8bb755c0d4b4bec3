"""Read mode without an encoder on a partly cached root: every batch has the same keys and shapes,
whichever rows hit; missed rows are zeros with ``cached`` False. A root with no entry at all is
an error when the dataset is built, not mid-epoch."""

from __future__ import annotations

import warnings

import pytest
import torch
from toy_datasets import Images, source_of

from featstore import CachedDataset, FeatureStore, StaleEntryError

from .conftest import expected_features, precompute_some

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _check(batch: dict, rows: list[int], hits: set[int], root: str, rels: list[str]) -> None:
    assert batch["features"].shape == (len(rows), 48) and batch["features"].dtype == torch.float32
    assert batch["cached"].tolist() == [i in hits for i in rows]
    for j, i in enumerate(rows):
        if i in hits:
            torch.testing.assert_close(batch["features"][j], expected_features(root, rels[i]))
        else:
            assert not batch["features"][j].any()


@pytest.mark.parametrize("with_paths", [False, True])
def test_batches_without_a_hit_still_have_every_tensor(data, with_paths):
    root, rels, _ = data
    precompute_some(root, rels[12:])  # the first three batches of four have no hit at all
    hits = set(range(12, 16))
    kwargs = {"paths": rels} if with_paths else {"path_fn": source_of}
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), log_start=False, **kwargs)
    sample = ds[0]
    assert sample["cached"] is False and sample["features"].shape == (48,) and not sample["features"].any()
    assert ds[13]["cached"] is True

    order = list(range(16))
    for batch, start in zip(ds.loader(batch_size=4, num_workers=2), range(0, 16, 4), strict=True):
        _check(batch, order[start:start + 4], hits, root, rels)
    for batch, start in zip(ds.loader(batch_size=4, num_workers=0, prefetch=0), range(0, 16, 4), strict=True):
        _check(batch, order[start:start + 4], hits, root, rels)
    plain = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate)
    for batch, start in zip(plain, range(0, 16, 4), strict=True):
        _check(batch, order[start:start + 4], hits, root, rels)
    single = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    assert next(iter(single))["features"].shape == (48,)


def test_padded_tensors_of_a_batch_without_a_hit_are_empty_with_a_mask(data):
    root, rels, _ = data
    store = FeatureStore(root, "prompt_embed")
    store.put(rels[-1], {"prompt_embed": torch.ones(3, 4)})
    ds = CachedDataset(Images(root, rels), store, path_fn=source_of, pad=["prompt_embed"], log_start=False)
    for loader in (ds.loader(batch_size=4, num_workers=2),
                   torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate)):
        first = next(iter(loader))
        assert first["prompt_embed"].shape == (4, 0, 4) and first["prompt_embed_mask"].shape == (4, 0)
        assert first["cached"].tolist() == [False] * 4
    assert ds[0]["prompt_embed"].shape == (0, 4)


def test_stale_and_corrupt_rows_are_zeros_too(data):
    root, rels, _ = data
    store = precompute_some(root, rels[:4])
    with open(store.entry_path(rels[1]), "r+b") as f:
        f.truncate(40)
    ds = CachedDataset(Images(root, rels[:4]), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(ds.loader(batch_size=4)))
        _check(batch, [0, 1, 2, 3], {0, 2, 3}, root, rels)
        _check(ds.collate(ds.__getitems__([0, 1, 2, 3])), [0, 1, 2, 3], {0, 2, 3}, root, rels)


def test_no_entry_at_all_is_an_error_when_the_dataset_is_built(data):
    root, rels, _ = data
    for kwargs in ({"path_fn": source_of}, {"paths": rels}):
        with pytest.raises(StaleEntryError, match="no valid toy entry to learn shapes from.*precompute.*encoder"):
            CachedDataset(Images(root, rels), FeatureStore(root, "toy"), log_start=False, **kwargs)
    # with an encoder, or with misses as errors, nothing needs the shapes
    CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, on_miss="error",
                  log_start=False)


def test_shapes_come_from_the_manifest_or_the_entries_of_a_dir_layout(data, tmp_path):
    root, rels, _ = data
    cache = str(tmp_path / "cache")
    store = FeatureStore(root, "toy", cache_dir=cache, fingerprint="toy-v1")
    store.put(rels[-1], {"features": expected_features(root, rels[-1])})
    ds = CachedDataset(Images(root, rels[:4]), FeatureStore(root, "toy", cache_dir=cache), path_fn=source_of,
                       log_start=False)  # no source of this dataset has an entry, and there is no manifest
    assert next(iter(ds.loader(batch_size=4)))["features"].shape == (4, 48)
    store.write_manifest(store.status(rels), rels)
    ds = CachedDataset(Images(root, rels[:4]), FeatureStore(root, "toy", cache_dir=cache), path_fn=source_of,
                       log_start=False)
    assert ds[0]["features"].shape == (48,)
