"""`featstore migrate`: old sidecars and SHA256-named cache directories become featstore entries."""

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import cli, run_unprivileged, snapshot

from featstore import FeatureStore, _core
from featstore.examples import make_image_tree


def legacy_key(path_as_given, image):
    # The old loader's key, written out independently of featstore's implementation.
    with open(image, "rb") as f:
        return hashlib.sha256(path_as_given.encode() + f.read()).hexdigest()[:16]


def feature_of(i):
    return torch.arange(12, dtype=torch.float32).reshape(3, 4) + i


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featstore-migrate-pwned",))


def test_sidecars_plan_then_convert_keeping_the_old_files(tree):
    root, rels = tree
    for i, r in enumerate(rels[:4]):
        torch.save({"features": feature_of(i), "path": r}, os.path.join(root, r) + ".vggt_cache.pt")
    before = snapshot(root)
    rc, out, _ = cli("migrate", root)
    assert rc == 0 and "plan only" in out and "--yes" in out and "4 <image>.vggt_cache.pt sidecars" in out
    assert snapshot(root) == before  # the plan writes nothing
    rc, out, _ = cli("migrate", root, "--yes", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and len(doc["converted"]) == 4 and doc["deleted"] == []
    store = FeatureStore(root, "vggt", allow_legacy=False)
    for i, r in enumerate(rels[:4]):
        got = store.get(r)
        assert got is not None and torch.equal(got["features"], feature_of(i)) and set(got) == {"features"}
        meta = _core.read_header(store.entry_path(r))[0]
        assert meta["migrated_from"] == os.path.join(root, r) + ".vggt_cache.pt"
        assert os.path.exists(meta["migrated_from"])  # the old cache is kept
    assert doc["manifest"] and os.path.exists(doc["manifest"])
    rc, out, _ = cli("migrate", root, "--json")  # nothing left to do
    assert rc == 0 and json.loads(out)["convert"] == [] and len(json.loads(out)["skipped"]) == 4


def test_delete_old_removes_only_converted_files(tree):
    root, rels = tree
    for i, r in enumerate(rels[:2]):
        torch.save({"features": feature_of(i)}, os.path.join(root, r) + ".vggt_cache.pt")
    with pytest.raises(SystemExit) as exc:
        cli("migrate", root, "--delete-old")  # without --yes
    assert exc.value.code == 2
    rc, out, _ = cli("migrate", root, "--yes", "--delete-old", "--json")
    assert rc == 0 and len(json.loads(out)["deleted"]) == 2
    assert not any(f.endswith(".vggt_cache.pt") for f in snapshot(root))
    assert all(FeatureStore(root, "vggt").contains(r) for r in rels[:2])


def test_legacy_sidecar_older_than_its_image_is_refused(tree):
    root, rels = tree
    legacy = os.path.join(root, rels[0]) + ".vggt_cache.pt"
    torch.save({"features": feature_of(0)}, legacy)
    st = os.stat(os.path.join(root, rels[0]))
    os.utime(legacy, ns=(st.st_atime_ns, st.st_mtime_ns - 5 * 10**9))  # the image changed after caching
    torch.save({"features": feature_of(1)}, os.path.join(root, rels[1]) + ".vggt_cache.pt")
    rc, out, _ = cli("migrate", root, "--yes", "--json")
    doc = json.loads(out)
    assert rc == 1 and not doc["ok"]
    assert [r[0] for r in doc["refused"]] == [legacy] and "older than its image" in doc["refused"][0][1]
    store = FeatureStore(root, "vggt", allow_legacy=False)
    assert not store.contains(rels[0]) and store.contains(rels[1])
    assert os.path.exists(legacy)


def test_pickle_that_would_run_code_is_refused_and_never_run(tree):
    root, rels = tree
    marker = "/tmp/featstore-migrate-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with open(os.path.join(root, rels[0]) + ".vggt_cache.pt", "wb") as f:
        pickle.dump({"features": _RunsCode()}, f)
    torch.save({"features": feature_of(1)}, os.path.join(root, rels[1]) + ".vggt_cache.pt")
    rc, out, _ = cli("migrate", root, "--yes", "--delete-old")
    assert rc == 1 and "refused to load" in out and "not a plain tensor pickle" in out
    assert not os.path.exists(marker)
    store = FeatureStore(root, "vggt", allow_legacy=False)
    assert not store.contains(rels[0]) and store.contains(rels[1])
    assert os.path.exists(os.path.join(root, rels[0]) + ".vggt_cache.pt")  # refused files are never deleted


def _sha_cache(tmp_path, root, rels, old_root, with_manifest=False):
    """A legacy SHA256 cache made when the data lived at ``old_root``."""
    legacy = tmp_path / "legacy_cache"
    legacy.mkdir()
    mapping = {}
    for i, r in enumerate(rels):
        given = os.path.join(old_root, r)
        key = legacy_key(given, os.path.join(root, r))
        data = {"features": feature_of(i)} if i % 2 else feature_of(i)  # dicts and bare tensors
        torch.save(data, legacy / f"{key}.pt")
        mapping[key] = given
    if with_manifest:
        (legacy / "manifest.json").write_text(json.dumps({"entries": mapping, "total": len(mapping)}))
    return str(legacy)


def test_sha256_dir_after_the_data_root_moved(tree, tmp_path):
    root, rels = tree
    legacy = _sha_cache(tmp_path, root, rels[:5], "/mnt/old/dataset")
    before = snapshot(legacy)
    rc, out, _ = cli("migrate", root, "--legacy-dir", legacy, "--json")
    doc = json.loads(out)
    assert rc == 1 and len(doc["unmatched"]) == 5 and doc["convert"] == []
    rc, text, _ = cli("migrate", root, "--legacy-dir", legacy)
    assert "--old-root" in text
    rc, out, _ = cli("migrate", root, "--legacy-dir", legacy, "--old-root", "/mnt/old/dataset/", "--yes", "--json")
    doc = json.loads(out)
    assert rc == 0 and len(doc["converted"]) == 5 and doc["matched_by"] == {"/mnt/old/dataset": 5}
    store = FeatureStore(root, "vggt")
    for i, r in enumerate(rels[:5]):
        assert torch.equal(store.get(r)["features"], feature_of(i))
    assert snapshot(legacy) == before  # never deletes the old cache unless --delete-old


def test_sha256_dir_at_the_same_root_and_an_image_changed_since(tree, tmp_path):
    root, rels = tree
    legacy = _sha_cache(tmp_path, root, rels[:3], root)
    with open(os.path.join(root, rels[0]), "ab") as f:
        f.write(b"edited after caching")
    rc, out, _ = cli("migrate", root, "--legacy-dir", legacy, "--json")
    doc = json.loads(out)
    assert rc == 1 and sorted(i["source"] for i in doc["convert"]) == sorted(rels[1:3])
    assert len(doc["unmatched"]) == 1 and "changed or moved" in doc["unmatched"][0][1]
    assert doc["matched_by"] == {root: 2}


def test_old_manifest_reveals_the_old_root(tree, tmp_path):
    root, rels = tree
    legacy = _sha_cache(tmp_path, root, rels[:4], "/nfs/team/data", with_manifest=True)
    rc, out, _ = cli("migrate", root, "--legacy-dir", legacy, "--json")
    doc = json.loads(out)
    assert rc == 0 and len(doc["convert"]) == 4 and doc["matched_by"] == {"/nfs/team/data": 4}


def test_migrate_into_a_cache_dir_and_unmatched_files(tree, tmp_path):
    root, rels = tree
    legacy = _sha_cache(tmp_path, root, rels[:2], root)
    with open(os.path.join(legacy, "0123456789abcdef.pt"), "wb") as f:
        f.write(b"matches nothing")
    with open(os.path.join(legacy, "notes.pt"), "wb") as f:
        f.write(b"not a cache file")
    torch.save({"features": feature_of(9)}, os.path.join(root, "gone.jpg.vggt_cache.pt"))  # its image is gone
    cache = str(tmp_path / "new_cache")
    rc, out, _ = cli("migrate", root, "--legacy-dir", legacy, "--cache-dir", cache, "--yes", "--json")
    doc = json.loads(out)
    assert rc == 1 and len(doc["converted"]) == 2 and doc["layout"] == "dir"
    reasons = {os.path.basename(p): why for p, why in doc["unmatched"]}
    assert set(reasons) == {"0123456789abcdef.pt", "notes.pt", "gone.jpg.vggt_cache.pt"}
    assert "no longer exists" in reasons["gone.jpg.vggt_cache.pt"]
    store = FeatureStore(root, "vggt", cache_dir=cache)
    assert store.contains(rels[0]) and store.contains(rels[1])


def test_missing_legacy_dir_and_nothing_to_migrate(tree, tmp_path):
    root, _ = tree
    rc, out, _ = cli("migrate", root)
    assert rc == 1 and "no legacy cache found" in out
    rc, _, err = cli("migrate", root, "--legacy-dir", str(tmp_path / "nope"))
    assert rc == 1 and "does not exist" in err and "Traceback" not in err


def _migrate_as_user(root):
    return cli("migrate", root, "--yes")


def test_read_only_data_root_suggests_cache_dir_and_loses_nothing(public_tmp):
    root = os.path.join(public_tmp, "data")
    rels = make_image_tree(root, 3, size=16)
    for i, r in enumerate(rels):
        torch.save({"features": feature_of(i)}, os.path.join(root, r) + ".vggt_cache.pt")
    for d, _, files in os.walk(root):
        os.chmod(d, 0o555)
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
    before = snapshot(root)
    rc, out, err = run_unprivileged(_migrate_as_user, root)
    assert rc == 1 and "--cache-dir" in err and "Traceback" not in err
    assert snapshot(root) == before
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)
    shutil.rmtree(root)
