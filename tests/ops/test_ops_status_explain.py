"""`featstore status` and `featstore explain`: counts per state, and why a lookup hits or misses."""

import json
import os

import pytest
import torch
from conftest import age

from featstore import FeatureStore
from featstore.cli import main
from featstore.explain import explain
from featstore.manifest import indexed_sources


@pytest.fixture
def cache(tree):
    """A sidecar cache with one source in each state, indexed by a manifest.

    Returns (root, {state: relative source}).
    """
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    for r in rels[:6]:
        store.put(r, {"features": torch.randn(4, 8)})
    store.write_manifest(store.status(rels), rels)
    which = {"valid": rels[0], "stale": rels[1], "orphan": rels[2], "foreign": rels[3], "corrupt": rels[4],
             "touched": rels[5], "legacy": rels[6], "missing": rels[7]}
    with open(os.path.join(root, which["stale"]), "ab") as f:
        f.write(b"edited")
    os.remove(os.path.join(root, which["orphan"]))
    FeatureStore(root, "vggt", fingerprint="fpB").put(which["foreign"], {"features": torch.ones(2)})
    entry = os.path.join(root, which["corrupt"]) + ".vggt.safetensors"
    with open(entry, "r+b") as f:
        f.truncate(os.path.getsize(entry) - 40)  # mid-data
    age(os.path.join(root, which["touched"]), 50)  # a touch: same bytes, new mtime
    torch.save({"features": torch.ones(3)}, os.path.join(root, which["legacy"]) + ".vggt_cache.pt")
    return root, which


