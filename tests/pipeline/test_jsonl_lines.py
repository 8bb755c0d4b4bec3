"""A `.jsonl` edit costs what it changed: an entry computed from one line of a listing depends on
that line alone (docs/design.md, "Inputs from a `.jsonl` line")."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import age

import featstore
from featstore import _core
from featstore.cli import main
from featstore.encoders.diffusion import JsonlField
from featstore.errors import FeatstoreError
from featstore.examples import make_image_tree
from featstore.inputs import JsonlLine

N = 12


class LineCaptions:
    """Embeds each image's caption (its length and first byte) with JsonlField's own inputs, as
    TextEncoder and PipelineEncoder do; counts the captions it encodes."""

    name = "caption"

    def __init__(self, root: str) -> None:
        self.captions = JsonlField(root, "prompt")
        self.encoded: list[str] = []

    def fingerprint(self) -> str:
        return "line-caption-v1"

    def preprocess(self, path: str) -> str:
        return self.captions[path]

    def inputs(self, rel: str, path: str) -> dict:
        return self.captions.listing_inputs(path, "caption")

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_items(self, items: list[str]) -> dict[str, torch.Tensor]:
        self.encoded += items
        return {"features": torch.tensor([[len(t), ord(t[0])] for t in items], dtype=torch.float32)}


def _write(root: str, rels: list[str], captions: list[str | None]) -> None:
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for rel, caption in zip(rels, captions, strict=True):
            if caption is not None:
                f.write(json.dumps({"image": rel, "prompt": caption, "score": 1}) + "\n")


def _run(root: str, enc: LineCaptions) -> dict:
    return featstore.precompute(root, encoder=enc, jsonl="image", num_workers=0, progress=False)


@pytest.fixture
def cached(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, N, size=16)
    captions = [f"caption {i}" for i in range(N)]
    _write(root, rels, captions)
    for rel in rels:
        age(os.path.join(root, rel))
    assert _run(root, LineCaptions(root))["written"] == N
    return root, rels, captions


def _entries(store: featstore.FeatureStore, rels: list[str]) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for rel in rels:
        path = store.entry_path(rel)
        st = os.stat(path)
        out[rel] = (st.st_ino, st.st_mtime_ns, open(path, "rb").read())
    return out


def test_one_edited_line_makes_one_entry_stale_and_one_recomputed(cached):
    root, rels, captions = cached
    before = _entries(featstore.FeatureStore(root, "caption"), rels)
    captions[4] = "a new caption"
    _write(root, rels, captions)  # every line rewritten: the file's stamp and digest change

    store = featstore.FeatureStore(root, "caption")
    states = [store.state(r) for r in rels]
    assert states.count("stale") == 1 and states[4] == "stale"
    assert "line" in store.check(rels[4]).reason and rels[4] in store.check(rels[4]).reason
    assert store.get(rels[5])["features"].tolist() == [len("caption 5"), ord("c")]

    index = featstore.FeatureStore(root, "caption").index_dir
    segments = set(os.listdir(index))
    enc = LineCaptions(root)
    s = _run(root, enc)
    assert (s["written"], s["skipped"], enc.encoded) == (1, N - 1, ["a new caption"])
    # The index gains one small segment: the new entry's record with its line (about 600 bytes),
    # not every entry judged again (12 records of about 500 bytes).
    (added,) = set(os.listdir(index)) - segments
    assert segments <= set(os.listdir(index)) and os.path.getsize(os.path.join(index, added)) < 1024
    after = _entries(featstore.FeatureStore(root, "caption"), rels)
    assert [r for r in rels if after[r] != before[r]] == [rels[4]]  # no other entry rewritten
    store = featstore.FeatureStore(root, "caption")
    assert [store.state(r) for r in rels] == ["valid"] * N
    assert store.get(rels[4])["features"].tolist() == [len("a new caption"), ord("a")]
    assert main(["verify", root, "--feature", "caption"]) == 0  # digests every input: all hold


def test_a_line_removed_or_moved_to_another_image_is_stale(cached):
    root, rels, captions = cached
    _write(root, rels, [c if i != 2 else None for i, c in enumerate(captions)])
    store = featstore.FeatureStore(root, "caption")
    assert store.state(rels[2]) == "stale" and "no line" in store.check(rels[2]).reason
    # Lines reordered, other fields edited: every caption is the same, every entry holds.
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for rel, caption in reversed(list(zip(rels, captions, strict=True))):
            f.write(json.dumps({"prompt": caption, "image": rel, "score": 2}) + "\n")
    store = featstore.FeatureStore(root, "caption")
    assert [store.state(r) for r in rels] == ["valid"] * N


def test_a_line_edited_after_it_was_read_is_never_stored(cached):
    root, rels, captions = cached
    store = featstore.FeatureStore(root, "caption", fingerprint="line-caption-v1")
    jsonl = os.path.join(root, "train.jsonl")
    read = JsonlLine(jsonl, "image", "prompt", rels[0], b"caption 0")
    captions[0] = "edited meanwhile"
    _write(root, rels, captions)
    with pytest.raises(FeatstoreError, match="after the encoder read it"):
        store.write(rels[0], {"features": torch.zeros(2)}, inputs={"caption": b"caption 0", "caption_jsonl": read})
    assert store.state(rels[0]) == "stale"


def test_a_later_line_listing_the_image_under_another_spelling_makes_it_stale(cached):
    """JsonlField takes the last line of an image however its path is spelled: so does the entry."""
    root, rels, captions = cached
    with open(os.path.join(root, "train.jsonl"), "a") as f:
        f.write(json.dumps({"image": "./" + rels[3], "prompt": "another caption"}) + "\n")
    assert LineCaptions(root).captions[os.path.join(root, rels[3])] == "another caption"
    store = featstore.FeatureStore(root, "caption")
    assert [r for r in rels if store.state(r) == "stale"] == [rels[3]]
    enc = LineCaptions(root)
    assert _run(root, enc)["written"] == 1 and enc.encoded == ["another caption"]


def test_a_caption_holding_a_unicode_line_separator_is_one_line_for_the_encoder_and_the_lookup(tmp_path):
    """JSON strings may hold U+2028 raw; Python's ``splitlines`` would cut such a line in two.
    The encoder's reading (JsonlField) and the lookups' per-line check parse the same lines."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=16)
    for r in rels:
        age(os.path.join(root, r))
    with open(os.path.join(root, "train.jsonl"), "w", encoding="utf-8") as f:
        for i, rel in enumerate(rels):
            f.write(json.dumps({"image": rel, "prompt": f"line\u2028break {i}"}, ensure_ascii=False) + "\n")
    enc = LineCaptions(root)
    assert not enc.captions.errors and enc.captions[os.path.join(root, rels[1])] == "line\u2028break 1"
    assert _run(root, enc)["written"] == 3
    store = featstore.FeatureStore(root, "caption")
    assert [store.state(r) for r in rels] == ["valid"] * 3
    assert _run(root, LineCaptions(root))["written"] == 0


