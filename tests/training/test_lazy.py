"""CachedDataset in lazy mode: each missing, stale or corrupt entry computed once across workers,
ranks and epochs, and written with the encoder's fingerprint."""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import Counter

import pytest
import torch
from toy_datasets import Images, LoggedFactory, source_of
from toy_encoders import MeanColor

from featstore import CachedDataset, FeatstoreError, FeatureStore

from .conftest import age, built, decoded, expected_features, log_lines, precompute_some

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


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
    # The factory ran in the workers that met a miss, and once in the main process when the dataset
    # was built: no manifest sums up the entries' shapes, so the encoder is asked which outputs vary.
    assert 1 <= built(log) <= workers + 1
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
    assert not samples[1]["features"].any() and not samples[2]["features"].any()  # skipped: zeros, not served

    lazy = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of,
                         encoder=LoggedFactory(log), mode="lazy", log_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(lazy.loader(batch_size=len(rels))))
    assert set(decoded(log)) == {os.path.join(root, corrupt), os.path.join(root, edited)}
    assert batch["cached"].tolist() == [r not in (corrupt, edited) for r in rels]
    torch.testing.assert_close(batch["features"][2], expected_features(root, edited))  # the new image's
    assert store.contains(corrupt) and store.contains(edited)


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
