"""Frame sets under the maintenance commands: after `precompute --frames-per-set N`, status,
verify, gc and a rerun see the sets as precompute grouped them; gc removes only sets whose members
are gone or changed, never a valid one; verify finds what only a digest shows."""

from __future__ import annotations

import os

from conftest import age

from featstore import FeatureStore, ops
from featstore.examples import make_image_tree
from featstore.pipeline import precompute
from featstore.sets import group_frames, set_entry_path

ENCODER = {"random_weights_seed": 0, "frames_per_set": 3}


def _run(root: str) -> dict:
    return precompute(root, encoder_options=ENCODER, num_workers=0, progress=False)


def test_frame_sets_under_maintenance_commands(tmp_path, figures):
    fig = figures("frame sets under maintenance commands")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 16, scenes=2, size=28)
    for r in rels:
        age(os.path.join(root, r))
    groups = group_frames([], rels, 3)  # 8 frames per scene: 3 + 3 + 2, twice
    problems: list[str] = []
    cases = 0

    def check(ok: bool, what: str) -> None:
        nonlocal cases
        cases += 1
        if not ok:
            problems.append(what)

    s = _run(root)
    check(s["written"] == len(groups) and s["unit"] == "sets", f"precompute wrote {s['written']} sets")
    store = FeatureStore(root, "vggt")
    st = ops.status(store).status
    check(st.unit == "sets" and st.counts["valid"] == len(groups) and st.counts["missing"] == 0,
          f"status after precompute: {st.counts}")
    report = ops.verify(store, rels)
    check(report.ok and report.entries == len(groups), f"verify after precompute: {report.counts}")
    check(not ops.plan_gc(store, rels).remove, "gc planned a removal on a fully valid cache")

    # A deleted frame regroups the chunks after it in its directory: delete one of a last chunk.
    gone, edited, touched, flipped = groups[5], groups[1], groups[3], groups[4]
    paths = {name: set_entry_path(store, g) for name, g in
             (("gone", gone), ("edited", edited), ("touched", touched), ("flipped", flipped))}
    os.remove(os.path.join(root, gone[1]))
    with open(os.path.join(root, edited[0]), "ab") as f:
        f.write(b"edit")
    os.utime(os.path.join(root, touched[0]))  # same bytes, another stamp
    member = os.path.join(root, flipped[2])
    stamp = os.stat(member)
    data = bytearray(open(member, "rb").read())
    data[-1] ^= 0xFF
    open(member, "wb").write(bytes(data))
    os.utime(member, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # only a digest tells

    rels = [r for r in rels if r != gone[1]]
    st = ops.status(store).status
    # valid: groups 0 and 2; stale: the edited one and the flipped one (its size and mtime held,
    # but its ctime moved, so the digest was compared); missing: the touched one (new stamps, no
    # entry under them) and the last chunk without its deleted frame
    expected = {"valid": 2, "stale": 2, "missing": 2, "orphan": 1}
    check(all(st.counts[k] == n for k, n in expected.items()), f"status after the changes: {st.counts}")
    problems_found = {p.path: p.state for p in ops.verify(store, rels).problems}
    check(problems_found == {paths["gone"]: "orphan", paths["edited"]: "stale", paths["flipped"]: "stale"},
          f"verify after the changes: {problems_found}")
    plan = ops.plan_gc(store, rels)
    planned = {i.path: i.kind for i in plan.remove}
    check(planned == {paths["gone"]: "orphan", paths["edited"]: "stale", paths["flipped"]: "stale"},
          f"gc planned {planned}")
    ops.execute_gc(store, plan)
    check(os.path.exists(paths["touched"]), "gc removed a set whose members' bytes are unchanged")
    untouched = [groups[0], groups[2]]
    check(all(store.get_set(g) is not None for g in untouched), "a valid set stopped being served after gc")

    again = _run(root)
    regrouped = group_frames([], rels, 3)
    # The flipped member is no longer a decodable image (its last byte flipped): its set is
    # recomputed, fails and is recorded; every other set is complete.
    broken = [g for g in regrouped if flipped[2] in g]
    failures = [name for name, _ in again.get("failures", [])]
    check(again["written"] == again["planned"] - len(broken) and len(failures) == len(broken)
          and all(flipped[2] in name for name in failures)
          and all(store.get_set(g) is not None for g in regrouped if g not in broken),
          f"the rerun did not complete the sets: {again['planned']} planned, {again['written']} written, "
          f"failures {failures}")
    fig.add(runs=1, cases=cases, failures=len(problems))
    fig.note("precompute --frames-per-set 3 on 2 directories; a member deleted, edited, touched, and edited "
             "with its stamp restored; status, verify, gc and a rerun each judged")
    assert not problems, problems
