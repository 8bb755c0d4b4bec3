"""History entries: chain keys shared by prefixes, every frame recorded, an edited frame stale
for exactly the histories that hold it."""

from __future__ import annotations

import os
import time

import torch

from featstore import FeatureStore
from featstore.history import history_entry_files, history_keys, judge_history_entry


def frames(root, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"ep/{i:03d}.png"
        os.makedirs(os.path.join(root, "ep"), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(bytes([i]) * (100 + i))
        t = time.time() - 3600
        os.utime(os.path.join(root, name), (t, t))
        names.append(name)
    return names


def feats(k: int) -> dict[str, torch.Tensor]:
    return {"features": torch.full((4, 8), float(k))}


def test_prefixes_share_their_keys_and_each_prefix_has_its_own_entry(tmp_path):
    names = frames(tmp_path, 5)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    keys = history_keys(store, names)
    assert history_keys(store, names[:3]) == keys[:3]
    assert len(set(keys)) == 5
    for k in range(1, 6):
        store.put_history(names[:k], feats(k))
    for k in range(1, 6):
        got = store.get_history(names[:k])
        assert got is not None and torch.equal(got["features"], feats(k)["features"])
        assert store.history_state(names[:k]) == "valid"
    assert len(history_entry_files(store)) == 5
    # Another order, another history: never served this one's entry.
    assert store.get_history([names[1], names[0]]) is None
    assert store.history_state([names[1], names[0]]) == "missing"


def test_an_edited_frame_makes_stale_exactly_the_histories_that_hold_it(tmp_path):
    names = frames(tmp_path, 5)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    for k in range(1, 6):
        store.put_history(names[:k], feats(k))
    with open(os.path.join(tmp_path, names[2]), "r+b") as f:  # same size, new bytes and mtime
        f.write(b"\xff")
    fresh = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    assert [fresh.history_state(names[:k]) for k in range(1, 6)] == ["valid", "valid", "missing", "missing",
                                                                    "missing"]
    verdicts = sorted(judge_history_entry(fresh, p).state for p in history_entry_files(fresh))
    assert verdicts == ["stale", "stale", "stale", "valid", "valid"]


def test_a_frame_renamed_onto_a_members_name_is_never_served_its_entry(tmp_path):
    names = frames(tmp_path, 3)
    for n in names:  # equal sizes and whole-second mtimes, as after a tar extraction
        with open(os.path.join(tmp_path, n), "wb") as f:
            f.write(bytes([names.index(n)]) * 100)
        os.utime(os.path.join(tmp_path, n), (1_600_000_000, 1_600_000_000))
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_history(names[:2], feats(2))
    os.remove(os.path.join(tmp_path, names[1]))
    os.rename(os.path.join(tmp_path, names[2]), os.path.join(tmp_path, names[1]))
    assert store.get_history(names[:2]) is None
    assert store.history_state(names[:2]) == "stale"


def test_another_fingerprint_is_foreign_and_a_changed_frame_between_read_and_write_is_refused(tmp_path):
    import pytest

    from featstore.errors import SourceChangedError

    names = frames(tmp_path, 2)
    FeatureStore(tmp_path, "vggt", fingerprint="a").put_history(names, feats(2))
    assert FeatureStore(tmp_path, "vggt", fingerprint="b").history_state(names) == "foreign"
    st = [os.stat(os.path.join(tmp_path, n)) for n in names]
    read = [(s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns) for s in st]
    with open(os.path.join(tmp_path, names[1]), "ab") as f:
        f.write(b"edit")
    with pytest.raises(SourceChangedError):
        FeatureStore(tmp_path, "vggt", fingerprint="b").put_history(names, feats(2), expected=read)
