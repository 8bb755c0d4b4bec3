"""Every input is recorded as the encoder read it, and the planner compares what the encoder
would read now: a caption edited while it is encoded, a caption file the rule now prefers, a
caption given as text that changed, and the feature's own entries offered as sources."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image
from toy_encoders import CaptionLength, MeanColor

from featstore import FeatureStore
from featstore.pipeline import precompute
from featstore.training import CachedDataset


def images(root: str, names: list[str]) -> None:
    os.makedirs(root, exist_ok=True)
    for i, n in enumerate(names):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(os.path.join(root, n))


def write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run(root: str, enc, **kw):
    return precompute(root, encoder=enc, num_workers=0, progress=False, **kw)


def features(root: str, rel: str) -> list[float]:
    got = FeatureStore(root, "caption").get(rel)
    assert got is not None, f"no valid entry for {rel}"
    return got["features"].tolist()


def test_a_caption_edited_while_it_is_encoded_gets_no_entry_then_the_new_text(tmp_path):
    root = str(tmp_path)
    images(root, ["a.png"])
    write(os.path.join(root, "a.txt"), "a cat")
    edit = lambda path: write(os.path.join(root, "a.txt"), "a much longer dog")  # noqa: E731
    first = run(root, CaptionLength(after_read=edit))
    assert first["written"] == 0 and first["failed"] == 1, first
    assert "changed" in str(first["failures"])
    assert FeatureStore(root, "caption").state("a.png") == "missing"
    assert run(root, CaptionLength())["written"] == 1
    assert features(root, "a.png") == [len("a much longer dog"), ord("a")]


def test_lazy_training_never_stores_the_old_captions_features(tmp_path):
    root = str(tmp_path)
    images(root, ["a.png"])
    write(os.path.join(root, "a.txt"), "a cat")
    edit = lambda path: write(os.path.join(root, "a.txt"), "a much longer dog")  # noqa: E731
    store = FeatureStore(root, "caption")
    ds = CachedDataset([{"image": "a.png"}], store, path_fn=lambda s: s["image"], mode="lazy",
                       encoder=lambda: CaptionLength(after_read=edit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[0]
    assert FeatureStore(root, "caption").state("a.png") == "missing"


def test_a_caption_file_the_rule_now_prefers_makes_the_entry_stale(tmp_path):
    root = str(tmp_path)
    images(root, ["a.png"])
    write(os.path.join(root, "a.png.txt"), "a cat")
    assert run(root, CaptionLength())["written"] == 1
    write(os.path.join(root, "a.txt"), "a much longer dog")
    assert FeatureStore(root, "caption").state("a.png") == "stale"
    assert run(root, CaptionLength())["written"] == 1
    assert features(root, "a.png") == [len("a much longer dog"), ord("a")]


def test_a_caption_given_as_text_that_changed_is_recomputed(tmp_path):
    root = str(tmp_path)
    images(root, ["a.png", "b.png"])
    captions = {"a.png": "a cat", "b.png": "a dog"}
    assert run(root, CaptionLength(captions))["written"] == 2
    assert run(root, CaptionLength(captions))["written"] == 0
    captions["a.png"] = "a much longer cat"
    again = run(root, CaptionLength(captions))
    assert again["written"] == 1, again
    assert features(root, "a.png") == [len("a much longer cat"), ord("a")]


def test_the_features_own_entries_are_never_sources(tmp_path):
    root = str(tmp_path)
    images(root, ["a.png"])
    assert run(root, MeanColor(), extensions=["png", "safetensors"])["written"] == 1
    again = run(root, MeanColor(), extensions=["png", "safetensors"])
    assert again["written"] == 0, again
    assert sorted(f for f in os.listdir(root) if not f.startswith(".")) == [
        "a.png", "a.png.toy.safetensors", "toy_cache_manifest.json"]
