"""History entries under the maintenance commands: after lazy training with history_fn wrote every
prefix of three episodes, status, verify, gc and a second pass see exactly what changed; gc removes
only entries whose frames are gone or changed, never a valid one; verify finds what only a digest
shows; a second pass recomputes exactly the samples whose history holds a changed frame."""

from __future__ import annotations

import json
import os

import numpy as np
from conftest import age
from PIL import Image
from toy_datasets import Histories, frames_of
from toy_encoders import CausalMean, causal_mean_features

from featstore import CachedDataset, FeatureStore, _core, ops
from featstore.examples import make_image_tree
from featstore.history import history_entry_files, history_entry_path


def _lazy(root: str, lists: list[list[str]], enc: CausalMean) -> dict:
    ds = CachedDataset(Histories(root, lists), FeatureStore(root, "toy"), history_fn=frames_of, encoder=enc,
                       mode="lazy", log_start=False)
    return ds.collate(ds.__getitems__(list(range(len(lists)))))


def test_history_entries_under_maintenance_commands(tmp_path, figures):
    fig = figures("history entries under maintenance commands")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 12, scenes=3, size=28)
    for r in rels:
        age(os.path.join(root, r))
    eps = [[r for r in rels if r.startswith(f"scene00{i}/")] for i in range(3)]  # 4 frames each
    lists = [ep[:k] for ep in eps for k in range(1, 5)]  # every step of every episode is a sample
    problems: list[str] = []
    cases = 0

    def check(ok: bool, what: str) -> None:
        nonlocal cases
        cases += 1
        if not ok:
            problems.append(what)

    enc = CausalMean()
    _lazy(root, lists, enc)
    check((enc.history_calls, enc.frames_fed) == (1, 12), f"lazy pass: {enc.history_calls} calls, {enc.frames_fed} "
          "frames (one call streaming the 3 episodes)")
    store = FeatureStore(root, "toy")
    st = ops.status(store).status
    check(st.unit == "histories" and st.counts["valid"] == 12, f"status after the lazy pass: {st.unit} {st.counts}")
    report = ops.verify(store, rels)
    check(report.ok and report.entries == 12, f"verify after the lazy pass: {report.counts}")
    check(not ops.plan_gc(store, rels).remove, "gc planned a removal on a fully valid cache")

    gone, edited, flipped, touched = eps[0][3], eps[1][2], eps[2][3], eps[2][1]
    old = {name: history_entry_path(store, ep) for name, ep in
           (("gone", eps[0]), ("edited3", eps[1][:3]), ("edited4", eps[1]), ("flipped", eps[2]),
            ("touched2", eps[2][:2]), ("touched3", eps[2][:3]))}
    os.remove(os.path.join(root, gone))
    with Image.open(os.path.join(root, edited)) as im:
        fmt, size = im.format, im.size
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        os.path.join(root, edited), format=fmt)
    age(os.path.join(root, edited), 50)
    member = os.path.join(root, flipped)
    stamp = os.stat(member)
    data = bytearray(open(member, "rb").read())
    data[-1] ^= 0xFF
    open(member, "wb").write(bytes(data))
    os.utime(member, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # only a digest tells
    os.utime(os.path.join(root, touched))  # same bytes, another stamp
    rels = [r for r in rels if r != gone]

    # valid: eps[0][:1..3], eps[1][:1..2], eps[2][:1], and eps[2][:2..3] filed under the touched
    # frame's old stamp (same bytes); stale: the two holding the edited frame, the one holding the
    # flipped one; orphan: the one holding the deleted frame
    st = ops.status(store).status
    expected = {"valid": 8, "stale": 3, "orphan": 1, "missing": 0}
    check(all(st.counts[k] == n for k, n in expected.items()), f"status after the changes: {st.counts}")
    bad = {old["gone"]: "orphan", old["edited3"]: "stale", old["edited4"]: "stale", old["flipped"]: "stale"}
    found = {p.path: p.state for p in ops.verify(store, rels).problems}
    check(found == bad, f"verify after the changes: {found}")
    plan = ops.plan_gc(store, rels)
    planned = {i.path: i.kind for i in plan.remove}
    check(planned == bad, f"gc planned {planned}")
    ops.execute_gc(store, plan)
    check(os.path.exists(old["touched2"]) and os.path.exists(old["touched3"]),
          "gc removed a history entry whose frames' bytes are unchanged")
    still = [eps[0][:1], eps[0][:2], eps[0][:3], eps[1][:1], eps[1][:2], eps[2][:1]]
    check(all(store.get_history(h) is not None for h in still), "a valid history stopped being served after gc")
    check(len(history_entry_files(store)) == 8, f"{len(history_entry_files(store))} history entries left, not 8")

    # A second pass over the samples whose frames exist and decode: exactly those holding the
    # edited or the touched frame are computed again, in one pass per longest list.
    again = [h for h in lists if gone not in h and flipped not in h]
    enc = CausalMean()
    batch = _lazy(root, again, enc)
    recomputed = [h for h, c in zip(again, batch["cached"].tolist(), strict=True) if not c]
    check(recomputed == [eps[1][:3], eps[1][:4], eps[2][:2], eps[2][:3]], f"the second pass recomputed {recomputed}")
    check(enc.history_calls == 2 and enc.frames_fed == 7, f"second pass: {enc.history_calls} calls, "
          f"{enc.frames_fed} frames (one pass of 4 and one of 3 frames)")
    wrong = [h for j, h in enumerate(again)
             if not np.allclose(batch["features"][j].numpy(), causal_mean_features(root, h).numpy(), atol=1e-6)]
    check(not wrong, f"the second pass served wrong features for {wrong}")

    # With the .jsonl field recorded (as precompute --history records it), status counts the samples.
    with open(os.path.join(root, "episodes.jsonl"), "w") as f:
        f.writelines(json.dumps({"images": h}) + "\n" for h in lists)
    doc = json.loads(_core.read_manifest(store.manifest_path) or "{}")
    _core.write_manifest(store.manifest_path, json.dumps({**doc, "jsonl": "images"}))
    st = ops.status(FeatureStore(root, "toy")).status
    # 11 samples whose frames all exist: 10 valid, the one holding the flipped frame missing
    # (gc removed its stale entry and it was not computed again)
    check(st.items == 11 and st.counts["valid"] == 10 and st.counts["missing"] == 1,
          f"status by samples: {st.items} histories, {st.counts}")
    fig.add(runs=1, cases=cases, failures=len(problems))
    fig.note("lazy history_fn pass over every step of 3 episodes; a frame deleted, edited, touched, and edited "
             "with its stamp restored; status, verify, gc and a second lazy pass each judged")
    assert not problems, problems
