"""History entries under the maintenance commands: status counts histories (one per sample of the
recorded .jsonl field), verify judges every history entry file with its frames digested, gc removes
the orphaned and stale ones (only the file it judged) and never a valid one, explain --history
says why a history's lookup hits or misses."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import age, cli
from PIL import Image

from featstore import FeatureStore, _core, ops
from featstore.examples import make_image_tree
from featstore.history import history_entry_files, history_entry_path
from featstore.ops.files import KEPT_REWRITTEN

FP = "toy-history-v1"


def _features(frames: list[str]) -> dict[str, torch.Tensor]:
    return {"features": torch.full((4,), float(len(frames)))}


def _record_mode(store: FeatureStore, total: int, **mode: object) -> None:
    """The manifest a history precompute (or a lazy training run) leaves: the mode recorded."""
    fields = {**store.manifest_fields(total_images=total), **mode}
    _core.write_manifest(store.manifest_path, json.dumps(fields))


@pytest.fixture
def histories(tmp_path):
    """Two episodes of 4 frames; samples: every step of the first, steps 2 and 4 of the second
    (in episodes.jsonl, field ``images``). Every prefix of both has an entry (a causal pass writes
    them all), and the manifest records the history mode."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 8, scenes=2, size=28)
    for r in rels:
        age(os.path.join(root, r))
    ep = [r for r in rels if r.startswith("scene000/")]
    ep2 = [r for r in rels if r.startswith("scene001/")]
    lists = [ep[:k] for k in range(1, 5)] + [ep2[:2], ep2[:4]]
    with open(os.path.join(root, "episodes.jsonl"), "w") as f:
        f.writelines(json.dumps({"images": x}) + "\n" for x in lists)
    store = FeatureStore(root, "toy", fingerprint=FP)
    for frames in [ep[:k] for k in range(1, 5)] + [ep2[:k] for k in range(1, 5)]:
        store.put_history(frames, _features(frames))
    _record_mode(store, len(rels), history=True, jsonl="images")
    return root, rels, ep, ep2, lists


def _repaint(path: str) -> None:
    with Image.open(path) as im:
        fmt, size = im.format, im.size
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, format=fmt)
    age(path, 50)


def test_status_counts_histories_one_per_sample(histories):
    root, _, ep, ep2, _ = histories
    report = ops.status(FeatureStore(root, "toy"))
    st = report.status
    assert (st.unit, st.items, st.frames) == ("histories", 6, 8)
    assert st.counts["valid"] == 6 and st.counts["missing"] == 0 and st.counts["orphan"] == 0
    assert "6 histories, one per sample (8 frames)" in report.text()
    doc = report.to_dict()
    assert (doc["unit"], doc["histories"], doc["frames"]) == ("histories", 6, 8)

    _repaint(os.path.join(root, ep[2]))  # the samples holding it (steps 3 and 4) are stale
    os.remove(os.path.join(root, ep2[3]))  # the entry of ep2[:4] is an orphan; its sample has no frames
    st = ops.status(FeatureStore(root, "toy")).status
    assert st.counts["valid"] == 3 and st.counts["stale"] == 2 and st.counts["orphan"] == 1
    assert st.counts["missing"] == 0


def test_status_counts_every_history_entry_file_when_the_mode_is_unknown(histories):
    root, _, ep, _, _ = histories
    store = FeatureStore(root, "toy", fingerprint=FP)
    os.remove(store.manifest_path)
    _repaint(os.path.join(root, ep[3]))
    st = ops.status(store).status
    assert st.unit == "histories"
    assert (st.counts["valid"], st.counts["stale"], st.counts["missing"]) == (7, 1, 0)