def _index_inputs(store: featstore.FeatureStore, rel: str) -> tuple[bool, str | None]:
    """``(check_first, the extra inputs the index holds)`` of ``rel``'s record in a fresh store."""
    (record,) = store.index_records([rel])
    fields = json.loads(record.to_json()[1])
    return record.check_first, fields[9] if len(fields) > 9 else None


def test_the_index_holds_each_entrys_line_and_lookups_judge_it_from_there(tmp_path):
    """An entry's index record holds the inputs its header records, so a lookup in a fresh process
    decides a caption entry from the index (no header read) once the listing is past its racy
    window; the line's digest still decides when the listing's stamp moved."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, N, size=16)
    captions = [f"caption {i}" for i in range(N)]
    _write(root, rels, captions)
    for rel in [*rels, "train.jsonl"]:
        age(os.path.join(root, rel))
    assert _run(root, LineCaptions(root))["written"] == N
    store = featstore.FeatureStore(root, "caption")
    check_first, held = _index_inputs(store, rels[4])
    assert not check_first and held is not None and f'"listed":"{rels[4]}"' in held

    captions[4] = "a new caption"
    _write(root, rels, captions)
    age(os.path.join(root, "train.jsonl"))
    store = featstore.FeatureStore(root, "caption")
    assert [r for r in rels if store.state(r) == "stale"] == [rels[4]]
    assert "line" in store.check(rels[4]).reason
    assert store.get(rels[5])["features"].tolist() == [len("caption 5"), ord("c")]
    # The line removed, and the listing gone: each judged from the index's copy too.
    _write(root, rels, [c if i != 6 else None for i, c in enumerate(captions)])
    store = featstore.FeatureStore(root, "caption")
    assert [r for r in rels if store.state(r) == "stale"] == [rels[4], rels[6]]
    os.remove(os.path.join(root, "train.jsonl"))
    store = featstore.FeatureStore(root, "caption")
    assert all(store.state(r) == "stale" for r in rels)
    assert "no longer exists" in store.check(rels[0]).reason


def test_a_listing_written_just_before_its_entries_is_read_at_every_check(cached):
    """The fixture writes train.jsonl just before the precompute: its lines' stamps are racy, so
    the index does not let the stamps vouch for them (a same-size edit in the same tick keeps
    the stamp), and an edit is found whatever the stamp says."""
    root, rels, captions = cached
    store = featstore.FeatureStore(root, "caption")
    assert store.index_records([rels[0]]) == []  # the index vouches for nothing racy
    _, meta, _ = _core.read_entry(store.entry_path(rels[0]), pread=True)
    assert '"racy":true' in meta["inputs"]
    captions[1] = "caption X"  # the same size
    _write(root, rels, captions)
    store = featstore.FeatureStore(root, "caption")
    assert [r for r in rels if store.state(r) == "stale"] == [rels[1]]
