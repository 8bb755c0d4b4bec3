"""FeatureStore: states, the hot path, refresh, racy entries, layouts, legacy files, bad input."""

import os
import pickle
import time
import warnings

import pytest
import torch
from conftest import age, run_unprivileged

import featstore
from featstore import FeatureStore
from featstore.errors import PathOutsideRootError, ReadOnlyDataRootError


def feats(seed=0, shape=(4, 8)):
    return {"features": torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(params=["sidecar", "dir"])
def store(request, tree, tmp_path):
    root, _ = tree
    if request.param == "dir":
        return FeatureStore(root, "vggt", cache_dir=tmp_path / "cache")
    return FeatureStore(root, "vggt")




def test_put_get_roundtrip_and_states(store, tree):
    root, rels = tree
    assert store.state(rels[0]) == "missing" and not store.contains(rels[0])
    t = feats()
    path = store.put(rels[0], t)
    assert os.path.exists(path)
    if store.layout == "sidecar":
        assert path == os.path.join(root, rels[0]) + ".vggt.safetensors"
    else:
        key = featstore.stamp_key(rels[0], root)
        assert path == os.path.join(store.cache_dir, "vggt", key[:2], key[:32] + ".safetensors")
    assert store.contains(rels[0]) and rels[0] in store
    assert store.contains(os.path.join(root, rels[0]))  # absolute paths inside the root work too
    got = store.get(rels[0])
    assert torch.equal(got["features"], t["features"])
    assert store.get(rels[1]) is None
    assert store.stats["hits"] == 1 and store.stats["misses"] == 1


def test_get_casts_and_moves_on_request(store, tree):
    _, rels = tree
    store.put(rels[0], {"features": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(3)})
    got = store.get(rels[0], dtype=torch.float32, device="cpu")
    assert got["features"].dtype == torch.float32 and got["ids"].dtype == torch.int64


def test_edited_source_is_stale_and_never_served(store, tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    store.put(rels[0], feats())
    # The dir layout finds an entry written for an older stamp through the manifest's index.
    store.write_manifest(store.status(), rels)
    with open(src, "ab") as f:
        f.write(b"edit")
    assert store.state(rels[0]) == "stale"
    with pytest.warns(UserWarning, match="stale"):
        assert store.get(rels[0]) is None
    assert store.stats["stale"] == 1
    assert "changed" in store.explain(rels[0])
    # A fresh process (new store) agrees.
    assert FeatureStore(**store.__getstate__()).state(rels[0]) == "stale"


def test_touched_but_unchanged_source_is_refreshed_not_recomputed(store, tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    t = feats()
    store.put(rels[0], t)
    store.write_manifest(store.status(), rels)  # the dir layout finds the old key through it
    age(src, 100)  # like a `cp -r` without -p, a touch, or a restore from backup
    fresh = FeatureStore(**store.__getstate__())
    assert fresh.state(rels[0]) == "valid"
    assert fresh.contains(rels[0])
    assert torch.equal(fresh.get(rels[0])["features"], t["features"])
    # The refreshed stamp is on disk: yet another process needs no digest.
    meta, _, _ = featstore._core.read_header(fresh.entry_path(rels[0]))
    assert int(meta["source.mtime_ns"]) == os.stat(src).st_mtime_ns


def test_racy_same_size_edit_is_caught(store, tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    store.put(rels[0], feats())  # the image was just written: the entry is racy
    path = store.entry_path(rels[0])
    assert featstore._core.read_header(path)[0]["racy"] == "1"
    st = os.stat(src)
    data = bytearray(open(src, "rb").read())
    data[-3] ^= 0x55
    with open(src, "wb") as f:
        f.write(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: stamp unchanged
    assert FeatureStore(**store.__getstate__()).state(rels[0]) == "stale"


def test_racy_entry_verified_once_then_clean(store, tree):
    root, rels = tree
    store.put(rels[0], feats())
    age(os.path.join(root, rels[0]), 0)  # keep the stamp, still racy on disk
    fresh = FeatureStore(**store.__getstate__())
    assert fresh.state(rels[0]) == "valid"  # verified by digest


def test_other_fingerprint_is_foreign(tree, tmp_path):
    root, rels = tree
    FeatureStore(root, "vggt", fingerprint="aaa").put(rels[0], feats())
    other = FeatureStore(root, "vggt", fingerprint="bbb")
    assert other.state(rels[0]) == "foreign"
    with pytest.warns(UserWarning, match="foreign"):
        assert other.get(rels[0]) is None
    assert "aaa" in other.explain(rels[0]) and "bbb" in other.explain(rels[0])
    assert FeatureStore(root, "vggt", fingerprint="aaa").state(rels[0]) == "valid"


def test_fingerprint_none_adopts_the_manifest(tree):
    root, rels = tree
    s = FeatureStore(root, "vggt", fingerprint="fp1")
    s.put(rels[0], feats())
    s.write_manifest(s.status(), rels)
    assert FeatureStore(root, "vggt").fingerprint == "fp1"


def test_hot_path_trusts_the_index_and_opens_no_entry(tree):
    root, rels = tree
    s = FeatureStore(root, "vggt", fingerprint="fp")
    for r in rels[:3]:
        s.put(r, feats())
        age(os.path.join(root, r))
    s = FeatureStore(root, "vggt", fingerprint="fp")
    s.write_manifest(s.status(), rels)
    # Damage an entry's header but keep its size and mtime: its ctime still changes, and the
    # stamp (inode and ctime included) catches it without an open.
    entry = s.entry_path(rels[0])
    st = os.stat(entry)
    with open(entry, "r+b") as f:
        f.seek(8)
        f.write(b"#")
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = FeatureStore(root, "vggt")
    assert fresh.contains(rels[1])  # from the manifest index: no open on the hot path
    assert not fresh.contains(rels[0])
    with pytest.warns(UserWarning, match="corrupt"):
        assert fresh.get(rels[0]) is None  # the read validates and refuses it
    assert fresh.stats["corrupt"] == 1


def test_corrupt_entry_is_a_counted_miss_with_one_warning(store, tree):
    _, rels = tree
    for r in rels[:3]:
        p = store.put(r, feats())
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 7)
    fresh = FeatureStore(**store.__getstate__())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [fresh.get(r) for r in rels[:3]] == [None, None, None]
    assert len([w for w in caught if "corrupt" in str(w.message)]) == 1
    assert fresh.stats["corrupt"] == 3 and fresh.state(rels[0]) == "corrupt"
    assert "truncated" in fresh.explain(rels[0]) or "out of range" in fresh.explain(rels[0])


def test_caption_input_change_makes_entry_stale(tree):
    root, rels = tree
    caption = os.path.join(root, rels[0] + ".txt")
    with open(caption, "w") as f:
        f.write("a red chair")
    s = FeatureStore(root, "prompt_embed")
    s.put(rels[0], feats(), inputs={"caption": caption, "prompt": b"a red chair"})
    assert s.state(rels[0]) == "valid"
    with open(caption, "w") as f:
        f.write("a blue chair")
    assert s.state(rels[0]) == "stale"
    assert "caption" in s.explain(rels[0])


def test_orphan_remove_and_clear(store, tree):
    root, rels = tree
    for r in rels[:3]:
        store.put(r, feats())
    store.write_manifest(store.status(), rels)
    os.remove(os.path.join(root, rels[0]))
    store = FeatureStore(**store.__getstate__())
    assert store.state(rels[0]) == "orphan"
    st = store.status()
    assert st.counts["orphan"] == 1 and st.counts["valid"] == 2 and st.counts["missing"] == len(rels) - 3
    assert store.remove(rels[1]) and store.state(rels[1]) == "missing"
    assert not store.remove(rels[1])
    assert store.clear() >= 1
    assert all(os.path.exists(os.path.join(root, r)) for r in rels[1:])  # sources untouched
    assert store.status().counts["valid"] == 0


def test_dir_layout_touch_copies_entry_to_the_new_key(tree, tmp_path):
    root, rels = tree
    s = FeatureStore(root, "vggt", cache_dir=tmp_path / "cache")
    s.put(rels[0], feats())
    s.write_manifest(s.status(), rels)
    old = s.entry_path(rels[0])
    age(os.path.join(root, rels[0]), 50)
    fresh = FeatureStore(root, "vggt", cache_dir=tmp_path / "cache")
    assert fresh.state(rels[0]) == "valid"
    assert fresh.entry_path(rels[0]) != old and os.path.exists(fresh.entry_path(rels[0]))
    # The old key's file stays: a copy of the dataset sharing the cache may still use it (DESIGN,
    # "A copy never destroys the original"); `featstore gc` removes what no source claims.
    assert os.path.exists(old)


def test_split_roots_see_the_same_sidecar_entries(tree):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], feats())
    scene = os.path.dirname(rels[0])
    sub = FeatureStore(os.path.join(root, scene), "vggt")
    assert sub.contains(os.path.basename(rels[0]))


def test_paths_outside_the_root_are_refused(store, tree, tmp_path):
    with pytest.raises(PathOutsideRootError):
        store.contains("../elsewhere.jpg")
    with pytest.raises(PathOutsideRootError):
        store.get(str(tmp_path / "elsewhere.jpg"))


def test_missing_source_put_raises_file_not_found(store):
    with pytest.raises(FileNotFoundError):
        store.put("nope.jpg", feats())


def test_bad_tensors_are_type_errors(store, tree):
    _, rels = tree
    with pytest.raises(TypeError):
        store.put(rels[0], {"features": [1, 2, 3]})
    with pytest.raises(TypeError):
        store.put(rels[0], {})
    with pytest.raises(TypeError):
        store.put(rels[0], {"x": torch.zeros(2, dtype=torch.complex64)})


def test_store_is_picklable(store, tree):
    _, rels = tree
    store.put(rels[0], feats())
    clone = pickle.loads(pickle.dumps(store))
    assert clone.contains(rels[0]) and clone.layout == store.layout


def _put_as_user(root, rel):
    s = FeatureStore(root, "vggt")
    try:
        s.put(rel, {"features": torch.zeros(2)})
    except ReadOnlyDataRootError as exc:
        return str(exc), isinstance(exc, PermissionError), s.contains(rel)
    return "no error", False, False


def test_read_only_data_root_suggests_cache_dir_and_loses_nothing(public_tmp):
    root = os.path.join(public_tmp, "data")
    rels = featstore.examples.make_image_tree(root, 2, size=16)
    FeatureStore(root, "vggt").put(rels[0], feats())  # already cached before the root turns read-only
    for d, _, files in os.walk(root):
        os.chmod(d, 0o555)
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
    msg, is_permission_error, still_cached = run_unprivileged(_put_as_user, root, rels[1])
    assert "--cache-dir" in msg and is_permission_error
    assert not still_cached  # the refused write left no entry behind
    assert run_unprivileged(lambda: FeatureStore(root, "vggt").contains(rels[0]))


def test_nonexistent_data_root(tmp_path):
    with pytest.raises(featstore.DataRootError, match="does not exist"):
        FeatureStore(tmp_path / "nope", "vggt")


def test_legacy_sidecar_read_safely_and_stale_when_older(tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    legacy = src + ".vggt_cache.pt"
    torch.save({"features": torch.ones(3, 4), "path": src}, legacy)
    s = FeatureStore(root, "vggt")
    assert s.state(rels[0]) == "legacy"
    got = s.get(rels[0])
    assert set(got) == {"features"} and torch.equal(got["features"], torch.ones(3, 4))
    assert FeatureStore(root, "vggt", allow_legacy=False).get(rels[0]) is None
    st = os.stat(src)
    os.utime(legacy, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # cached before the image changed
    assert FeatureStore(root, "vggt").state(rels[0]) == "stale"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featstore-pwned",))


def test_legacy_pickle_that_would_run_code_is_refused(tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    with open(src + ".vggt_cache.pt", "wb") as f:
        pickle.dump({"features": _RunsCode()}, f)
    if os.path.exists("/tmp/featstore-pwned"):
        os.remove("/tmp/featstore-pwned")
    s = FeatureStore(root, "vggt")
    with pytest.raises(featstore.CorruptEntryError, match="refused"):
        s.get(rels[0])
    assert not os.path.exists("/tmp/featstore-pwned")


def test_import_featstore_does_not_import_torch():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import featstore, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pool_works_in_a_forked_child(tree):
    import multiprocessing

    root, rels = tree
    featstore.scan(root, threads=2)  # parent builds its pool first
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_scan_count, (root,)) == len(rels)


def _scan_count(root):
    return len(featstore.scan(root, threads=2))


def test_timestamps_in_the_future_are_racy(tree):
    root, rels = tree
    src = os.path.join(root, rels[0])
    future = time.time_ns() + 3600 * 10**9
    os.utime(src, ns=(future, future))
    s = FeatureStore(root, "vggt")
    s.put(rels[0], feats())
    assert featstore._core.read_header(s.entry_path(rels[0]))[0]["racy"] == "1"


def test_manifest_index_never_vouches_for_an_entry_whose_caption_changed(tree):
    root, rels = tree
    caption = os.path.join(root, rels[0] + ".txt")
    with open(caption, "w") as f:
        f.write("a red chair")
    for p in (os.path.join(root, rels[0]), caption):
        age(p)  # out of the racy window: only the extra input can make the index unsafe
    store = FeatureStore(root, "prompt_embed")
    store.put(rels[0], feats(), inputs={"caption": caption})
    store.write_manifest(store.status(rels), rels)
    with open(caption, "w") as f:
        f.write("a blue chair!")
    fresh = FeatureStore(root, "prompt_embed")  # seeded from the manifest's index
    assert fresh.state(rels[0]) == "stale"
    with pytest.warns(UserWarning, match="stale"):
        assert fresh.get(rels[0]) is None


def test_paths_spelled_with_doubled_or_trailing_slashes_name_the_same_source(store, tree):
    root, rels = tree
    store.put(rels[0], feats())
    scene, name = rels[0].split("/")
    assert store.state(f"{scene}//{name}") == store.state(f"./{rels[0]}") == "valid"
