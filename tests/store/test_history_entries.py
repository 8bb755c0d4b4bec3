"""History entries: chain keys shared by prefixes, entries linear in the history's length (each
records its prefix's chains; the frames once per pass), an edited frame stale for exactly the
histories that hold it, entries of the earlier format still served."""
from __future__ import annotations

import json
import os
import time

import torch

from featstore import FeatureStore, _core
from featstore.history import (
    frames_record_files,
    history_entry_files,
    history_entry_path,
    history_keys,
    judge_history_entry,
)
from featstore.history_frames import chains, record_frames
from featstore.history_writes import HistoryPass
from featstore.ops import plan_gc, verify


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


def test_an_episode_s_entries_are_linear_in_its_length(tmp_path):
    """Each entry's header is the same size whatever its prefix's length; the frames of the pass
    are recorded once."""
    names = frames(tmp_path, 40)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    written = HistoryPass(store, names)
    paths = [written.put(k, feats(k)) for k in range(1, 41)]
    sizes = [os.path.getsize(p) for p in paths]
    assert max(sizes) - min(sizes) <= 16  # the prefix length's digits, not its frames
    assert len(frames_record_files(store)) == 1
    assert all(store.history_state(names[:k]) == "valid" for k in (1, 17, 40))
    verdict = judge_history_entry(store, paths[-1])
    assert verdict.state == "valid" and verdict.members == tuple(names)


def test_the_python_chains_are_the_ones_the_rust_lookup_computes(tmp_path):
    names = frames(tmp_path, 6)
    keys, stamps, _ = _core.history_links(str(tmp_path), names)
    recorded = record_frames(str(tmp_path), names)
    assert recorded.problem is None
    mine = chains(recorded.records)
    assert mine.keys == keys and mine.stamps == stamps
    assert mine.contents == _core.history_contents(str(tmp_path), names)
    # The key is the documented formula (docs/design.md, "History entries").
    import struct

    first = os.fsencode(names[0])
    st = os.stat(os.path.join(tmp_path, names[0]))
    member = struct.pack("<I", len(first)) + first + struct.pack("<Qq", st.st_size, st.st_mtime_ns)
    assert keys[0] == _core.bytes_digest(b"featstore-history-v1\0" + member)


def test_a_touched_frame_with_the_same_bytes_keeps_its_key_and_is_served_after_a_digest(tmp_path):
    names = frames(tmp_path, 4)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_history(names, feats(4))
    path = os.path.join(tmp_path, names[1])
    st = os.stat(path)
    data = open(path, "rb").read()
    os.unlink(path)  # a new inode and ctime, the same bytes and mtime (a restore, a copy)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.history_state(names) == "valid" and store.get_history(names) is not None
    with open(path, "r+b") as f:  # then new bytes, the stamp restored: the content chain decides
        f.write(b"\xee")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.history_state(names) == "stale" and store.get_history(names) is None


def test_an_entry_of_the_earlier_format_listing_its_frames_is_still_judged_from_them(tmp_path):
    from featstore._torch import to_raw
    from featstore.members import record as record_members

    names = frames(tmp_path, 3)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    members, _ = record_members(str(tmp_path), names)
    path = history_entry_path(store, names)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw, keep = to_raw(feats(3))
    _core.write_entry(path, raw, {"feature": "vggt", "fingerprint": "fp", "kind": "history", "frames": "3",
                                  "members": json.dumps(members), "racy": "0"})
    del keep
    assert store.history_state(names) == "valid"
    assert torch.equal(store.get_history(names)["features"], feats(3)["features"])
    assert judge_history_entry(store, path).members == tuple(names)
    with open(os.path.join(tmp_path, names[0]), "r+b") as f:
        f.write(b"\xee")
    assert store.get_history(names) is None


def test_verify_digests_each_frame_once_however_many_histories_hold_it(tmp_path, monkeypatch):
    names = frames(tmp_path, 8)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_histories(names, {k: feats(k) for k in range(1, 9)})
    digested: list[str] = []
    real = _core.file_digest
    monkeypatch.setattr(_core, "file_digest", lambda p: digested.append(os.fspath(p)) or real(p))
    report = verify(store, names, progress=False)
    assert report.ok and report.entries == 8
    assert sorted(digested) == sorted(os.path.join(tmp_path, n) for n in names)  # 8 frames, not 36


def test_a_frames_record_is_removed_by_gc_only_once_no_entry_refers_to_it(tmp_path):
    names = frames(tmp_path, 3)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_histories(names, {k: feats(k) for k in range(1, 4)})
    record, = frames_record_files(store)
    assert record not in {i.path for i in plan_gc(store, names, min_tmp_age_s=0).remove}
    os.unlink(os.path.join(tmp_path, names[2]))  # the longest history's frame: its entry is an orphan
    plan = plan_gc(store, names[:2], min_tmp_age_s=0)
    assert record not in {i.path for i in plan.remove}  # the two shorter prefixes still refer to it
    for k in (1, 2):
        os.unlink(history_entry_path(store, names[:k]))
    plan = plan_gc(store, names[:2], min_tmp_age_s=0, force=True)
    assert record in {i.path for i in plan.remove if i.kind == "frames"}
    young = plan_gc(store, names[:2], force=True)  # a pass may still be writing its entries
    assert record in {i.path for i in young.kept if i.kind == "frames"}


