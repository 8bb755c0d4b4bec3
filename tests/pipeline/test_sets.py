"""Frame sets: keyed by every member's path and stamp in order; never mixed with per-image entries."""

import os

import torch

from featstore import FeatureStore
from featstore.encoders import VGGTEncoder
from featstore.sets import get_set, put_set, set_entry_path, set_state


def test_put_get_set_and_order_matters(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt", fingerprint="fp")
    members = rels[:3]
    feats = {"features": torch.randn(3, 5, 8)}
    path = put_set(store, members, feats)
    assert path.startswith(os.path.join(root, ".featstore", "vggt", "sets"))
    assert set_state(store, members) == "valid"
    assert torch.equal(get_set(store, members)["features"], feats["features"])
    assert get_set(store, list(reversed(members))) is None  # another order is another set
    assert store.get(members[0]) is None  # per-image lookups never see set entries


def test_a_changed_member_misses_and_a_foreign_fingerprint_misses(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt", fingerprint="fp")
    put_set(store, rels[:2], {"features": torch.zeros(2, 4)})
    assert set_state(FeatureStore(root, "vggt", fingerprint="other"), rels[:2]) == "foreign"
    with open(os.path.join(root, rels[1]), "ab") as f:
        f.write(b"edit")
    assert set_state(store, rels[:2]) == "missing" and get_set(store, rels[:2]) is None


def test_missing_member_is_missing(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    assert set_state(store, [rels[0], "gone.jpg"]) == "missing"


def test_corrupt_set_entry(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    path = put_set(store, rels[:2], {"features": torch.zeros(2, 64)})
    with open(path, "r+b") as f:
        f.truncate(30)
    assert set_state(store, rels[:2]) == "corrupt"
    assert set_entry_path(store, rels[:2]) == path


def test_vggt_set_features_depend_on_the_other_frames():
    enc = VGGTEncoder(random_weights_seed=0, frames_per_set=2)
    enc.to("cpu")
    torch.manual_seed(0)
    a, b, c = (torch.rand(3, 28, 28) for _ in range(3))
    ab = enc.encode_sets(torch.stack([a, b])[None])["features"]
    ac = enc.encode_sets(torch.stack([a, c])[None])["features"]
    alone = enc.encode(a[None])["features"]
    assert ab.shape == (1, 2, 4, 128)
    assert not torch.allclose(ab[0, 0], ac[0, 0])  # frame a's tokens change with its partner
    assert not torch.allclose(ab[0, 0], alone[0])
    assert enc.fingerprint() != VGGTEncoder(random_weights_seed=0).fingerprint()
