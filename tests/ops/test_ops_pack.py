"""`featstore pack`: valid entries moved into packs and served from there bit for bit by every read
path, judged by status, verify, gc and explain as before; a crash at any point loses nothing,
and nothing that removes one entry ever removes a pack."""

import json
import os
import shutil

import pytest
import torch
from conftest import age, cli
from toy_datasets import Images, source_of

from featstore import CachedDataset, FeatureStore
from featstore.cli import main
from featstore.examples import make_image_tree
from featstore.ops import execute_gc, pack, plan_gc, verify
from featstore.packs import parse_size

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

ODD = ["plain.png", "with space.png", "ünïcode.png", "new\nline.png"]


@pytest.fixture
def cached(tmp_path):
    """An aged tree (odd names included) whose every source has an entry; its tensors by source."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 12, size=32)
    for name in ODD:
        shutil.copy(os.path.join(root, rels[0]), os.path.join(root, name))
    rels = sorted(rels + ODD)
    for r in rels:
        age(os.path.join(root, r))
    store = FeatureStore(root, "toy", fingerprint="fp")
    want = {}
    for i, r in enumerate(rels):
        # Small entries (read into memory) and large ones (mapped from the pack) alike.
        n = 16 if i % 2 else 9000
        want[r] = torch.arange(n, dtype=torch.float32) + i
        store.put(r, {"features": want[r]})
    store.write_manifest(store.status(rels), rels)
    return root, rels, want


def sidecars(root):
    return [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]


def packs(root, feature="toy"):
    d = os.path.join(root, ".featstore", feature, "packs")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".fspack")) if os.path.isdir(d) else []


def test_packed_entries_are_served_bit_for_bit_by_every_read_path(cached):
    root, rels, want = cached
    rc, out, _ = cli("pack", root, "--feature", "toy", "--target-size", "64KiB", "--json")
    assert rc == 0, out
    doc = json.loads(out)
    assert doc["moved"] == len(rels) and len(doc["packs"]) >= 2
    assert sidecars(root) == []
    store = FeatureStore(root, "toy")
    for r in rels:
        assert torch.equal(store.get(r)["features"], want[r])
        assert store.check(r).packed is not None
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, pad=["features"],
                       log_start=False)
    row = 0
    for batch in ds.loader(batch_size=4, num_workers=2):
        assert batch["cached"].all()
        for j in range(len(batch["cached"])):
            n = len(want[rels[row]])
            assert torch.equal(batch["features"][j][:n], want[rels[row]])
            row += 1
    assert row == len(rels)
    assert torch.equal(ds[3]["features"], want[rels[3]])
    rc, out, _ = cli("status", root, "--feature", "toy", "--json")
    assert json.loads(out)["counts"]["valid"] == len(rels)
    report = verify(FeatureStore(root, "toy"), rels, progress=False)
    assert report.ok and report.counts["valid"] == len(rels), report.text()
    rc, out, _ = cli("explain", "--data-root", root, "--feature", "toy", os.path.join(root, rels[1]))
    assert rc == 0 and "pack:" in out and ".fspack" in out
    # Packing again moves nothing.
    again = pack(FeatureStore(root, "toy"), rels, progress=False)
    assert (again.moved, again.already_packed) == (0, len(rels))


def test_a_touched_edited_or_deleted_source_is_judged_as_before_and_gc_compacts(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    [the_pack] = packs(root)
    touched, edited, deleted = rels[0], rels[1:10], rels[10]
    os.utime(os.path.join(root, touched))
    for r in edited:
        with open(os.path.join(root, r), "ab") as f:
            f.write(b"edit")
        age(os.path.join(root, r))
    os.remove(os.path.join(root, deleted))
    rc, out, _ = cli("status", root, "--feature", "toy", "--json")
    counts = json.loads(out)["counts"]
    assert (counts["valid"], counts["stale"], counts["orphan"]) == (len(rels) - 10, 9, 1)
    store = FeatureStore(root, "toy")
    assert torch.equal(store.get(touched)["features"], want[touched])
    assert {store.state(r) for r in edited} == {"stale"}
    assert store.get(edited[0]) is None
    left = [r for r in rels if r != deleted]
    plan = plan_gc(store, left, progress=False)
    planned = {i.source: i.kind for i in plan.remove}
    assert planned == {**dict.fromkeys(edited, "stale"), deleted: "orphan"}
    assert os.path.exists(the_pack), "planning removes nothing"
    execute_gc(store, plan, progress=False)
    assert [p.action for p in plan.packs] == ["rewrite"], plan.text()
    assert not os.path.exists(the_pack)
    fresh = FeatureStore(root, "toy")
    for r in left:
        if r in edited:
            assert fresh.state(r) == "missing"
        else:
            assert torch.equal(fresh.get(r)["features"], want[r])
    # Nothing live stays: gc keeps the pack while it is young (it cannot tell it from one a pack
    # run is about to index), then removes it whole.
    for r in left:
        os.remove(os.path.join(root, r))
    plan = plan_gc(FeatureStore(root, "toy"), [], force=True, progress=False)
    execute_gc(FeatureStore(root, "toy"), plan, progress=False)
    assert [p.action for p in plan.packs] == ["keep"] and len(packs(root)) == 1
    plan = plan_gc(FeatureStore(root, "toy"), [], force=True, min_tmp_age_s=0, progress=False)
    execute_gc(FeatureStore(root, "toy"), plan, progress=False)
    assert packs(root) == [] and [p.action for p in plan.packs] == ["remove"]


def test_a_pack_run_killed_before_or_after_its_index_loses_nothing(cached, tmp_path):
    root, rels, want = cached
    before = str(tmp_path / "before")
    shutil.copytree(root, before, symlinks=True)
    pack(FeatureStore(root, "toy"), rels, progress=False)
    index = os.path.join(root, ".featstore", "toy", "index")
    newest = sorted(os.listdir(index))[-1]
    # Killed after the packs were sealed, before the segment: every entry still in its file.
    killed_early = str(tmp_path / "early")
    shutil.copytree(before, killed_early, symlinks=True)
    shutil.copytree(os.path.join(root, ".featstore", "toy", "packs"),
                    os.path.join(killed_early, ".featstore", "toy", "packs"))
    # Killed after the segment, before the entry files were removed: both hold the same bytes.
    killed_late = str(tmp_path / "late")
    shutil.copytree(killed_early, killed_late, symlinks=True)
    shutil.copy(os.path.join(index, newest), os.path.join(killed_late, ".featstore", "toy", "index", newest))
    for copy in (killed_early, killed_late):
        store = FeatureStore(copy, "toy")
        for r in rels:
            assert torch.equal(store.get(r)["features"], want[r]), (copy, r)
        assert verify(FeatureStore(copy, "toy"), rels, progress=False).ok
    # gc never removes the unindexed pack while it is young (a pack run may be about to index it).
    early = FeatureStore(killed_early, "toy")
    plan = plan_gc(early, rels, progress=False)
    assert {p.action for p in plan.packs} == {"keep"}
    plan = plan_gc(early, rels, min_tmp_age_s=0, progress=False)
    execute_gc(early, plan, progress=False)
    assert packs(killed_early) == []
    assert all(torch.equal(FeatureStore(killed_early, "toy").get(r)["features"], want[r]) for r in rels)
    # Packing the late copy again packs the entry files (they are preferred) and removes them.
    late = pack(FeatureStore(killed_late, "toy"), rels, progress=False)
    assert late.moved == len(rels) and sidecars(killed_late) == []
    assert all(torch.equal(FeatureStore(killed_late, "toy").get(r)["features"], want[r]) for r in rels)


def test_remove_drops_one_packed_entry_and_never_the_pack(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    [the_pack] = packs(root)
    store = FeatureStore(root, "toy")
    assert store.remove(rels[2]) is True
    assert store.remove(rels[2]) is False
    assert os.path.exists(the_pack)
    fresh = FeatureStore(root, "toy")
    assert fresh.state(rels[2]) == "missing"
    assert torch.equal(fresh.get(rels[3])["features"], want[rels[3]])


def test_damaged_bytes_in_a_pack_are_found_by_verify_and_dropped_by_quarantine(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    [the_pack] = packs(root)
    c = FeatureStore(root, "toy").check(rels[0])
    _, offset, length = c.packed
    st = os.stat(the_pack)
    with open(the_pack, "r+b") as f:
        f.seek(offset + length - 3)
        f.write(b"\xff\xff\xff")
    os.utime(the_pack, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, out, _ = cli("verify", root, "--feature", "toy", "--json")
    assert rc == 1
    [problem] = json.loads(out)["problems"]
    assert problem["source"] == rels[0] and problem["state"] == "corrupt" and "checksum" in problem["reason"]
    assert problem["pack"] == the_pack and problem["offset"] == offset
    rc, out, _ = cli("verify", root, "--feature", "toy", "--quarantine")
    assert os.path.exists(the_pack)
    fresh = FeatureStore(root, "toy")
    assert fresh.state(rels[0]) == "missing"
    assert torch.equal(fresh.get(rels[1])["features"], want[rels[1]])


def test_a_put_after_packing_is_served_in_place_of_the_packed_copy(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    reader = FeatureStore(root, "toy")
    assert torch.equal(reader.get(rels[0])["features"], want[rels[0]])
    FeatureStore(root, "toy", fingerprint="fp").put(rels[0], {"features": torch.zeros(3)})
    assert torch.equal(reader.get(rels[0])["features"], torch.zeros(3))


def test_packs_in_a_cache_directory(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=32)
    for r in rels:
        age(os.path.join(root, r))
    cache = str(tmp_path / "cache")
    store = FeatureStore(root, "toy", cache_dir=cache, fingerprint="fp")
    for i, r in enumerate(rels):
        store.put(r, {"features": torch.full((100,), float(i))})
    rc, out, _ = cli("pack", root, "--feature", "toy", "--cache-dir", cache)
    assert rc == 0, out
    assert packs(cache) and sidecars(cache) == []
    fresh = FeatureStore(root, "toy", cache_dir=cache)
    assert [float(fresh.get(r)["features"][0]) for r in rels] == [float(i) for i in range(6)]


def test_sizes_and_bad_sizes():
    assert parse_size("2GiB") == parse_size("2G") == 2 << 30
    assert parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    for bad in ("", "-1", "0", "2 parsecs", "GiB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_a_bad_target_size_is_a_clear_error(cached, capsys):
    root, _, _ = cached
    with pytest.raises(SystemExit) as exit_:
        main(["pack", root, "--feature", "toy", "--target-size", "lots"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'lots' is not a size" in err and "2GiB" in err
    assert packs(root) == []


def test_a_journal_a_killed_run_left_never_undoes_a_pack(cached):
    root, rels, want = cached
    from featstore.ops import merge_leftover_journals
    from featstore.pipeline import journal

    # A killed precompute journaled rels[0]'s entry in its own file and was never merged.
    store = FeatureStore(root, "toy", fingerprint="fp")
    written = store.write(rels[0], {"features": want[rels[0]]})
    journal.append(journal.journal_path(store, (0, 1), None), [journal.ok_record(store, rels[0], written)])
    pack(FeatureStore(root, "toy"), rels, progress=False)
    assert sidecars(root) == []
    merge_leftover_journals(FeatureStore(root, "toy"))  # status would merge it too
    fresh = FeatureStore(root, "toy")
    assert all(torch.equal(fresh.get(r)["features"], want[r]) for r in rels)


def test_remove_takes_the_entry_file_and_an_older_packed_copy(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    FeatureStore(root, "toy", fingerprint="fp").put(rels[1], {"features": torch.zeros(2)})
    store = FeatureStore(root, "toy")
    assert torch.equal(store.get(rels[1])["features"], torch.zeros(2))
    assert store.remove(rels[1]) is True
    assert FeatureStore(root, "toy").state(rels[1]) == "missing"


def test_a_manifest_written_for_some_sources_keeps_the_others_packed_entries(cached):
    root, rels, want = cached
    pack(FeatureStore(root, "toy"), rels, progress=False)
    store = FeatureStore(root, "toy")
    store.write_manifest(store.status(rels[:3]), rels[:3])
    fresh = FeatureStore(root, "toy")
    assert all(torch.equal(fresh.get(r)["features"], want[r]) for r in rels)