def test_status_counts_every_state(cache, capsys):
    root, which = cache
    assert main(["status", root, "--feature", "vggt", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    counts = doc["counts"]
    assert counts["valid"] == 2  # the valid one and the touched one (same bytes: refreshed)
    assert counts["stale"] == 1 and counts["orphan"] == 1 and counts["foreign"] == 1
    assert counts["legacy"] == 1 and counts["corrupt"] == 1  # truncated: its size left the index
    assert counts["missing"] == 12 - 8 + 1
    assert doc["manifest"].endswith("vggt_cache_manifest.json") and doc["journals"] == []
    assert main(["status", root, "--feature", "vggt"]) == 0
    text = capsys.readouterr().out
    assert "opened no entry" in text and "featstore verify" in text and "featstore migrate" in text
    assert "featstore gc --dry-run" in text


def test_status_trusts_the_index_and_finding_corrupt_needs_verify(tree, capsys):
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    store = FeatureStore(root, "vggt", fingerprint="fp")
    entry = store.put(rels[0], {"features": torch.randn(64)})
    store.write_manifest(store.status(rels), rels)
    st = os.stat(entry)
    with open(entry, "r+b") as f:  # flip a data byte, keep size and mtime: only a read can tell
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["status", root, "--feature", "vggt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["valid"] == 1
    assert main(["verify", root, "--feature", "vggt", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["state"], p["source"]) for p in problems] == [("corrupt", rels[0])]
    assert "checksum" in problems[0]["reason"]


def test_status_without_manifest_and_with_journals(tree, capsys):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.zeros(2)})
    assert main(["status", root, "--feature", "vggt"]) == 0
    assert "no manifest" in capsys.readouterr().out
    with open(os.path.join(root, "vggt_cache_manifest.json.rank0-of-2.jsonl"), "w") as f:
        f.write("{}\n")
    from featstore.lock import feature_lock

    with feature_lock(FeatureStore(root, "vggt"), "precompute.shard0-of-2"):  # a run is active: listed only
        assert main(["status", root, "--feature", "vggt", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert len(doc["journals"]) == 1 and doc["counts"]["valid"] == 1
        assert main(["status", root, "--feature", "vggt"]) == 0
        assert "journals" in capsys.readouterr().out
    assert main(["status", root, "--feature", "vggt", "--json"]) == 0  # no run: merged
    out = capsys.readouterr()
    assert "merged 1 journal" in out.err and json.loads(out.out)["journals"] == []


def test_status_bad_input_exit_codes(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope"), "--feature", "vggt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty"), "--feature", "vggt"]) == 1
    assert "feature 'vggt' has no manifest and no entries" in capsys.readouterr().err
    # Without --feature, the root's one manifest names it; with none there, say so (a usage error).
    assert main(["status", str(tmp_path)]) == 2
    assert "no feature has a manifest" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "explain", "verify", "gc", "migrate", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"usage: featstore {command}" in out and "--json" in out
    assert "example:" in out


def test_explain_stale_shows_old_and_new_stamp_and_digest(cache, capsys):
    root, which = cache
    assert main(["explain", which["stale"], "--data-root", root, "--feature", "vggt"]) == 1
    out = capsys.readouterr().out
    assert "stale (miss)" in out and "source recorded:" in out and "source now:" in out
    assert "differs" in out
    size = os.path.getsize(os.path.join(root, which["stale"]))
    assert f"{size - 6:,} bytes" in out and f"{size:,} bytes" in out


def test_explain_touched_source_is_a_hit(cache, capsys):
    root, which = cache
    assert main(["explain", which["touched"], "--data-root", root, "--feature", "vggt"]) == 0
    out = capsys.readouterr().out
    assert "valid (hit)" in out and "refreshed" in out


def test_explain_foreign_shows_both_fingerprints(cache, capsys):
    root, which = cache
    assert main(["explain", which["foreign"], "--data-root", root, "--feature", "vggt", "--json"]) == 1
    e = json.loads(capsys.readouterr().out)["explanations"][0]
    assert e["state"] == "foreign" and not e["hit"]
    assert e["details"]["entry fingerprint"] == "fpB" and e["details"]["expected"].startswith("fpA")
    assert "manifest" in e["details"]["expected"]


def test_explain_truncated_entry_shows_the_parse_error(cache, capsys):
    root, which = cache
    assert main(["explain", which["corrupt"], "--data-root", root, "--feature", "vggt"]) == 1
    out = capsys.readouterr().out
    assert "corrupt (miss)" in out and "out of range" in out and "verify --quarantine" in out


def test_explain_header_offsets_past_the_end(tree, capsys):
    root, rels = tree
    entry = FeatureStore(root, "vggt").put(rels[0], {"features": torch.ones(16)})
    raw = open(entry, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    header["features"]["data_offsets"][1] += 10**6
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(entry, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    assert main(["explain", os.path.join(root, rels[0]), "--data-root", root, "--feature", "vggt"]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "out of range" in out


def test_explain_orphan_missing_legacy(cache, capsys):
    root, which = cache
    assert main(["explain", which["orphan"], which["missing"], which["legacy"], "--data-root", root,
                 "--feature", "vggt", "--json"]) == 1
    orphan, missing, legacy = json.loads(capsys.readouterr().out)["explanations"]
    assert orphan["state"] == "orphan" and "no longer exists" in orphan["reason"] and "gc" in orphan["advice"]
    assert missing["state"] == "missing" and missing["entry"].endswith(".vggt.safetensors")
    assert legacy["state"] == "legacy" and legacy["hit"] and "migrate" in legacy["advice"]


def test_explain_legacy_older_than_its_image(tree, capsys):
    root, rels = tree
    src = os.path.join(root, rels[0])
    torch.save({"features": torch.ones(3)}, src + ".vggt_cache.pt")
    age(src + ".vggt_cache.pt", 10)  # the image was edited after the old cache was written
    assert main(["explain", rels[0], "--data-root", root, "--feature", "vggt"]) == 1
    out = capsys.readouterr().out
    assert "stale" in out and "image modified:" in out and "cache written:" in out


def test_explain_changed_caption_names_the_input(tree):
    root, rels = tree
    caption = os.path.join(root, rels[0] + ".txt")
    with open(caption, "w") as f:
        f.write("a red chair")
    store = FeatureStore(root, "prompt_embed")
    store.put(rels[0], {"embeds": torch.ones(3)}, inputs={"caption": caption})
    with open(caption, "w") as f:
        f.write("a blue chair!")
    e = explain(store, rels[0])
    assert e.state == "stale" and "caption" in e.reason
    assert any(k == "input caption" and "differs" in v for k, v in e.details)
    assert "source content" in dict(e.details) and "identical" in dict(e.details)["source content"]


def test_explain_finds_the_data_root(cache, capsys, monkeypatch):
    root, which = cache
    monkeypatch.delenv("DATA_ROOT", raising=False)
    assert main(["explain", os.path.join(root, which["valid"]), "--feature", "vggt"]) == 0
    captured = capsys.readouterr()
    assert "valid (hit)" in captured.out and "vggt_cache_manifest.json" in captured.err
    scene, name = os.path.split(which["valid"])
    monkeypatch.chdir(os.path.join(root, scene))  # a path relative to here, not to the data root
    assert main(["explain", name, "--feature", "vggt"]) == 0


def test_explain_dir_layout_shows_the_key(tree, tmp_path, capsys):
    root, rels = tree
    store = FeatureStore(root, "pixel_latent", cache_dir=tmp_path / "cache")
    store.put(rels[0], {"x": torch.ones(2)})
    store.write_manifest(store.status(rels), rels)
    assert main(["explain", rels[0], "--feature", "pixel_latent", "--cache-dir", str(tmp_path / "cache"),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["data_root"] == root and len(doc["explanations"][0]["details"]["key"]) == 32


def test_explain_path_outside_the_root(tree, tmp_path, capsys):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.ones(2)})
    assert main(["explain", str(tmp_path / "elsewhere.jpg"), "--data-root", root, "--feature", "vggt"]) == 1
    assert "outside the data root" in capsys.readouterr().err


def test_status_merges_journals_an_interrupted_run_left(tmp_path, capsys):
    import json as _json

    from featstore import _core
    from featstore.examples import make_image_tree

    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=16)
    store = FeatureStore(root, "vggt")
    store.put(rels[0], {"features": torch.ones(2)})
    st = os.stat(os.path.join(root, rels[0]))
    est = os.stat(store.entry_path(rels[0]))
    journal = _core.journal_path(store.manifest_path, 0, 1)
    _core.append_journal(journal, [_json.dumps({"op": "ok", "path": rels[0], "source": [st.st_size, st.st_mtime_ns],
                                                "entry": [est.st_size, est.st_mtime_ns], "racy": True})])
    assert main(["status", root, "--feature", "vggt", "--json"]) == 0
    assert "merged 1 journal" in capsys.readouterr().err
    assert not os.path.exists(journal)
    assert rels[0] in indexed_sources(FeatureStore(root, "vggt"))
