"""A killed run's journal never makes another encoder configuration's entries look valid, and a
damaged manifest's advice, when followed, never loosens a check."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from toy_encoders import MeanColor

from featstore import FeatureStore, ManifestError, ops
from featstore.examples import make_image_tree
from featstore.pipeline import precompute


def run(root: str, enc: MeanColor, **kw):
    return precompute(root, encoder=enc, num_workers=0, progress=False, **kw)


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    return root, make_image_tree(root, 6, size=32)


def test_a_killed_runs_journal_does_not_index_its_entries_for_another_encoder(data, monkeypatch):
    root, rels = data
    # Run A writes every entry and its journal lines, then dies before merging them.
    monkeypatch.setattr("featstore.pipeline.run.finish_manifest", lambda plan: None)
    run(root, MeanColor(tag="a"))
    assert FeatureStore(root, "toy").journal_paths()
    monkeypatch.undo()
    # Run B, another configuration, does the first two images and merges every journal it finds.
    b = MeanColor(tag="b")
    run(root, b, end_idx=2)
    store = FeatureStore(root, "toy")
    assert store.fingerprint == b.fingerprint()
    states = store.states(rels)
    assert states[:2] == ["valid", "valid"]
    assert states[2:] == ["foreign"] * 4, states
    assert not any(store.contains(r) for r in rels[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.get(rels[2]) is None
    status = ops.status(store, rels)
    assert status.status.counts["valid"] == 2 and status.status.counts["foreign"] == 4
    # B's full run recomputes A's entries instead of skipping them as already valid.
    assert run(root, b)["written"] == 4
    assert FeatureStore(root, "toy").states(rels) == ["valid"] * 6


def test_following_a_damaged_manifests_advice_never_serves_another_encoders_entry(data):
    root, rels = data
    a = MeanColor(tag="a")
    run(root, a)
    FeatureStore(root, "toy", fingerprint="other").put(rels[0], {"features": torch.zeros(48)})
    manifest = FeatureStore(root, "toy").manifest_path
    with open(manifest, "w") as f:
        f.write("{ damaged")
    with pytest.raises(ManifestError) as info:
        FeatureStore(root, "toy")
    advice = str(info.value)
    assert manifest in advice and "move it aside" in advice and "featstore precompute" in advice
    assert "status" not in advice  # status writes no manifest: it would not be true advice
    # Followed: moved aside, then (before the rerun) a reader opens the store without a fingerprint.
    os.rename(manifest, manifest + ".damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for order in (rels, rels[::-1]):  # whichever entry is read first decides nothing
            reader = FeatureStore(root, "toy")
            assert [reader.get(r) for r in order] == [None] * 6
        assert reader.states(rels) == ["foreign"] * 6
        # The fingerprint given (the encoder's) serves its own entries, never the other one.
        given = FeatureStore(root, "toy", fingerprint=a.fingerprint())
        assert [given.get(r) is not None for r in rels] == [False] + [True] * 5
    # The rerun the advice names rebuilds the manifest and recomputes the other encoder's entry.
    assert run(root, a)["written"] == 1
    assert json.loads(open(manifest).read())["fingerprint"] == a.fingerprint()
    assert FeatureStore(root, "toy").states(rels) == ["valid"] * 6
