"""CachedDataset.loader(): misses and reads handed to the main process, batch buffers reused only
when free, the prefetch thread, and the dataset unchanged outside its loader."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from toy_datasets import Images, LoggedFactory, source_of

from featstore import CachedDataset, FeatureStore

from .conftest import batches, expected_features, log_lines, precompute_some

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def test_workers_hand_misses_to_the_main_process_which_encodes_each_batch_at_once(data):
    """What a GPU encoder gets: workers never build it; the main process encodes a batch's misses
    in one call and, in lazy mode, writes them."""
    root, rels, log = data
    precompute_some(root, rels[:4])
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, encoder=LoggedFactory(log),
                       mode="lazy", encode_in_workers=False, log_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "call fill" warning: the loader fills
        out = list(ds.loader(batch_size=8, num_workers=2))
    me = os.getpid()
    assert {int(pid) for pid, rest in log_lines(log)} == {me}
    assert batches(log) == [(me, 4), (me, 8)]  # batch 1: its 4 misses; batch 2: all 8
    assert [b["cached"].tolist() for b in out] == [[True] * 4 + [False] * 4, [False] * 8]
    for b in out:
        for i, feats in zip(b["index"].tolist(), b["features"], strict=True):
            torch.testing.assert_close(feats, expected_features(root, rels[i]))
    assert all(FeatureStore(root, "toy").contains(os.path.join(root, r)) for r in rels)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batch_buffers_are_reused_only_when_nothing_holds_them(data, prefetch):
    root, rels, _ = data
    precompute_some(root, rels)
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    held = list(ds.loader(batch_size=2, prefetch=prefetch))  # every batch kept: no buffer may be refilled
    assert len({b["features"].data_ptr() for b in held}) == 8
    for b in held:
        for i, feats in zip(b["index"].tolist(), b["features"], strict=True):
            torch.testing.assert_close(feats, expected_features(root, rels[i]))
    del held
    seen = {b["features"].data_ptr() for b in ds.loader(batch_size=2, prefetch=prefetch)}
    # Dropped batches give their buffers back. In flight at most: the batch the loop variable still
    # holds, the one being handed over, `prefetch` queued and one being filled (a loaded machine
    # reaches all of them at once).
    assert len(seen) <= 1 + 1 + prefetch + 1 < 8


def test_a_loader_stopped_early_stops_its_prefetch_thread(data):
    import threading

    root, rels, _ = data
    precompute_some(root, rels)
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    for _ in ds.loader(batch_size=2, prefetch=2):
        break
    assert not any(t.name == "featstore-fill" for t in threading.enumerate())


def test_the_dataset_outside_its_loader_still_reads_itself(data):
    """loader() makes its own workers hand reads on; ds[i] and other DataLoaders are unchanged."""
    root, rels, _ = data
    precompute_some(root, rels[::2])
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    next(iter(ds.loader(batch_size=4, num_workers=2)))
    sample = ds[0]
    assert sample["cached"] and set(sample) == {"path", "index", "features", "cached"}
    torch.testing.assert_close(sample["features"], expected_features(root, rels[0]))
    plain = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate)
    for batch in plain:  # workers read into shared memory; odd samples miss and are skipped
        assert batch["cached"].tolist() == [True, False] * 2
        for i, feats in zip(batch["index"].tolist(), batch["features"], strict=True):
            if i % 2:
                assert not feats.any()
            else:
                torch.testing.assert_close(feats, expected_features(root, rels[i]))
