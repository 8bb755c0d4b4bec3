"""CachedDataset: read / lazy / off modes, DataLoader workers, misses handed to the main process,
mixed and padded batches, and the zero-copy batch path."""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from collections import Counter

import pytest
import torch
from conftest import age
from toy_datasets import Images, LoggedFactory, source_of
from toy_encoders import MeanColor

from featstore import CacheArguments, CachedDataset, FeatstoreError, FeatureStore, StaleEntryError, collate
from featstore.examples import make_image_tree

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

# ----------------------------------------------------------------------------------- helpers
def log_lines(log: str) -> list[list[str]]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [line.split(" ", 1) for line in f.read().splitlines()]


def decoded(log: str) -> Counter:
    """How many times each path was decoded for encoding."""
    return Counter(rest for _, rest in log_lines(log) if not rest.startswith(("batch", "built", "epoch")))


def built(log: str) -> int:
    return sum(rest == "built" for _, rest in log_lines(log))


def batches(log: str) -> list[tuple[int, int]]:
    """(pid, size) of each encoder call."""
    return [(int(pid), int(rest.split()[1])) for pid, rest in log_lines(log) if rest.startswith("batch")]


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 16, size=32)
    for rel in rels:
        age(os.path.join(root, rel))
    return root, rels, str(tmp_path / "encoder.log")


def expected_features(root: str, rel: str) -> torch.Tensor:
    enc = MeanColor()
    return enc.encode(enc.preprocess(os.path.join(root, rel))[None].float() / 255)["features"][0]


def precompute_some(root: str, rels: list[str]) -> FeatureStore:
    store = FeatureStore(root, "toy", fingerprint=MeanColor().fingerprint())
    for rel in rels:
        store.put(rel, {"features": expected_features(root, rel)})
    return store


# ----------------------------------------------------------------------------------- lazy mode
@pytest.mark.parametrize("start_method,workers", [("fork", 4), ("spawn", 2)])
def test_lazy_two_epochs_four_workers_compute_each_entry_once(data, start_method, workers):
    root, rels, log = data
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                       encoder=LoggedFactory(log), mode="lazy", log_start=False)
    ctx = multiprocessing.get_context(start_method)

    def epoch() -> list[dict]:
        return list(ds.loader(batch_size=2, num_workers=workers, shuffle=True, multiprocessing_context=ctx))

    first = epoch()
    assert all(not c for b in first for c in b["cached"].tolist())
    assert decoded(log) == Counter(os.path.join(root, r) for r in rels)  # each entry exactly once
    assert 1 <= built(log) <= workers  # the factory ran in the workers that met a miss, nowhere else
    lines = len(log_lines(log))

    second = epoch()
    assert all(c for b in second for c in b["cached"].tolist())
    assert len(log_lines(log)) == lines  # nothing computed, the encoder never built
    for b in second:
        for i, feats in zip(b["index"].tolist(), b["features"], strict=True):
            torch.testing.assert_close(feats, expected_features(root, rels[i]))


def test_workers_meeting_the_same_missing_entry_compute_it_once(data):
    root, rels, log = data
    same = Images(root, [rels[0]] * 16)  # every sample is the same image
    ds = CachedDataset(same, FeatureStore(root, "toy"), path_fn=source_of, encoder=LoggedFactory(log),
                       mode="lazy", log_start=False)
    out = list(ds.loader(batch_size=1, num_workers=4))
    assert decoded(log) == Counter({os.path.join(root, rels[0]): 1})
    assert sum(not b["cached"][0] for b in out) == 1  # one computed; the others read its entry
    for b in out:
        torch.testing.assert_close(b["features"][0], expected_features(root, rels[0]))


def _lazy_pass(root: str, rels: list[str], log: str, rank: int, start=None) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    if start is not None:
        start.wait()  # both ranks start together
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                       encoder=LoggedFactory(log), mode="lazy", log_start=False)
    order = list(range(len(rels)))
    if rank:
        order.reverse()  # the ranks meet in the middle, at the same entries
    for i in order:
        ds[i]


def run_ranks(target, args_of_each: list[tuple]) -> None:
    """Runs one forked process per argument tuple, as ranks of a job; each must exit cleanly."""
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=target, args=args) for args in args_of_each]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
        assert p.exitcode == 0


def test_ranks_never_recompute_what_another_rank_wrote(data):
    """Two processes (as two DDP ranks) lazily caching the same dataset at the same time compute
    each entry once between them; a later rank computes nothing."""
    root, rels, log = data
    start = multiprocessing.get_context("fork").Barrier(2)
    run_ranks(_lazy_pass, [(root, rels, log, r, start) for r in (0, 1)])
    assert decoded(log) == Counter(os.path.join(root, r) for r in rels)
    assert len({pid for pid, rest in log_lines(log) if rest.startswith("/")}) == 2  # both computed some
    lines = len(log_lines(log))
    _lazy_pass(root, rels, log, 0)
    assert len(log_lines(log)) == lines


