"""Manifests and per-rank journals through the Python bindings."""

import json
import os

import pytest
import torch

from featstore import FeatureStore, ManifestError, _core
from featstore.manifest import indexed_sources


def test_manifest_keeps_the_fields_users_read(tree):
    root, rels = tree
    s = FeatureStore(root, "vggt")
    s.put(rels[0], {"features": torch.zeros(3)})
    path = s.write_manifest(s.status(), rels, fields={"vggt_model_path": "/models/VGGT-1B"})
    assert os.path.basename(path) == "vggt_cache_manifest.json"
    doc = json.load(open(path))
    assert doc["total_images"] == len(rels) and doc["processed_images"] == 1
    assert doc["data_root"] == root and doc["vggt_model_path"] == "/models/VGGT-1B"
    assert doc["cache_format"] == "<image_path>.vggt.safetensors"
    assert doc["format"] == "featstore-manifest-v1" and doc["counts"]["missing"] == len(rels) - 1
    assert "index" not in doc  # in the index's segments: a manifest is small at any size
    assert indexed_sources(FeatureStore(root, "vggt")) == [rels[0]]


def test_journals_merge_into_the_manifest(tmp_path):
    m = str(tmp_path / "pixel_latent_cache_manifest.json")
    j0 = _core.journal_path(m, 0, 2)
    assert os.fspath(j0).endswith(".rank0-of-2.jsonl")
    _core.append_journal(j0, [json.dumps({"op": "ok", "path": "a.jpg", "source": [1, 2], "entry": [3, 4]})])
    _core.append_journal(_core.journal_path(m, 1, 2),
                         [json.dumps({"op": "failed", "path": "b.jpg", "reason": "cannot decode"})])
    with open(_core.journal_path(m, 1, 2), "a") as f:
        f.write('{"op": "ok", "pa')  # torn by a crash
    index_dir = FeatureStore(str(tmp_path), "pixel_latent").index_dir
    assert _core.merge_journals(m, index_dir, json.dumps({"total_images": 2})) == (2, 2, 1, 0)
    doc = json.loads(_core.read_manifest(m))
    assert doc["failures"] == {"b.jpg": "cannot decode"} and doc["processed_images"] == 1
    assert doc["total_images"] == 2 and len(os.listdir(index_dir)) == 1
    assert indexed_sources(FeatureStore(str(tmp_path), "pixel_latent")) == ["a.jpg"]
    assert not os.path.exists(j0)


def test_malformed_manifest_is_a_clear_error(tree):
    root, _ = tree
    with open(os.path.join(root, "vggt_cache_manifest.json"), "w") as f:
        f.write("{oops")
    with pytest.raises(ManifestError, match="vggt_cache_manifest.json"):
        FeatureStore(root, "vggt")
