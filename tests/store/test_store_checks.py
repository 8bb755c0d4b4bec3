"""Small store cases that must answer clearly: an entry path that is a directory, a manifest
fingerprint of the wrong type, a symlinked data root, a misspelled tensor name."""

import json
import os

import pytest
import torch

from featstore import FeatureStore, stamp_key
from featstore.errors import ManifestError, StaleEntryError
from featstore.examples import make_image_tree


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "data")
    return r, make_image_tree(r, 4, size=16)


def test_a_directory_named_like_an_entry_is_a_counted_corrupt_miss(root):
    r, rels = root
    store = FeatureStore(r, "f", fingerprint="fp")
    store.put(rels[0], {"features": torch.ones(3)})
    os.makedirs(os.path.join(r, rels[1] + ".f.safetensors"))
    with pytest.warns(UserWarning, match="corrupt"):
        assert store.get(rels[1]) is None
    assert store.stats["misses"] == 1 and store.stats["corrupt"] == 1
    assert store.entry_layout(rels[1]) is None
    assert store.get(rels[0]) is not None  # other entries are untouched


def test_other_os_errors_of_a_read_are_not_masked(root, monkeypatch):
    r, rels = root
    store = FeatureStore(r, "f", fingerprint="fp")
    store.put(rels[0], {"features": torch.ones(3)})

    def failing(rel):
        raise OSError(5, "Input/output error", os.path.join(r, rels[0] + ".f.safetensors"))

    monkeypatch.setattr(store, "_core", _Wrap(store._core, read=failing))
    with pytest.raises(OSError, match="Input/output error"):
        store.get(rels[0])


def test_an_entry_replaced_by_a_directory_after_it_was_served_is_a_counted_miss(root):
    """The core judges what is at the entry path (a directory, a FIFO: never opened blocking);
    an entry served before and then replaced is a corrupt miss, not an error."""
    r, rels = root
    store = FeatureStore(r, "f", fingerprint="fp")
    entry = store.put(rels[2], {"features": torch.ones(3)})
    assert store.get(rels[2]) is not None
    os.remove(entry)
    os.makedirs(entry)
    with pytest.warns(UserWarning, match="corrupt"):
        assert store.get(rels[2]) is None
    assert store.stats["corrupt"] == 1


class _Wrap:
    def __init__(self, inner, **overrides):
        self._inner, self._overrides = inner, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._inner, name)


@pytest.mark.parametrize("bad", [5, ["fp"], {"a": 1}, True])
def test_a_manifest_fingerprint_of_the_wrong_type_is_a_clear_error(root, bad):
    r, rels = root
    store = FeatureStore(r, "f", fingerprint="fp")
    store.put(rels[0], {"features": torch.ones(3)})
    store.write_manifest(store.status(rels), rels)
    doc = json.load(open(store.manifest_path))
    doc["fingerprint"] = bad
    json.dump(doc, open(store.manifest_path, "w"))
    with pytest.raises(ManifestError) as exc:
        FeatureStore(r, "f")
    msg = str(exc.value)
    assert store.manifest_path in msg and "fingerprint" in msg and "string" in msg and "precompute" in msg
    # an explicit fingerprint does not depend on the manifest's
    assert FeatureStore(r, "f", fingerprint="fp").get(rels[0]) is not None


def test_the_advice_for_a_wrong_type_fingerprint_works(root):
    from toy_encoders import MeanColor

    from featstore.pipeline import precompute

    r, rels = root
    precompute(r, encoder=MeanColor(), num_workers=0, progress=False)
    path = os.path.join(r, "toy_cache_manifest.json")
    doc = json.load(open(path))
    doc["fingerprint"] = 7
    json.dump(doc, open(path, "w"))
    with pytest.raises(ManifestError, match="precompute"):
        FeatureStore(r, "toy")
    precompute(r, encoder=MeanColor(), num_workers=0, progress=False)  # what the message says to do
    store = FeatureStore(r, "toy")
    assert store.fingerprint == MeanColor().fingerprint() and store.get(rels[0]) is not None


def test_a_null_manifest_fingerprint_still_means_any(root):
    r, rels = root
    store = FeatureStore(r, "f")
    store.put(rels[0], {"features": torch.ones(3)})
    store.write_manifest(store.status(rels), rels)
    assert json.load(open(store.manifest_path))["fingerprint"] is None
    assert FeatureStore(r, "f").fingerprint is None


def test_paths_under_a_symlinked_data_root_work_either_way(root, tmp_path):
    r, rels = root
    link = str(tmp_path / "link")
    os.symlink(r, link)
    real = os.path.realpath(r)
    FeatureStore(r, "f", fingerprint="fp").put(rels[0], {"features": torch.ones(3)})
    via_link = FeatureStore(link, "f", fingerprint="fp")
    assert via_link.rel(os.path.join(real, rels[0])) == rels[0]
    assert via_link.get(os.path.join(real, rels[0])) is not None
    via_real = FeatureStore(real, "f", fingerprint="fp")
    assert via_real.get(os.path.join(link, rels[0])) is not None
    assert via_real.contains(os.path.join(link, rels[0]))
    assert stamp_key(os.path.join(real, rels[0]), link) == stamp_key(rels[0], link) == stamp_key(rels[0], real)
    outside = str(tmp_path / "elsewhere.jpg")
    open(outside, "wb").close()
    with pytest.raises(ValueError, match="outside the data root"):
        via_link.rel(outside)


def test_many_paths_are_named_as_one_path_is(tmp_path):
    store = FeatureStore(str(tmp_path), "f")
    paths = ["a/b.jpg", "a/./b.jpg", "a//b.jpg", "./a/b.jpg", "a/b/../c.jpg", "..x.jpg", "a/.hidden/b.jpg", ".",
             str(tmp_path / "a" / "b.jpg"), tmp_path / "c.jpg", "场景/图.jpg"]
    assert store.rels(paths) == [store.rel(p) for p in paths]
    for outside in ["../x.jpg", "..", "a/../../x.jpg", "/elsewhere/x.jpg"]:
        with pytest.raises(ValueError, match="outside the data root"):
            store.rels(["a.jpg", outside])


def test_a_misspelled_tensor_name_in_read_batch_names_the_tensors_there_are(root):
    r, rels = root
    store = FeatureStore(r, "f", fingerprint="fp")
    for rel in rels[:2]:
        store.put(rel, {"features": torch.ones(3), "mask": torch.ones(2)})
    with pytest.raises(KeyError) as exc:
        store.read_batch(rels[:2], "featurs")
    msg = str(exc.value)
    assert "'featurs'" in msg and "'features'" in msg and "'mask'" in msg and "precompute" not in msg
    with pytest.raises(StaleEntryError, match="precompute"):  # no valid entry at all: precompute is the fix
        store.read_batch(rels[2:], "features")
    with pytest.raises(KeyError, match="'features', 'mask'"):
        store.read_batch(rels[:2], "featurs", torch.empty(2, 3))