def test_an_entry_whose_frames_record_is_gone_is_still_served_and_verify_names_the_record(tmp_path):
    names = frames(tmp_path, 3)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    path = store.put_history(names, feats(3))
    record, = frames_record_files(store)
    os.unlink(record)
    assert store.history_state(names) == "valid"  # lookups need only the chains
    verdict = judge_history_entry(store, path)
    assert verdict.state == "corrupt" and record in verdict.reason


def test_a_racy_entry_is_checked_by_content_until_its_frames_leave_the_window(tmp_path, monkeypatch):
    names = frames(tmp_path, 3)
    for name in names:  # modified just now: a same-size edit could keep size and mtime
        os.utime(os.path.join(tmp_path, name))
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    path = store.put_history(names, feats(3))
    assert _core.read_header(path)[0]["racy"] == "1"
    digested: list[str] = []
    real = _core.history_contents
    monkeypatch.setattr(_core, "history_contents", lambda *a, **k: digested.append("x") or real(*a, **k))
    assert store.get_history(names) is not None and digested  # served after its bytes were compared
    assert _core.read_header(path)[0]["racy"] == "1"  # still inside the window: checked again next time
    monkeypatch.setattr(_core, "RACY_WINDOW_NS", 0)
    assert store.get_history(names) is not None
    assert _core.read_header(path)[0]["racy"] == "0"  # verified outside the window: the mark is cleared
    digested.clear()
    assert store.get_history(names) is not None and not digested  # the stamps chain alone now


def test_judging_an_episode_s_entry_files_stats_its_frames_once_not_once_per_prefix(tmp_path, monkeypatch):
    from featstore.ops.histories import judge_histories

    names = frames(tmp_path, 10)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_histories(names, {k: feats(k) for k in range(1, 11)})
    looked_at: list[int] = []
    real = _core.history_links
    monkeypatch.setattr(_core, "history_links", lambda root, rels, *a, **k: looked_at.append(len(rels)) or
                        real(root, rels, *a, **k))
    verdicts, unreadable = judge_histories(store, deep=False, threads=1)
    assert not unreadable and sorted(v.state for v in verdicts) == ["valid"] * 10
    assert sum(looked_at) == 10  # the record's 10 frames once (the 10 entries' prefixes hold 55)


def test_a_gone_frame_misses_only_the_prefixes_that_hold_it(tmp_path):
    from featstore.history import history_states

    names = frames(tmp_path, 4)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    store.put_histories(names, {k: feats(k) for k in range(1, 5)})
    os.unlink(os.path.join(tmp_path, names[2]))
    assert history_states(store, names, [1, 2, 3, 4]) == ["valid", "valid", "missing", "missing"]


def test_the_stamps_only_read_serves_only_what_the_full_judgement_calls_valid_on_stamps(tmp_path):
    import pathlib
    import shutil

    names = frames(tmp_path, 4)
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    path = store.put_history(names, feats(4))
    store.put_history(names[:3], feats(3))
    fast = store._core.read_history
    got = fast(names)
    assert got is not None and torch.equal(torch.from_dlpack(dict(got)["features"]), feats(4)["features"])
    # Frames named otherwise than as the store names them: deferred (absolute, `./`) or refused
    # by type (paths); the full judgement serves them all.
    absolute = [os.path.join(tmp_path, n) for n in names]
    assert fast(absolute) is None and fast(["./" + n for n in names]) is None
    for other in (absolute, [pathlib.Path(p) for p in absolute]):
        served = store.get_history(other)
        assert served is not None and torch.equal(served["features"], feats(4)["features"])
    # Another encoder's store: deferred, and the full judgement calls it foreign.
    other_store = FeatureStore(tmp_path, "vggt", fingerprint="another")
    assert other_store._core.read_history(names) is None and other_store.get_history(names) is None
    # A hand-made copy of another list's entry under this list's name: deferred, never served.
    shutil.copyfile(path, history_entry_path(store, names[:3]))
    assert fast(names[:3]) is None and store.get_history(names[:3]) is None
    # A frame touched (new inode, same bytes and mtime): deferred; the full judgement digests.
    frame = os.path.join(tmp_path, names[1])
    st, data = os.stat(frame), open(frame, "rb").read()
    os.unlink(frame)
    with open(frame, "wb") as f:
        f.write(data)
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fast(names) is None and store.get_history(names) is not None
    os.unlink(frame)  # gone: deferred, and a miss
    assert fast(names) is None and store.get_history(names) is None


def test_a_racy_entry_is_never_served_by_the_stamps_only_read(tmp_path):
    names = frames(tmp_path, 2)
    for name in names:
        os.utime(os.path.join(tmp_path, name))
    store = FeatureStore(tmp_path, "vggt", fingerprint="fp")
    path = store.put_history(names, feats(2))
    assert _core.read_header(path)[0]["racy"] == "1"
    assert store._core.read_history(names) is None and store.get_history(names) is not None


def test_the_stamps_only_read_finds_entries_in_a_cache_directory_too(tmp_path):
    names = frames(tmp_path / "data", 3)
    store = FeatureStore(tmp_path / "data", "vggt", layout="dir", cache_dir=tmp_path / "cache", fingerprint="fp")
    path = store.put_history(names, feats(3))
    assert path.startswith(str(tmp_path / "cache"))
    got = store._core.read_history(names)
    assert got is not None and torch.equal(torch.from_dlpack(dict(got)["features"]), feats(3)["features"])
