"""Copies sharing a cache: a dataset and its ``cp -r`` copy with one ``--cache-dir`` (dir layout)
both keep hitting after each is read and after a precompute of each, and gc run for either root
never removes the other root's valid entries (docs/design.md, "Invariants": a copy never destroys the original)."""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from conftest import age
from PIL import Image, ImageOps
from toy_encoders import MeanColor

from featstore import FeatureStore
from featstore.examples import make_image_tree
from featstore.ops import execute_gc, plan_gc
from featstore.pipeline import precompute

FP = MeanColor().fingerprint()


def _expected(root: str, rels: list[str]) -> dict[str, torch.Tensor]:
    enc = MeanColor()
    return {r: enc.encode(enc.preprocess(os.path.join(root, r))[None].float() / 255)["features"][0] for r in rels}


def _misses(root: str, cache: str, rels: list[str], expected: dict[str, torch.Tensor]) -> list[str]:
    """Sources of ``root`` not served exactly the expected features by a fresh store."""
    store = FeatureStore(root, "toy", cache_dir=cache)
    wrong = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in rels:
            got = store.get(r)
            if got is None or not torch.equal(got["features"], expected[r]):
                wrong.append(r)
    return wrong


def _gc(root: str, cache: str, rels: list[str], *, force: bool = False) -> int:
    store = FeatureStore(root, "toy", cache_dir=cache, fingerprint=FP)
    return len(execute_gc(store, plan_gc(store, rels, force=force)).removed)


def _precompute(root: str, cache: str) -> dict:
    return precompute(root, encoder=MeanColor(), cache_dir=cache, num_workers=0, progress=False)


def test_a_dataset_and_its_copy_sharing_a_cache_both_keep_hitting(tmp_path, figures):
    fig = figures("copies sharing a cache")
    a, b, cache = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "cache")
    rels = make_image_tree(a, 9, size=32)
    for r in rels:
        age(os.path.join(a, r), 200)
    shutil.copytree(a, b, copy_function=shutil.copy)  # `cp -r`: new inodes and mtimes
    for r in rels:
        age(os.path.join(b, r), 100)  # out of the racy window, another mtime than a's: other keys
    want_a = _expected(a, rels)
    cases = 0

    def both_hit(step: str) -> None:
        nonlocal cases
        for root, want in ((a, want_a), (b, want_b)):
            missed = _misses(root, cache, rels, want)
            cases += len(rels)
            assert missed == [], f"after {step}: {root} misses {missed}"

    assert _precompute(a, cache)["failed"] == 0
    want_b = dict(want_a)
    assert _misses(b, cache, rels, want_b) == []  # reading the copy refreshes into its keys...
    both_hit("reading the copy")  # ...and never costs the original its entries
    assert _precompute(b, cache)["failed"] == 0
    both_hit("a precompute of the copy")
    assert _precompute(a, cache)["failed"] == 0
    both_hit("a precompute of the original")
    # gc for the root the manifest records, and (forced) for the other one: nothing of either goes.
    assert _gc(a, cache, rels) == 0
    both_hit("gc of the original")
    assert _gc(b, cache, rels, force=True) == 0
    both_hit("gc --force of the copy")
    assert _precompute(b, cache)["failed"] == 0
    assert _gc(b, cache, rels) == 0 and _gc(a, cache, rels, force=True) == 0
    both_hit("a precompute and gc of the copy, then gc --force of the original")

    # The copy diverges: one image edited in place there. Each root keeps its own entry of it.
    edited = os.path.join(b, rels[0])
    with Image.open(edited) as im:
        fmt, inverted = im.format, ImageOps.invert(im.convert("RGB"))
    inverted.save(edited, format=fmt)  # rewritten in place: the copy's file, other pixels
    age(edited, 50)
    want_b[rels[0]] = _expected(b, rels[:1])[rels[0]]
    assert _precompute(b, cache)["failed"] == 0
    both_hit("an edit in the copy and its precompute")
    assert _gc(b, cache, rels) == 1  # the copy's own entry of its file before the edit
    assert _gc(a, cache, rels, force=True) == 0
    both_hit("gc of both after the copy diverged")
    assert _precompute(a, cache)["failed"] == 0
    assert _gc(a, cache, rels) == 0 and _gc(b, cache, rels, force=True) == 0
    both_hit("a precompute and gc of the original after the copy diverged")
    fig.add(runs=1, cases=cases)
    fig.note("dir layout, `cp -r` copy: reads, precomputes and gc (plain and --force) of each root; "
             "gc keeps entries written for the other root's files")


def test_gc_of_one_root_still_removes_its_own_stale_entries_beside_a_copy(tmp_path, figures):
    fig = figures("copies sharing a cache")
    a, b, cache = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "cache")
    rels = make_image_tree(a, 6, size=32)
    for r in rels:
        age(os.path.join(a, r), 200)
    shutil.copytree(a, b, copy_function=shutil.copy)
    for r in rels:
        age(os.path.join(b, r), 100)
    _precompute(a, cache)
    assert _misses(b, cache, rels, _expected(b, rels)) == []
    # The original's own image edited in place (same file): its old entry is its own, and stale.
    with open(os.path.join(a, rels[1]), "ab") as f:
        f.write(b"edit")
    age(os.path.join(a, rels[1]), 150)
    store = FeatureStore(a, "toy", cache_dir=cache, fingerprint=FP)
    plan = plan_gc(store, rels)
    assert [(i.source, i.kind) for i in plan.remove] == [(rels[1], "stale")]
    execute_gc(store, plan)
    assert _misses(b, cache, rels, _expected(b, rels)) == []
    fig.add(runs=1, cases=len(rels) + 1)
