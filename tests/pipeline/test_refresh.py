"""Entries that only a shared input (a whole file, each entry reading one part of it, such as a
.jsonl of captions edited on other lines) made stale are refreshed by precompute without encoding;
anything else that changed is computed, and a file edited between planning and refreshing is
never blessed."""

from __future__ import annotations

import json
import os

import torch
from conftest import age

import featstore
from featstore.encoders.diffusion import JsonlField
from featstore.examples import make_image_tree
from featstore.inputs import FileInput
from featstore.pipeline.planning import make_plan
from featstore.pipeline.run import run_plan


class JsonlCaptions:
    """Embeds each image's caption from a .jsonl field (its length and first byte), recording the
    caption's text and the whole .jsonl as a shared input. Counts the captions it encodes."""

    name = "caption"

    def __init__(self, root: str) -> None:
        self.captions = JsonlField(root, "prompt")
        self.encoded: list[str] = []

    def fingerprint(self) -> str:
        return "jsonl-caption-v1"

    def preprocess(self, path: str) -> str:
        return self.captions[path]

    def inputs(self, rel: str, path: str) -> dict:
        # The whole file as a shared input (JsonlField's own jsonl_input records the line alone,
        # which needs no refresh: tests/pipeline/test_jsonl_lines.py).
        return {"caption": self.captions[path].encode(),
                "captions_jsonl": FileInput(self.captions.jsonl_of(path), shared=True)}

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_items(self, items: list[str]) -> dict[str, torch.Tensor]:
        self.encoded += items
        return {"features": torch.tensor([[len(t), ord(t[0])] for t in items], dtype=torch.float32)}


def _dataset(tmp_path) -> tuple[str, list[str]]:
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 5, size=16)
    _write(root, rels, [f"caption {i}" for i in range(5)])
    for rel in rels:
        age(os.path.join(root, rel))
    return root, rels


def _write(root: str, rels: list[str], captions: list[str]) -> None:
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for rel, caption in zip(rels, captions, strict=True):
            f.write(json.dumps({"image": rel, "prompt": caption}) + "\n")


def _run(root: str, enc: JsonlCaptions, **options) -> dict:
    return featstore.precompute(root, encoder=enc, jsonl="image", num_workers=0, progress=False, **options)


def test_an_edited_line_is_computed_and_the_others_refreshed(tmp_path):
    root, rels = _dataset(tmp_path)
    assert _run(root, JsonlCaptions(root))["written"] == 5
    _write(root, rels, ["caption 0", "a new caption", "caption 2", "caption 3", "caption 4"])
    store = featstore.FeatureStore(root, "caption")
    assert {store.state(r) for r in rels} == {"stale"}  # lookups never read the .jsonl
    enc = JsonlCaptions(root)
    s = _run(root, enc)
    assert (s["written"], s["refreshed"], enc.encoded) == (1, 4, ["a new caption"])
    store = featstore.FeatureStore(root, "caption")
    assert [store.state(r) for r in rels] == ["valid"] * 5
    assert store.get(rels[1])["features"].tolist() == [len("a new caption"), ord("a")]
    assert store.get(rels[3])["features"].tolist() == [len("caption 3"), ord("c")]
    assert _run(root, JsonlCaptions(root))["planned"] == 0  # refreshed entries stay valid


def test_a_source_edited_since_planning_is_computed_not_refreshed(tmp_path):
    root, rels = _dataset(tmp_path)
    _run(root, JsonlCaptions(root))
    _write(root, rels, ["caption 0", "a new caption", "caption 2", "caption 3", "caption 4"])
    enc = JsonlCaptions(root)
    plan = make_plan(root, encoder=enc, feature=None, layout="sidecar", cache_dir=None, device="cpu", batch_size=8,
                     skip_existing=None, overwrite=False, start_idx=None, end_idx=None, shard=None, files_from=None,
                     extensions=None, jsonl="image", progress=False, encoder_options=None, model_path=None)
    assert len(plan.refresh) == 4 and len(plan.todo) == 1
    # Between planning and refreshing, an image the plan would refresh is edited.
    edited = rels[3]
    from PIL import Image

    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(root, edited))
    outcome = run_plan(plan, num_workers=0, durable=False)
    assert outcome.counts.refreshed == 3 and outcome.counts.written == 2
    assert sorted(enc.encoded) == ["a new caption", "caption 3"]
    store = featstore.FeatureStore(root, "caption")
    assert [store.state(r) for r in rels] == ["valid"] * 5


def test_entries_stale_for_another_reason_are_computed(tmp_path):
    root, rels = _dataset(tmp_path)
    _run(root, JsonlCaptions(root))
    _write(root, rels, ["caption 0", "caption 1", "caption 2", "caption 3", "other 4"])
    with open(os.path.join(root, rels[0]), "ab") as f:  # the image itself changed
        f.write(b"\0")
    enc = JsonlCaptions(root)
    s = _run(root, enc)
    assert (s["written"], s["refreshed"]) == (2, 3)
    assert sorted(enc.encoded) == ["caption 0", "other 4"]


def test_entries_of_another_encoder_configuration_are_not_refreshed(tmp_path):
    root, rels = _dataset(tmp_path)
    _run(root, JsonlCaptions(root))
    _write(root, rels, ["caption 0", "caption 1", "caption 2", "caption 3", "other 4"])

    class Other(JsonlCaptions):
        def fingerprint(self) -> str:
            return "jsonl-caption-v2"

    enc = Other(root)
    s = _run(root, enc)
    assert (s["written"], s["refreshed"]) == (5, 0)


def test_overwrite_computes_everything(tmp_path):
    root, rels = _dataset(tmp_path)
    _run(root, JsonlCaptions(root))
    _write(root, rels, ["caption 0", "caption 1", "caption 2", "caption 3", "other 4"])
    s = _run(root, JsonlCaptions(root), overwrite=True)
    assert (s["written"], s["refreshed"], s["to_refresh"]) == (5, 0, 0)


def test_an_entry_whose_data_rotted_is_computed_not_copied(tmp_path):
    """Copying rotted bytes into a fresh entry would give them a fresh checksum, hiding the rot
    from `featstore verify` for good: the refresh checks the data first."""
    root, rels = _dataset(tmp_path)
    _run(root, JsonlCaptions(root))
    _write(root, rels, ["caption 0", "caption 1", "caption 2", "caption 3", "other 4"])
    entry = featstore.FeatureStore(root, "caption").entry_path(rels[2])
    with open(entry, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    enc = JsonlCaptions(root)
    s = _run(root, enc)
    assert (s["written"], s["refreshed"]) == (2, 3)
    assert sorted(enc.encoded) == ["caption 2", "other 4"]
    store = featstore.FeatureStore(root, "caption")
    assert store.get(rels[2])["features"].tolist() == [len("caption 2"), ord("c")]
