"""CachedDataset with history_fn: a sample's features are its history entry, read with stable batch
keys, and in lazy mode a missing one is computed with one causal pass over its list that writes
the entry of every missing prefix it went through."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image
from toy_datasets import CausalFactory, Histories, frames_of
from toy_encoders import CausalMean, MeanColor, causal_mean_features

from featstore import CachedDataset, FeatstoreError, FeatureStore
from featstore.history import history_entry_files

from .conftest import age, log_lines

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture
def episodes(data):
    """Two episodes of 6 and 4 frames (scene directories of the image tree); every step of each
    is a sample (its history: the frames up to it)."""
    root, rels, log = data
    first = [r for r in rels if r.startswith("scene000/")][:6]
    second = [r for r in rels if r.startswith("scene001/")][:4]
    lists = [first[:k] for k in range(1, 7)] + [second[:k] for k in range(1, 5)]
    return root, first, second, lists, log


def _store(root: str) -> FeatureStore:
    return FeatureStore(root, "toy", fingerprint=CausalMean().fingerprint())


def _put(store: FeatureStore, root: str, frames: list[str]) -> None:
    store.put_history(frames, {"features": causal_mean_features(root, frames)})


def test_read_mode_serves_history_entries_and_zeros_for_misses_with_stable_keys(episodes):
    root, first, second, lists, _ = episodes
    store = _store(root)
    cached = {0, 2, 5, 7}  # some steps of both episodes
    for i in cached:
        _put(store, root, lists[i])
    ds = CachedDataset(Histories(root, lists), store, history_fn=frames_of, log_start=False)
    assert ds.on_miss == "skip"
    for i, frames in enumerate(lists):
        sample = ds[i]
        assert sample["cached"] == (i in cached)
        want = causal_mean_features(root, frames) if i in cached else torch.zeros(96)
        torch.testing.assert_close(sample["features"], want)

    # Batches: one batch tensor per name, the same keys whether no row, some or all hit.
    for rows in ([0, 2, 5], [1, 3, 4], [0, 1, 7]):
        batch = ds.collate(ds.__getitems__(rows))
        assert set(batch) == {"frames", "index", "features", "cached"}
        assert batch["features"].shape == (3, 96) and batch["cached"].tolist() == [r in cached for r in rows]
        for j, r in enumerate(rows):
            if r in cached:
                torch.testing.assert_close(batch["features"][j], causal_mean_features(root, lists[r]))
            else:
                assert not batch["features"][j].any()
    plain = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate))
    assert [b["cached"].tolist() for b in plain] == [[True, False, True, False], [False, True, False, True],
                                                     [False, False]]
    for loader in (ds.loader(batch_size=4), ds.loader(batch_size=4, num_workers=2)):
        got = list(loader)
        assert [set(b) for b in got] == [{"frames", "index", "features", "cached"}] * 3
        assert torch.cat([b["cached"] for b in got]).tolist() == [i in cached for i in range(len(lists))]
        for b in got:
            for j, i in enumerate(b["index"].tolist()):
                if i in cached:
                    torch.testing.assert_close(b["features"][j], causal_mean_features(root, lists[i]))


def test_a_history_entry_is_never_served_for_another_order_or_another_list(episodes):
    root, first, _, _, _ = episodes
    store = _store(root)
    _put(store, root, first[:3])
    assert store.get_history(first[:3]) is not None
    swapped = [first[1], first[0], first[2]]
    ds = CachedDataset(Histories(root, [first[:3], swapped, first[:2]]), store, history_fn=frames_of,
                       log_start=False)
    assert [ds[i]["cached"] for i in range(3)] == [True, False, False]


def test_lazy_computes_a_miss_in_one_pass_and_writes_every_missing_prefix(episodes):
    root, first, _, _, _ = episodes
    # Samples name only some steps of the episode: 2, 4 and 6 frames.
    lists = [first[:2], first[:4], first[:6]]
    store = _store(root)
    enc = CausalMean()
    ds = CachedDataset(Histories(root, lists), store, history_fn=frames_of, encoder=enc, mode="lazy",
                       log_start=False)
    sample = ds[2]
    assert not sample["cached"]
    torch.testing.assert_close(sample["features"], causal_mean_features(root, first))
    assert (enc.history_calls, enc.frames_fed) == (1, 6)  # one pass over the 6 frames
    # ... which wrote the entry of every prefix it passed through, named by a sample or not.
    assert [store.history_state(first[:k]) for k in range(1, 7)] == ["valid"] * 6
    assert len(history_entry_files(store)) == 6
    for k in range(1, 7):
        torch.testing.assert_close(store.get_history(first[:k])["features"], causal_mean_features(root, first[:k]))
    assert [ds[i]["cached"] for i in range(3)] == [True, True, True]
    assert enc.history_calls == 1  # nothing computed again
    assert os.path.exists(store.manifest_path)  # records the fingerprint and the mode for status


def test_lazy_batch_shares_one_pass_among_prefixes_and_streams_lists_together(episodes):
    root, first, second, lists, _ = episodes
    enc = CausalMean()
    ds = CachedDataset(Histories(root, lists), _store(root), history_fn=frames_of, encoder=enc, mode="lazy",
                       log_start=False)
    batch = ds.collate(ds.__getitems__(list(range(len(lists)))))
    # Every sample is a prefix of one of the two episodes: one pass per episode (of 6 and 4
    # frames), not one per sample.
    assert enc.history_calls == 2 and enc.frames_fed == 10
    assert not batch["cached"].any()
    for j, frames in enumerate(lists):
        torch.testing.assert_close(batch["features"][j], causal_mean_features(root, frames))
    again = ds.collate(ds.__getitems__(list(range(len(lists)))))
    assert again["cached"].all() and enc.history_calls == 2


def _repaint(path: str) -> None:
    """Another picture at the same path (another size and mtime: its stamp moves)."""
    with Image.open(path) as im:
        fmt, size = im.format, im.size
    pixels = np.random.default_rng(7).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    age(path, 50)


def test_an_edited_frame_recomputes_exactly_the_samples_holding_it(episodes):
    root, first, _, _, _ = episodes
    lists = [first[:k] for k in range(1, 7)]
    store = _store(root)
    enc = CausalMean()
    ds = CachedDataset(Histories(root, lists), store, history_fn=frames_of, encoder=enc, mode="lazy",
                       log_start=False)
    ds.__getitems__(list(range(6)))
    assert (enc.history_calls, enc.frames_fed) == (1, 6)

    _repaint(os.path.join(root, first[3]))
    assert [store.history_state(f) for f in lists] == ["valid"] * 3 + ["missing"] * 3
    batch = ds.collate(ds.__getitems__(list(range(6))))
    assert batch["cached"].tolist() == [True, True, True, False, False, False]
    assert (enc.history_calls, enc.frames_fed) == (2, 12)  # one pass over the longest list
    for j, frames in enumerate(lists):
        torch.testing.assert_close(batch["features"][j], causal_mean_features(root, frames))
    assert [store.history_state(f) for f in lists] == ["valid"] * 6


def test_lazy_never_writes_an_entry_of_a_frame_edited_while_it_was_encoded(episodes):
    root, first, _, _, _ = episodes

    class EditsFrameTwo(CausalMean):
        def encode_history(self, batch):
            _repaint(os.path.join(root, first[2]))
            return super().encode_history(batch)

    store = _store(root)
    ds = CachedDataset(Histories(root, [first[:4]]), store, history_fn=frames_of, encoder=EditsFrameTwo(),
                       mode="lazy", log_start=False)
    with pytest.warns(UserWarning, match="could not store"):
        ds[0]
    # The prefixes before the edited frame were written; none holding it was.
    assert [store.history_state(first[:k]) for k in range(1, 5)] == ["valid", "valid", "missing", "missing"]
    assert len(history_entry_files(store)) == 2


def test_read_mode_computes_misses_live_without_writing(episodes):
    root, first, _, lists, _ = episodes
    store = _store(root)
    enc = CausalMean()
    ds = CachedDataset(Histories(root, lists), store, history_fn=frames_of, encoder=enc, log_start=False)
    batch = ds.collate(ds.__getitems__([0, 3, 5]))
    assert enc.history_calls == 1 and enc.frames_fed == 6  # prefixes of one list: one pass
    for j, i in enumerate([0, 3, 5]):
        torch.testing.assert_close(batch["features"][j], causal_mean_features(root, lists[i]))
    assert history_entry_files(store) == []


def test_lazy_dataloader_with_two_workers_computes_then_reads(episodes):
    root, first, second, lists, log = episodes
    ds = CachedDataset(Histories(root, lists), _store(root), history_fn=frames_of, encoder=CausalFactory(log),
                       mode="lazy", log_start=False)
    ctx = multiprocessing.get_context("fork")

    def epoch() -> list[dict]:
        return list(ds.loader(batch_size=6, num_workers=2, multiprocessing_context=ctx))

    first_epoch = epoch()
    passes = [line[1].split() for line in log_lines(log) if line[1].startswith("history")]
    # Each worker's batch is one episode: one pass each, of its 6 and 4 frames.
    assert sorted(passes) == [["history", "1", "4"], ["history", "1", "6"]]
    assert not any(c for b in first_epoch for c in b["cached"].tolist())
    second_epoch = epoch()
    assert all(c for b in second_epoch for c in b["cached"].tolist())
    assert len([line for line in log_lines(log) if line[1].startswith("history")]) == len(passes)
    for b in second_epoch:
        for j, i in enumerate(b["index"].tolist()):
            torch.testing.assert_close(b["features"][j], causal_mean_features(root, lists[i]))


def test_history_fn_arguments_and_the_off_mode(episodes):
    root, first, _, lists, _ = episodes
    base = Histories(root, lists)
    with pytest.raises(ValueError, match="history_fn names each sample's frames"):
        CachedDataset(base, _store(root), history_fn=frames_of, path_fn=frames_of, log_start=False)
    line = CachedDataset(base, _store(root), history_fn=frames_of, encoder=CausalMean(), log_start=False).describe()
    assert "history entries" in line and "mode read" in line
    with pytest.raises(FeatstoreError, match="encode_history"):
        CachedDataset(base, FeatureStore(root, "toy"), history_fn=frames_of, encoder=MeanColor(), mode="lazy",
                      log_start=False)[0]
    enc = CausalMean()
    off = CachedDataset(base, _store(root), history_fn=frames_of, encoder=enc, use_cache=False, log_start=False)
    sample = off[3]
    assert not sample["cached"] and enc.history_calls == 1
    torch.testing.assert_close(sample["features"], causal_mean_features(root, lists[3]))
    assert history_entry_files(_store(root)) == []


def test_lazy_with_the_vggt_history_encoder_costs_one_frame_pass_per_frame(episodes):
    from featstore.encoders import VGGTEncoder

    root, first, _, _, _ = episodes
    try:
        enc = VGGTEncoder(random_weights_seed=0, history=True)
    except TypeError:
        pytest.skip("VGGTEncoder has no history mode here")
    ds = CachedDataset(Histories(root, [first[:1], first[:3]]), FeatureStore(root, "vggt"), history_fn=frames_of,
                       encoder=enc, mode="lazy", log_start=False)
    assert not ds[1]["cached"] and enc.frame_passes == 3
    assert ds[0]["cached"] and enc.frame_passes == 3  # the pass wrote the 1-frame prefix too
    store = FeatureStore(root, "vggt")
    batch = torch.stack([enc.preprocess(os.path.join(root, f)) for f in first[:3]])[None].float() / 255
    with torch.inference_mode():
        want = enc.encode_history(batch)["features"][0]
    for k in (1, 2, 3):
        torch.testing.assert_close(store.get_history(first[:k])["features"], want[k - 1])


def test_lazy_with_a_reversed_encoder_computes_each_needed_prefix_once(episodes):
    """Reversed order feeds each prefix last to first: every prefix is its own pass, so lazy
    mode computes the prefixes the samples name, each once, not every missing prefix of the list."""
    from featstore.encoders import VGGTEncoder

    root, first, _, _, _ = episodes
    enc = VGGTEncoder(random_weights_seed=0, history=True, reverse=True)
    ds = CachedDataset(Histories(root, [first[:2], first[:4]]), FeatureStore(root, "vggt"), history_fn=frames_of,
                       encoder=enc, mode="lazy", log_start=False)
    assert not ds[0]["cached"] and enc.frame_passes == 2
    batch = ds.collate(ds.__getitems__([0, 1]))
    assert batch["cached"].tolist() == [True, False]
    assert enc.frame_passes == 2 + 4  # the 4-frame prefix alone, not 1, 3 and 2 again (16 in all)
    assert ds.collate(ds.__getitems__([0, 1]))["cached"].all() and enc.frame_passes == 6
