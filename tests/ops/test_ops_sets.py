"""Frame sets under the maintenance commands: status, verify, gc and scan --feature see the sets a
`precompute --frames-per-set N` wrote, grouped as it grouped them, and count them as sets."""

import json
import os

import pytest
from conftest import age, cli

from featstore import FeatureStore, ops
from featstore.examples import make_image_tree
from featstore.pipeline import precompute
from featstore.sets import set_entry_path

ENCODER = {"random_weights_seed": 0, "frames_per_set": 2}


@pytest.fixture
def sets(tmp_path):
    """10 aged images in 2 directories, precomputed in frame sets of 2: 3 sets per directory."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 10, scenes=2, size=28)
    for r in rels:
        age(os.path.join(root, r))
    summary = precompute(root, encoder_options=ENCODER, num_workers=0, progress=False)
    assert summary["written"] == 6
    return root, rels, summary


def _scene(rels, i):
    return [r for r in rels if r.startswith(f"scene00{i}/")]


def test_status_counts_sets_as_precompute_grouped_them(sets):
    root, rels, _ = sets
    report = ops.status(FeatureStore(root, "vggt"))
    st = report.status
    assert (st.unit, st.items, st.frames, st.frames_per_set) == ("sets", 6, 10, 2)
    assert st.counts["valid"] == 6 and st.counts["missing"] == 0
    assert "6 frame sets of up to 2 frames (10 frames)" in report.text()
    doc = report.to_dict()
    assert (doc["sets"], doc["frames"], doc["unit"]) == (6, 10, "sets")

    scene0 = _scene(rels, 0)
    with open(os.path.join(root, scene0[0]), "ab") as f:
        f.write(b"edit")  # the set (scene0[0], scene0[1]) is stale
    os.remove(os.path.join(root, scene0[4]))  # the one-frame set of scene0[4] is gone: orphan
    st = ops.status(FeatureStore(root, "vggt")).status
    assert st.counts["valid"] == 4 and st.counts["stale"] == 1 and st.counts["orphan"] == 1
    assert st.counts["missing"] == 0 and st.items == 5


def test_gc_removes_sets_whose_members_are_gone_or_changed_never_a_valid_one(sets):
    root, rels, _ = sets
    store = FeatureStore(root, "vggt")
    scene0 = _scene(rels, 0)
    changed = set_entry_path(store, scene0[0:2])
    orphaned = set_entry_path(store, scene0[4:5])
    valid = set_entry_path(store, scene0[2:4])
    with open(os.path.join(root, scene0[0]), "ab") as f:
        f.write(b"edit")
    os.remove(os.path.join(root, scene0[4]))
    rels = [r for r in rels if r != scene0[4]]
    plan = ops.plan_gc(store, rels)
    assert {(i.path, i.kind) for i in plan.remove} == {(changed, "stale"), (orphaned, "orphan")}
    assert all("frame set" in i.reason for i in plan.remove)
    ops.execute_gc(store, plan)
    assert not os.path.exists(changed) and not os.path.exists(orphaned) and os.path.exists(valid)
    assert store.get_set(scene0[2:4]) is not None

    touched = set_entry_path(store, scene0[2:4])
    os.utime(os.path.join(root, scene0[2]))  # same bytes, new stamp: the entry is kept
    plan = ops.plan_gc(store, rels)
    assert touched not in {i.path for i in plan.remove}
    assert any(i.path == touched and i.kind == "valid" for i in plan.kept)


def test_verify_reads_set_entries_and_compares_member_digests(sets):
    root, rels, _ = sets
    store = FeatureStore(root, "vggt")
    scene1 = _scene(rels, 1)
    report = ops.verify(store, rels)
    assert report.ok and report.entries == 6 and report.sets == 6 and report.counts["valid"] == 6
    assert report.counts["missing"] == 0
    assert "10 frames in 6 frame sets" in report.text()

    member = os.path.join(root, scene1[0])
    st = os.stat(member)
    data = bytearray(open(member, "rb").read())
    data[-1] ^= 0xFF  # same size, mtime restored: only a digest tells
    open(member, "wb").write(bytes(data))
    os.utime(member, ns=(st.st_atime_ns, st.st_mtime_ns))
    corrupt = set_entry_path(store, scene1[2:4])
    with open(corrupt, "r+b") as f:
        f.truncate(100)
    report = ops.verify(store, rels)
    states = {p.path: p.state for p in report.problems}
    assert states == {set_entry_path(store, scene1[0:2]): "stale", corrupt: "corrupt"}
    moved = ops.verify(store, rels, quarantine_bad=True).quarantined
    assert {src for src, _ in moved} == set(states)


def test_the_commands_see_sets(sets):
    root, rels, _ = sets
    code, out, err = cli("status", root, "--feature", "vggt")
    assert code == 0, err
    assert "6 frame sets of up to 2 frames (10 frames)" in out and "valid" in out
    code, out, err = cli("scan", root, "--feature", "vggt", "--json")
    assert code == 0, err
    feature = json.loads(out)["feature"]
    assert feature["unit"] == "sets" and feature["counts"]["valid"] == 6 and feature["counts"]["missing"] == 0
    code, out, err = cli("verify", root, "--feature", "vggt", "--json")
    assert code == 0 and json.loads(out)["entries"] == 6, err
    code, out, err = cli("gc", root, "--feature", "vggt", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["remove"] == [], err


def test_sets_from_jsonl_lists_are_found_without_jsonl_on_the_command_line(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=28)
    with open(os.path.join(root, "episodes.jsonl"), "w") as f:
        f.write(json.dumps({"images": [rels[3], rels[0], rels[5]]}) + "\n")
        f.write(json.dumps({"images": [rels[1], rels[2]]}) + "\n")
    s = precompute(root, encoder_options={"random_weights_seed": 0, "frames_per_set": 3}, jsonl="images",
                   num_workers=0, progress=False)
    assert s["written"] == 2 and s["unit"] == "sets" and s["sets"] == 2
    manifest = json.load(open(os.path.join(root, "vggt_cache_manifest.json")))
    assert (manifest["frames_per_set"], manifest["jsonl"]) == (3, "images")
    code, out, err = cli("status", root, "--feature", "vggt", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["counts"]["valid"] == 2 and doc["sets"] == 2 and doc["frames"] == 5


def test_precompute_plan_and_summary_speak_of_sets_and_frames(sets):
    root, _, summary = sets
    assert summary["unit"] == "sets" and summary["sets"] == 6 and summary["frames_written"] == 10
    assert summary["sets_per_second"] is not None
    from featstore.cli.precompute import _summary_text

    text = _summary_text(summary, dry_run=False)
    assert "6 of 6 frame sets (10 frames, up to 2 per set) selected" in text
    assert "6 sets (10 frames) written" in text and "sets/s" in text and "images/s" not in text
