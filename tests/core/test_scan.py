"""featstore.scan: extensions, jsonl fields, lists, symlinks, errors, featstore's own files."""

import json
import os

import numpy as np
import pytest
from conftest import run_unprivileged

import featstore
from featstore.errors import DataRootError


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_finds_images_by_extension_in_any_case_sorted_with_stamps(tmp_path):
    root = tmp_path
    for rel in ["b/2.JPG", "a/1.png", "a/.hidden.jpg", "c.TIFF", "d.webp", "e.bmp", "f.jpeg", "notes.txt", "x.tif"]:
        touch(root / rel, rel.encode())
    (root / ".gitignore").write_text("*.jpg\n")
    r = featstore.scan(root)
    # Hidden files and .gitignore rules do not hide dataset files.
    assert r.paths == ["a/.hidden.jpg", "a/1.png", "b/2.JPG", "c.TIFF", "d.webp", "e.bmp", "f.jpeg", "x.tif"]
    assert r.sizes.dtype == np.uint64 and r.mtimes_ns.dtype == np.int64
    for p, size, mtime in zip(r.paths, r.sizes, r.mtimes_ns, strict=True):
        st = os.stat(root / p)
        assert (size, mtime) == (st.st_size, st.st_mtime_ns)
    assert len(r) == 8 and r.errors == []


def test_custom_extensions(tmp_path):
    touch(tmp_path / "a.exr")
    touch(tmp_path / "b.jpg")
    assert featstore.scan(tmp_path, extensions=[".EXR"]).paths == ["a.exr"]


def test_skips_featstore_files_and_state(tmp_path, tree):
    root, rels = tree
    import torch

    store = featstore.FeatureStore(root, "vggt")
    store.put(rels[0], {"features": torch.zeros(2)})
    touch(os.path.join(root, ".featstore", "vggt", "sets", "x.jpg"))
    cache = os.path.join(root, "cache")
    touch(os.path.join(cache, "y.png"))
    assert featstore.scan(root, skip_dirs=[cache]).paths == rels


def test_follows_symlinks_and_reports_loops(tmp_path):
    real = tmp_path / "real"
    touch(real / "a.jpg")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(real, data / "linked")
    os.symlink(data, data / "linked_loop")  # points back at an ancestor
    r = featstore.scan(data)
    assert "linked/a.jpg" in r.paths
    assert any("loop" in why for _, why in r.errors), r.errors
    assert "linked/a.jpg" not in featstore.scan(data, follow_symlinks=False).paths


def test_nonexistent_or_non_directory_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataRootError, match="does not exist"):
        featstore.scan(tmp_path / "nope")
    touch(tmp_path / "file.jpg")
    with pytest.raises(DataRootError, match="not a directory"):
        featstore.scan(tmp_path / "file.jpg")


def _scan_as_user(root):
    r = featstore.scan(root)
    return r.paths, r.errors


def test_unreadable_directory_is_collected_not_fatal(public_tmp):
    root = os.path.join(public_tmp, "data")
    touch(os.path.join(root, "ok", "a.jpg"))
    touch(os.path.join(root, "secret", "b.jpg"))
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    os.chmod(os.path.join(root, "secret"), 0o000)
    paths, errors = run_unprivileged(_scan_as_user, root)
    assert paths == ["ok/a.jpg"]
    assert len(errors) == 1 and "secret" in errors[0][0] and "ermission" in errors[0][1]


def test_jsonl_field_paths_and_sets(tmp_path):
    root = tmp_path
    for rel in ["ep1/f0.jpg", "ep1/f1.jpg", "shared/x.png", "ep2/f0.jpg"]:
        touch(root / rel)
    (root / "ep1" / "meta.jsonl").write_text(
        json.dumps({"images": ["f0.jpg", "f1.jpg"]}) + "\n"      # relative to the jsonl's folder
        + json.dumps({"images": "shared/x.png"}) + "\n"            # relative to the root
        + "{not json\n"
        + json.dumps({"images": ["f0.jpg", "gone.jpg"]}) + "\n"  # a set with a missing member
        + json.dumps({"other": 1}) + "\n")
    (root / "train.jsonl").write_text(json.dumps({"images": [str(root / "ep2/f0.jpg")]}) + "\n")
    r = featstore.scan(root, jsonl="images")
    assert r.paths == ["ep1/f0.jpg", "ep1/f1.jpg", "ep2/f0.jpg", "shared/x.png"]
    assert r.sets == [["ep1/f0.jpg", "ep1/f1.jpg"], ["ep2/f0.jpg"]]
    reasons = " | ".join(why for _, why in r.errors)
    assert "not valid JSON" in reasons and "gone.jpg" in reasons and "no field" in reasons


def test_files_from_list(tmp_path, tree):
    root, rels = tree
    lst = tmp_path / "list.txt"
    lst.write_text(f"{rels[1]}\n# a comment\n{os.path.join(root, rels[0])}\nmissing.jpg\n")
    r = featstore.scan(root, files_from=lst)
    assert r.paths == sorted([rels[0], rels[1]])
    assert r.errors and r.errors[0][0] == "missing.jpg"


def test_listed_path_outside_root_is_an_error(tmp_path, tree):
    root, _ = tree
    touch(tmp_path / "outside.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(str(tmp_path / "outside.jpg") + "\n")
    r = featstore.scan(root, files_from=lst)
    assert r.paths == [] and "outside the data root" in r.errors[0][1]


def test_a_tree_scan_lists_files_with_a_suffix_by_name_in_the_same_walk(tmp_path):
    """What ``featstore status`` uses to find a feature's sidecar entries (orphan candidates)
    without a second walk: they are listed apart, never as sources, and need no stat."""
    from featstore import scan

    (tmp_path / "a").mkdir()
    for name in ("a/x.jpg", "a/x.jpg.vggt.safetensors", "a/gone.jpg.vggt.safetensors", "y.png",
                 "y.png.other.safetensors"):
        (tmp_path / name).write_bytes(b"1")
    found = scan(str(tmp_path), named_suffix=".vggt.safetensors")
    assert found.paths == ["a/x.jpg", "y.png"]
    assert found.named == ["a/gone.jpg.vggt.safetensors", "a/x.jpg.vggt.safetensors"]
    assert not found.errors
    assert scan(str(tmp_path)).named is None  # not asked for