def _ddp_rank(rank: int, port: int, root: str, rels: list[str], log: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                       encoder=LoggedFactory(log), mode="lazy", log_start=False)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
    loader = ds.loader(batch_size=2, sampler=sampler, num_workers=1)
    for epoch in range(2):
        sampler.set_epoch(epoch)  # epoch 2 gives each rank samples the other rank cached
        with open(log, "a") as f:
            f.write(f"{os.getpid()} epoch {epoch}\n")
        for _ in loader:
            pass
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_ranks_never_re_encode_what_another_rank_wrote(data):
    import socket

    root, rels, log = data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_ddp_rank, [(r, port, root, rels, log) for r in (0, 1)])
    assert decoded(log) == Counter(os.path.join(root, r) for r in rels)
    epoch_two = [i for i, (_, rest) in enumerate(log_lines(log)) if rest == "epoch 1"]
    assert len(epoch_two) == 2
    after = log_lines(log)[min(epoch_two):]
    assert not [rest for _, rest in after if not rest.startswith("epoch")]  # epoch 2 encoded nothing


def test_corrupt_and_stale_entries_are_recomputed_never_served(data):
    root, rels, log = data
    store = precompute_some(root, rels)
    corrupt, edited = rels[1], rels[2]
    with open(store.entry_path(corrupt), "r+b") as f:
        f.truncate(40)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(os.path.join(root, edited))
    age(os.path.join(root, edited))

    read = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the store warns once per kind of miss
        samples = [read[i] for i in range(len(rels))]
    assert [s["cached"] for s in samples] == [r not in (corrupt, edited) for r in rels]
    assert "features" not in samples[1] and "features" not in samples[2]  # skipped, not served

    lazy = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                         encoder=LoggedFactory(log), mode="lazy", log_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(lazy.loader(batch_size=len(rels))))
    assert set(decoded(log)) == {os.path.join(root, corrupt), os.path.join(root, edited)}
    assert batch["cached"].tolist() == [r not in (corrupt, edited) for r in rels]
    torch.testing.assert_close(batch["features"][2], expected_features(root, edited))  # the new image's
    assert store.contains(corrupt) and store.contains(edited)


# ----------------------------------------------------------------------------------- off
class Untouchable:
    """A store that fails the test when anything but its data root is used."""

    def __init__(self, root: str) -> None:
        self.data_root = root

    def __getattr__(self, name: str):
        raise AssertionError(f"the store was used (.{name}) with the cache off")


@pytest.mark.parametrize("how", ["argument", "USE_VGGT_CACHE", "FEATSTORE_USE_CACHE"])
def test_cache_off_never_touches_the_store(data, monkeypatch, how):
    root, rels, log = data
    kwargs = {"use_cache": False} if how == "argument" else {}
    if how != "argument":
        monkeypatch.setenv(how, "false")
    live = CachedDataset(Images(root, rels), Untouchable(root), path_fn=source_of, encoder=LoggedFactory(log),
                         log_start=False, **kwargs)
    assert live.mode == "off"
    batch = next(iter(live.loader(batch_size=4, num_workers=2)))
    assert batch["cached"].tolist() == [False] * 4
    torch.testing.assert_close(batch["features"][0], expected_features(root, rels[0]))
    bare = CachedDataset(Images(root, rels), Untouchable(root), path_fn=source_of, log_start=False, **kwargs)
    assert set(bare[0]) == {"path", "index", "cached"}
    assert not any(name.endswith(".safetensors") for _, _, files in os.walk(root) for name in files)


def test_env_switch_that_is_neither_true_nor_false_is_an_error(data, monkeypatch):
    root, rels, _ = data
    monkeypatch.setenv("USE_VGGT_CACHE", "ture")
    with pytest.raises(ValueError, match="USE_VGGT_CACHE='ture'"):
        CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of)


# ----------------------------------------------------------------------------------- read mode
def test_mixed_batches_collate_with_cached_as_the_mask(data):
    root, rels, log = data
    precompute_some(root, rels[::2])
    skip = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    batch = next(iter(skip.loader(batch_size=8, num_workers=2)))
    cached = batch["cached"].tolist()
    assert cached == [True, False] * 4
    for j in range(8):
        if cached[j]:
            torch.testing.assert_close(batch["features"][j], expected_features(root, rels[j]))
        else:
            assert not batch["features"][j].any()

    live = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                         encoder=LoggedFactory(log), log_start=False)
    batch = next(iter(live.loader(batch_size=8, num_workers=2)))
    assert batch["cached"].tolist() == [True, False] * 4
    for j in range(8):
        torch.testing.assert_close(batch["features"][j], expected_features(root, rels[j]))
    assert FeatureStore(root, "toy").states([os.path.join(root, r) for r in rels[1:8:2]]) == ["missing"] * 4