def test_verify_judges_every_history_entry_with_its_frames_digested(histories):
    root, rels, ep, ep2, _ = histories
    store = FeatureStore(root, "toy")
    report = ops.verify(store, rels)
    assert report.ok and report.entries == 8 and report.histories == 6 and report.counts["valid"] == 8
    assert "8 frames, 6 histories" in report.text() and report.to_dict()["unit"] == "histories"

    frame = os.path.join(root, ep[1])
    st = os.stat(frame)
    data = bytearray(open(frame, "rb").read())
    data[-1] ^= 0xFF  # same size, mtime restored: only a digest tells
    open(frame, "wb").write(bytes(data))
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns))
    corrupt = history_entry_path(store, ep2[:3])
    with open(corrupt, "r+b") as f:
        f.truncate(100)
    problems = {p.path: p.state for p in ops.verify(store, rels).problems}
    stale = {history_entry_path(store, ep[:k]): "stale" for k in (2, 3, 4)}
    assert problems == {**stale, corrupt: "corrupt"}
    moved = ops.verify(store, rels, quarantine_bad=True).quarantined
    assert {src for src, _ in moved} == set(problems)
    assert store.get_history(ep[:1]) is not None and store.get_history(ep2[:4]) is not None


def test_gc_removes_orphaned_and_stale_history_entries_never_a_valid_one(histories):
    root, rels, ep, ep2, _ = histories
    store = FeatureStore(root, "toy")
    stale = {history_entry_path(store, ep[:k]) for k in (3, 4)}
    orphan = history_entry_path(store, ep2[:4])
    valid = [ep[:1], ep[:2], ep2[:1], ep2[:2], ep2[:3]]
    _repaint(os.path.join(root, ep[2]))
    os.remove(os.path.join(root, ep2[3]))
    rels = [r for r in rels if r != ep2[3]]
    plan = ops.plan_gc(store, rels)
    assert {(i.path, i.kind) for i in plan.remove} == {(p, "stale") for p in stale} | {(orphan, "orphan")}
    assert all(i.reason.startswith("history ") for i in plan.remove)
    ops.execute_gc(store, plan)
    assert not any(os.path.exists(p) for p in [*stale, orphan])
    assert all(store.get_history(v) is not None for v in valid)
    assert len(history_entry_files(store)) == 5

    touched = history_entry_path(store, ep2[:2])
    os.utime(os.path.join(root, ep2[0]))  # same bytes, new stamps: entries filed under the old ones are kept
    plan = ops.plan_gc(store, rels)
    assert plan.remove == []
    assert any(i.path == touched and i.kind == "valid" for i in plan.kept)


def test_gc_acts_only_on_the_history_entry_file_it_judged(histories):
    root, rels, ep, _, _ = histories
    store = FeatureStore(root, "toy")
    _repaint(os.path.join(root, ep[3]))
    plan = ops.plan_gc(store, rels)
    judged = plan.remove[0].path
    assert [i.kind for i in plan.remove] == ["stale"]
    # A writer replaces the judged file (another inode) before gc removes it: gc leaves it.
    shutil.copyfile(judged, judged + ".new")
    os.replace(judged + ".new", judged)
    ops.execute_gc(store, plan)
    assert os.path.exists(judged) and plan.removed == []
    assert plan.skipped == [(judged, KEPT_REWRITTEN)]


def test_the_commands_see_histories_and_explain_one(histories):
    root, _, ep, _, _ = histories
    code, out, err = cli("status", root, "--feature", "toy", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unit"] == "histories" and doc["histories"] == 6 and doc["counts"]["valid"] == 6
    code, out, err = cli("verify", root, "--feature", "toy", "--json")
    assert code == 0 and json.loads(out)["entries"] == 8, err
    code, out, err = cli("gc", root, "--feature", "toy", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["remove"] == [], err

    code, out, err = cli("explain", "--history", *ep[:3], "--data-root", root, "--feature", "toy")
    assert code == 0, err
    assert "history of 3 frames ending in" in out and ": valid (hit)" in out

    _repaint(os.path.join(root, ep[1]))
    code, out, err = cli("explain", "--history", *ep[:3], "--data-root", root, "--feature", "toy", "--json")
    assert code == 1, err
    e = json.loads(out)["explanations"][0]
    assert e["state"] == "stale" and e["frames"] == ep[:3] and "frame 1" in e["details"]
    assert "content differs" in e["details"]["frame 1"]
    code, out, err = cli("explain", "--history", ep[0], ep[2], "--data-root", root, "--feature", "toy")
    assert code == 1 and "missing (miss)" in out and "the first 1 frames" in out, err
