"""A dataset of images of mixed sizes (issue 14): VGGT's "crop" preprocessing gives other token
counts to other aspect ratios. The training guide's example (docs/guides/training.md) must run on it as written, and a
shape that cannot be batched must be found when the dataset is built, not mid-epoch."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import cli
from PIL import Image

import featstore
from featstore import shapes


def _mixed_tree(root: str) -> list[str]:
    """Landscape, portrait and square images in nested scenes."""
    sizes = [(64, 48), (48, 64), (56, 56), (64, 32), (40, 40), (64, 48)]
    rels = []
    for i, (w, h) in enumerate(sizes):
        rel = f"scene{i % 2}/sub/img_{i:03d}.png"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.new("RGB", (w, h), (40 * i % 255, 90, 160)).save(os.path.join(root, rel))
        rels.append(rel)
    return rels


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("mixed") / "data")
    rels = _mixed_tree(root)
    rc, _, err = cli("precompute", root, "--random-weights", "--batch-size", "2")
    assert rc == 0, err
    return root, rels


def _manifest(root: str) -> dict:
    with open(os.path.join(root, "vggt_cache_manifest.json")) as f:
        return json.load(f)


def test_precompute_records_which_axes_vary(mixed):
    root, _ = mixed
    tensors = _manifest(root)["tensors"]
    assert tensors["features"]["shape"][0] is None  # token counts differ with the aspect ratio
    assert None not in tensors["features"]["shape"][1:]
    assert shapes.padded_names(shapes.from_json(tensors)) == ["features"]


def test_the_training_guide_example_runs_on_mixed_sizes(mixed):
    root, rels = mixed
    samples = [{"image_path": os.path.join(root, r), "i": i} for i, r in enumerate(rels)]
    store = featstore.FeatureStore(root, "vggt")
    ds = featstore.CachedDataset(samples, store, path_fn=lambda s: s["image_path"])
    assert ds.pad == ("features",)
    assert "padded features" in ds.describe()
    seen = 0
    for batch in ds.loader(batch_size=4, num_workers=2, shuffle=True):
        feats, mask = batch["features"], batch["features_mask"]
        assert feats.shape[:2] == mask.shape and mask.dtype == torch.bool
        for row, i in enumerate(batch["i"].tolist()):
            want = store.get(rels[i])["features"]
            n = int(mask[row].sum())
            assert n == want.shape[0] and bool(mask[row, :n].all())
            assert torch.equal(feats[row, :n], want)
            assert not feats[row, n:].any()
        seen += len(batch["i"])
    assert seen == len(rels)


def test_a_tensor_left_out_of_pad_is_refused_when_the_dataset_is_built(mixed):
    root, rels = mixed
    store = featstore.FeatureStore(root, "vggt")
    with pytest.raises(ValueError, match=r"'features': its first axis differs.*pad='auto'.*--mode pad"):
        featstore.CachedDataset(rels, store, paths=rels, pad=[])


def test_shapes_that_differ_beyond_the_first_axis_are_refused_when_built(tmp_path):
    root = str(tmp_path / "data")
    rels = _mixed_tree(root)
    store = featstore.FeatureStore(root, "maps", fingerprint="fp")
    from featstore.manifest import merge_journals
    log = store.manifest_path + ".rank0-of-1.shapes.json"
    summary: shapes.Shapes = {}
    shapes.observe(summary, [("map", "F32", (3, 4, 5))])
    shapes.observe(summary, [("map", "F32", (3, 6, 5))])
    os.makedirs(os.path.dirname(store.manifest_path), exist_ok=True)
    with open(log, "w") as f:
        json.dump({"fingerprint": "fp", "tensors": shapes.to_json(summary)}, f)
    assert merge_journals(store, {"fingerprint": "fp"}) == 0
    assert not os.path.exists(log)
    with pytest.raises(ValueError, match=r"'map': its shape \[3, \*, 5\] differs between entries beyond the first"):
        featstore.CachedDataset(rels, store, paths=rels)


def test_a_fixed_size_cache_is_not_padded(tmp_path):
    root = str(tmp_path / "data")
    rels = _mixed_tree(root)
    rc, _, err = cli("precompute", root, "--random-weights", "--mode", "pad")
    assert rc == 0, err
    assert _manifest(root)["tensors"]["features"]["shape"][0] is not None
    ds = featstore.CachedDataset(rels, featstore.FeatureStore(root, "vggt"), paths=rels)
    assert ds.pad == ()
    batch = next(iter(ds.loader(batch_size=len(rels))))
    assert batch["cached"].all()
    assert batch["features"].shape[:2] == (len(rels), 1369) and "features_mask" not in batch


def test_a_changed_configuration_drops_the_old_summary(mixed, tmp_path):
    root, _ = mixed
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    rc, _, err = cli("precompute", copy, "--random-weights", "--mode", "pad")
    assert rc == 0, err
    # Every entry was replaced by one of the fixed-size configuration: nothing varies any more.
    assert _manifest(copy)["tensors"]["features"]["shape"][0] is not None


def test_entries_from_before_the_summary_are_read_once(mixed, tmp_path):
    """A manifest without a summary (an earlier featstore): the next run reads the headers of the
    entries it leaves alone, so the summary covers them too."""
    root, _ = mixed
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    path = os.path.join(copy, "vggt_cache_manifest.json")
    doc = _manifest(copy)
    del doc["tensors"]
    with open(path, "w") as f:
        json.dump(doc, f)
    rc, out, err = cli("precompute", copy, "--random-weights")
    assert rc == 0, err
    assert _manifest(copy)["tensors"]["features"]["shape"][0] is None