def test_a_miss_can_be_an_error_that_names_the_source(data):
    root, rels, _ = data
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, on_miss="error",
                       log_start=False)
    with pytest.raises(StaleEntryError, match=rels[0].replace(".", r"\.")):
        ds[0]


def test_live_features_can_take_part_in_autograd(data):
    """Live features come from inference mode; the dataset hands out normal tensors."""
    root, rels, _ = data
    ds = CachedDataset(Images(root, rels), None, path_fn=source_of, encoder=MeanColor, use_cache=False,
                       log_start=False)
    layer = torch.nn.Linear(48, 1)
    layer(ds[0]["features"]).sum().backward()
    assert layer.weight.grad is not None


def test_the_encoder_must_match_the_fingerprint_the_store_checks(data):
    root, rels, _ = data
    store = FeatureStore(root, "toy", fingerprint="toy-v0")
    ds = CachedDataset(Images(root, rels), store, path_fn=source_of, encoder=MeanColor, mode="lazy", log_start=False)
    with pytest.raises(FeatstoreError, match="toy-v1.*toy-v0"):
        ds[0]


# ----------------------------------------------------------------------------------- main-process misses
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


# ----------------------------------------------------------------------------------- batches
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


# ----------------------------------------------------------------------------------- start line, arguments
def test_start_line_says_what_is_on(data, caplog, capsys):
    root, rels, _ = data
    precompute_some(root, rels[:5])
    paths = [os.path.join(root, r) for r in rels]
    with caplog.at_level(logging.INFO, logger="featstore"):
        CachedDataset(Images(root, rels), FeatureStore(root, "toy"), paths=paths)
        CachedDataset(Images(root, rels), None, paths=paths, use_cache=False)
    assert caplog.messages == [
        "feature cache enabled: feature toy, layout sidecar, 5 of 16 cached, mode read",
        "feature cache disabled (use_cache=False): samples come without features"]


def test_cache_arguments_read_the_old_switch_and_parse_as_training_arguments(monkeypatch):
    monkeypatch.setenv("USE_VGGT_CACHE", "false")
    assert CacheArguments().use_cache is False
    monkeypatch.setenv("USE_VGGT_CACHE", "true")
    assert CacheArguments().use_cache is True
    transformers = pytest.importorskip("transformers")
    (args,) = transformers.HfArgumentParser(CacheArguments).parse_args_into_dataclasses(
        ["--use_cache", "false", "--cache_mode", "lazy"])
    assert (args.use_cache, args.cache_mode) == (False, "lazy")


def test_bad_arguments_are_clear(data):
    root, rels, _ = data
    store = FeatureStore(root, "toy")
    with pytest.raises(ValueError, match="encoder="):
        CachedDataset(Images(root, rels), store, path_fn=source_of, mode="lazy")
    with pytest.raises(ValueError, match="path_fn"):
        CachedDataset(Images(root, rels), store)
    with pytest.raises(ValueError, match="mode 'sometimes'"):
        CachedDataset(Images(root, rels), store, path_fn=source_of, mode="sometimes")
    with pytest.raises(ValueError, match="needs a FeatureStore"):
        CachedDataset(Images(root, rels), None, path_fn=source_of)


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
    assert len(seen) <= 1 + prefetch + 1 < 8  # dropped batches give their buffers back


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


def test_cache_off_with_on_miss_error_computes_or_skips(data):
    root, rels, _ = data
    ds = CachedDataset(Images(root, rels), None, path_fn=source_of, use_cache=False, on_miss="error",
                       log_start=False)
    assert ds[0]["cached"] is False and "features" not in ds[0]


def test_a_lazily_cached_feature_records_its_fingerprint(data):
    """Without a manifest a store checks no fingerprint; lazy writes give it one, so a run with
    another encoder configuration is told instead of served the old features."""
    root, rels, _ = data
    lazy = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, encoder=MeanColor,
                         mode="lazy", log_start=False)
    lazy[0]
    assert FeatureStore(root, "toy").fingerprint == MeanColor().fingerprint()
    other = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                          encoder=lambda: MeanColor(tag="v2"), mode="lazy", log_start=False)
    with pytest.raises(FeatstoreError, match="toy-v2.*toy-v1"):
        other[1]
