"""CachedDataset's arguments and start line, and CacheArguments for training scripts."""

from __future__ import annotations

import logging
import os

import pytest
from toy_datasets import Images, source_of

from featstore import CacheArguments, CachedDataset, FeatureStore

from .conftest import precompute_some


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
