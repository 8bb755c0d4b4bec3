"""Destructive operations racing training: ``gc`` and ``verify --quarantine`` run over and over in
another process while a ``CachedDataset(mode="lazy")`` loop with two DataLoader workers rewrites
the entries they judged bad. Only the files judged may go: every removal is checked against the
identities of the bad files planted, every quarantined file is read back, and at the end every
source must have a valid entry (docs/design.md, "Invariants": destructive operations act only on what they judged).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import warnings

import torch
from conftest import age
from toy_datasets import Images, source_of
from toy_encoders import MeanColor

from featstore import CachedDataset, FeatureStore, _core
from featstore.examples import make_image_tree
from featstore.ops import execute_gc, plan_gc, quarantine, quarantine_dir, verify
from featstore.ops.files import KEPT_REWRITTEN, file_identity

from .conftest import fork

FP = MeanColor().fingerprint()
OLD = "toy-v0"  # the fingerprint of the bad (foreign) entries planted before each epoch
IMAGES = 64
ROUNDS = 6  # epochs, each over freshly planted bad entries, gc and verify in turn; a few seconds in all


def _plant(root: str, rels: list[str]) -> list[list[int]]:
    """A foreign entry for every source (what gc removes and verify quarantines); their identities."""
    old = FeatureStore(root, "toy", fingerprint=OLD)
    out = []
    for r in rels:
        path = old.put(r, {"features": torch.zeros(48)})
        ident = file_identity(path)
        assert ident is not None
        out.append(list(ident))
    return out


def _destroy(root: str, rels: list[str], planted: list[list[int]], op: str, stop: str, out: str) -> None:
    """The other process: once training has written its first entry, ``op`` over and over until
    ``stop`` exists: ``gc`` (plan, then remove), or ``verify`` (``verify --quarantine``, and
    verify then quarantine: its two steps with the pause a large tree puts between them)."""
    done = {"gc_runs": 0, "verify_runs": 0, "planned": 0, "removed": [], "kept_rewritten": 0, "gone": 0,
            "quarantine_planned": 0, "quarantined": [], "quarantine_kept_rewritten": 0}
    entries = [os.path.join(root, r) + ".toy.safetensors" for r in rels]
    deadline = time.monotonic() + 60
    while all(list(file_identity(e) or ()) == p for e, p in zip(entries, planted, strict=True)):
        if os.path.exists(stop) or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    rng = random.Random(0)
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while not os.path.exists(stop):
            store = FeatureStore(root, "toy", fingerprint=FP)
            if op == "gc":
                plan = plan_gc(store, rels, progress=False)
                done["planned"] += len(plan.remove)
                time.sleep(rng.uniform(0, 0.03))  # a survey of a large tree takes a while
                execute_gc(store, plan, progress=False)
                done["gc_runs"] += 1
                done["removed"] += [[i.path, list(i.identity or ())] for i in plan.removed]
                done["kept_rewritten"] += plan.rewritten
                done["gone"] += sum(why == "already gone" for _, why in plan.skipped)
            else:
                if n % 2 == 0:
                    report = verify(store, rels, quarantine_bad=True, progress=False)
                else:
                    report = verify(store, rels, progress=False)
                    time.sleep(rng.uniform(0, 0.03))
                    report.quarantined = quarantine(store, report.problems, kept=report.kept)
                done["verify_runs"] += 1
                done["quarantine_planned"] += len(report.problems)
                for src, dst in report.quarantined:
                    done["quarantined"].append([src, dst, _core.read_header(dst)[0].get("fingerprint")])
                done["quarantine_kept_rewritten"] += sum(why == KEPT_REWRITTEN for _, why in report.kept)
            n += 1
    with open(out, "w", encoding="utf-8") as f:
        json.dump(done, f)


def test_gc_and_verify_quarantine_racing_a_lazy_loop_lose_no_valid_entry(tmp_path, figures):
    fig = figures("destructive operations racing training")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, IMAGES, size=32)
    for r in rels:
        age(os.path.join(root, r))
    ctx = multiprocessing.get_context("fork")
    totals = {"gc_runs": 0, "verify_runs": 0, "planned": 0, "removed": 0, "kept_rewritten": 0,
              "quarantine_planned": 0, "quarantined": 0, "quarantine_kept_rewritten": 0}
    problems: list[str] = []
    for rnd in range(ROUNDS):
        idents = _plant(root, rels)
        planted = {tuple(i) for i in idents}
        stop, out = str(tmp_path / f"stop{rnd}"), str(tmp_path / f"done{rnd}.json")
        other = fork(_destroy, root, rels, idents, "gc" if rnd % 2 == 0 else "verify", stop, out)
        ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy", fingerprint=FP), path_fn=source_of,
                           encoder=MeanColor(delay=0.02), mode="lazy", log_start=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(ds.loader(batch_size=2, num_workers=2, shuffle=True, multiprocessing_context=ctx))
        open(stop, "w").close()
        other.join(120)
        assert other.exitcode == 0
        with open(out, encoding="utf-8") as f:
            done = json.load(f)
        # Every sample was served its own features, computed or read.
        for b in batches:
            for i, feats in zip(b["index"].tolist(), b["features"], strict=True):
                enc = MeanColor()
                want = enc.encode(enc.preprocess(os.path.join(root, rels[i]))[None].float() / 255)["features"][0]
                if not torch.allclose(feats, want, atol=1e-6):
                    problems.append(f"round {rnd}: {rels[i]} served other features")
        # Each removal was of a planted bad file, never of one the loop wrote.
        for path, ident in done["removed"]:
            if tuple(ident) not in planted:
                problems.append(f"round {rnd}: gc removed {path}, which was not a planted bad entry")
        # Each file moved aside is a bad one, and the log gives the moved file's own reason.
        for src, _, fingerprint in done["quarantined"]:
            if fingerprint != OLD:
                problems.append(f"round {rnd}: quarantine moved {src} with fingerprint {fingerprint}")
        # No valid entry lost or moved: after the epoch every source has its valid entry.
        store = FeatureStore(root, "toy", fingerprint=FP)
        lost = [r for r in rels if store.check(r).state != "valid"]
        problems.extend(f"round {rnd}: {r} has no valid entry after the epoch" for r in lost)
        for k in totals:
            v = done[k]
            totals[k] += len(v) if isinstance(v, list) else v
    held = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".judged")]
    problems.extend(f"left behind: {p}" for p in held)  # every file held for a judgment was acted on or put back
    log = os.path.join(quarantine_dir(FeatureStore(root, "toy")), "quarantine.jsonl")
    if os.path.exists(log):
        with open(log, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if OLD not in rec["reason"] or rec["state"] != "foreign":
                    problems.append(f"quarantine log: {rec['from']} logged as {rec['state']}: {rec['reason']}")
    fig.add(runs=ROUNDS, cases=totals["planned"] + totals["quarantine_planned"] + ROUNDS * len(rels),
            failures=len(problems))
    fig.note(f"{totals['gc_runs']} gc and {totals['verify_runs']} verify --quarantine runs against a lazy loop "
             f"(2 workers, {ROUNDS} epochs of {len(rels)}): {totals['removed']} of {totals['planned']} planned "
             f"removals made, {totals['kept_rewritten']} kept as rewritten; {totals['quarantined']} of "
             f"{totals['quarantine_planned']} planned moves made, {totals['quarantine_kept_rewritten']} kept as "
             "rewritten; 0 valid entries lost or moved")
    print("destructive races:", json.dumps(totals))
    assert problems == []
