"""The index's segments under crashes and upgrades (docs/design.md, "The index"): a kill while a
segment is written loses only that segment, and a manifest of the previous version, index inline,
keeps serving and is moved into a segment by the next merge."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import cli
from toy_encoders import MeanColor

from featstore import FeatureStore, _core
from featstore.examples import make_image_tree
from featstore.manifest import indexed_sources
from featstore.pipeline import precompute

WRITER = """
import sys
from featstore import FeatureStore
root, rels = sys.argv[1], sys.argv[2:]
store = FeatureStore(root, "toy")
assert all(store.contains(r) for r in rels)
print("ready", flush=True)
while True:
    store._core.write_index(rels, durable=False)
"""


def _tree(tmp_path, n=40):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, n, size=24)
    precompute(root, encoder=MeanColor(), batch_size=8, num_workers=0, progress=False)
    return root, sorted(rels)


def test_a_kill_while_a_segment_is_written_loses_no_finished_segment(tmp_path):
    root, rels = _tree(tmp_path)
    store = FeatureStore(root, "toy")
    rng = random.Random(7)
    for attempt in range(6):
        child = subprocess.Popen([sys.executable, "-c", WRITER, root, *rels], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        # Whatever the kill cut short is a temporary file; every segment is whole, and a fresh
        # store finds every entry in it.
        names = os.listdir(store.index_dir)
        assert all(n.endswith(".seg") or (n.startswith(".") and n.endswith(".tmp")) for n in names), names
        fresh = FeatureStore(root, "toy")
        assert sorted(indexed_sources(fresh)) == rels, f"attempt {attempt}"
    rc, out, _ = cli("status", root, "--feature", "toy", "--json")
    assert rc == 0 and json.loads(out)["counts"]["valid"] == len(rels)


def test_a_torn_segment_costs_full_checks_never_a_wrong_answer(tmp_path):
    root, rels = _tree(tmp_path, 12)
    store = FeatureStore(root, "toy")
    (segment,) = [os.path.join(store.index_dir, n) for n in os.listdir(store.index_dir)]
    with open(segment, "r+b") as f:  # a power loss before the data reached the disk
        f.truncate(os.path.getsize(segment) - 7)
    fresh = FeatureStore(root, "toy")
    assert indexed_sources(fresh) == [] and fresh.index_records(rels) == []
    # Every entry is still judged valid (by its header and digests), and the next merge
    # indexes what it judged.
    rc, out, _ = cli("status", root, "--feature", "toy", "--json")
    assert rc == 0 and json.loads(out)["counts"]["valid"] == len(rels)
    s = precompute(root, encoder=MeanColor(), batch_size=8, num_workers=0, progress=False)
    assert (s["written"], s["skipped"]) == (0, len(rels))
    assert sorted(indexed_sources(FeatureStore(root, "toy"))) == rels
    assert not os.path.exists(segment)  # the torn one was compacted away


def _as_previous_version(store: FeatureStore, rels: list[str]) -> dict:
    """The manifest as featstore 0.1 before segments wrote it: the index inline, one 9-number
    record per source ([size, mtime_ns, entry size, entry mtime_ns, check_first, ino, ctime_ns,
    entry ino, entry ctime_ns])."""
    doc = json.loads(_core.read_manifest(store.manifest_path))
    index = {}
    for rel in rels:
        src, ent = os.stat(os.path.join(store.data_root, rel)), os.stat(store.entry_path(rel))
        index[rel] = [src.st_size, src.st_mtime_ns, ent.st_size, ent.st_mtime_ns, 0, src.st_ino, src.st_ctime_ns,
                      ent.st_ino, ent.st_ctime_ns]
    doc["index"] = index
    doc["processed_images"] = len(index)
    return doc


def test_an_index_from_the_previous_version_serves_and_is_upgraded(tmp_path):
    root, rels = _tree(tmp_path, 10)
    store = FeatureStore(root, "toy")
    old = _as_previous_version(store, rels[:9])
    # What the previous version left: the index inline, no segments, a killed run's journal.
    for name in os.listdir(store.index_dir):
        os.remove(os.path.join(store.index_dir, name))
    with open(store.manifest_path, "w") as f:
        json.dump(old, f)
    src, ent = os.stat(os.path.join(root, rels[9])), os.stat(store.entry_path(rels[9]))
    journal = _core.journal_path(store.manifest_path, 0, 1)
    _core.append_journal(journal, [json.dumps({
        "op": "ok", "path": rels[9], "source": [src.st_size, src.st_mtime_ns, src.st_ino, src.st_ctime_ns],
        "entry": [ent.st_size, ent.st_mtime_ns, ent.st_ino, ent.st_ctime_ns], "racy": False,
        "fingerprint": old["fingerprint"]})])

    before = FeatureStore(root, "toy")
    assert before._core.holds_inline_index
    assert len(before.index_records(rels[:9])) == 9  # served from the inline index, as before

    rc, out, err = cli("status", root, "--feature", "toy", "--json")
    assert rc == 0 and json.loads(out)["counts"]["valid"] == len(rels)
    assert "moved the index of an earlier version's manifest" in err and "merged 1 journal" in err
    doc = json.load(open(store.manifest_path))
    assert "index" not in doc and doc["processed_images"] == len(rels)
    after = FeatureStore(root, "toy")
    assert not after._core.holds_inline_index and sorted(indexed_sources(after)) == rels
    assert len(after.index_records(rels)) == len(rels) and not os.path.exists(journal)
    # Once upgraded there is nothing left to move.
    rc, _, err = cli("status", root, "--feature", "toy")
    assert rc == 0 and "moved" not in err and "merged" not in err
