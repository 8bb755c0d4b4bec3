"""CachedDataset in read mode (misses computed live, skipped, or an error) and with the cache off
(the store never touched)."""

from __future__ import annotations

import os

import pytest
import torch
from toy_datasets import Images, LoggedFactory, source_of
from toy_encoders import MeanColor

from featstore import CachedDataset, FeatstoreError, FeatureStore, StaleEntryError

from .conftest import expected_features, precompute_some

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


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


def test_cache_off_with_on_miss_error_computes_or_skips(data):
    root, rels, _ = data
    ds = CachedDataset(Images(root, rels), None, path_fn=source_of, use_cache=False, on_miss="error",
                       log_start=False)
    assert ds[0]["cached"] is False and "features" not in ds[0]


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
