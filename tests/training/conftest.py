"""Shared pieces of the CachedDataset tests: an aged image tree, the features the toy encoder
gives, a partly precomputed store, and the log of the encoder's work across processes."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from conftest import age  # tests/conftest.py, loaded just before this package's conftest
from toy_encoders import MeanColor

from featstore import FeatureStore
from featstore.examples import make_image_tree


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
