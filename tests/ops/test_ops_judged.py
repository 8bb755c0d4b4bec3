"""Destructive operations act only on what they judged: an entry rewritten between the judgment
(``plan_gc``, ``verify``, ``plan_migrate``, the check inside ``remove``) and the act survives,
valid, and the reports say it was kept."""

import json
import os

import pytest
import torch
from conftest import age

from featstore import FeatureStore, _core
from featstore.ops import execute_gc, execute_migrate, plan_gc, plan_migrate, quarantine, quarantine_dir, verify

KEPT = "kept: rewritten since it was judged"


@pytest.fixture
def cached(tree):
    """Every source aged and cached with fingerprint fpA (a manifest records it)."""
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    for r in rels:
        store.put(r, {"features": torch.zeros(4)})
    store.write_manifest(store.status(rels), rels)
    return root, rels


def entry(root, rel):
    return os.path.join(root, rel) + ".vggt.safetensors"


def rewrite_fresh(root, rel, value=7.0):
    """A concurrent writer (a lazy training loop) putting a fresh, valid entry."""
    FeatureStore(root, "vggt", fingerprint="fpA").put(rel, {"features": torch.full((4,), value)})


def assert_fresh(root, rel, value=7.0):
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    assert store.check(rel).state == "valid"
    got = store.get(rel)
    assert got is not None and torch.equal(got["features"], torch.full((4,), value))


def test_gc_leaves_a_foreign_entry_rewritten_after_planning(cached):
    root, rels = cached
    other = FeatureStore(root, "vggt", fingerprint="fpB")
    for r in rels[:3]:
        other.put(r, {"features": torch.ones(4)})
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    plan = plan_gc(store, rels)
    assert sorted(i.path for i in plan.remove) == sorted(entry(root, r) for r in rels[:3])
    assert all(i.identity is not None for i in plan.remove)
    rewrite_fresh(root, rels[0])
    done = execute_gc(store, plan)
    assert_fresh(root, rels[0])
    assert sorted(i.path for i in done.removed) == sorted(entry(root, r) for r in rels[1:3])
    assert done.skipped == [(entry(root, rels[0]), KEPT)]
    doc = done.to_dict()
    assert doc["rewritten_since_judged"] == 1 and doc["skipped"] == [[entry(root, rels[0]), KEPT]]
    assert KEPT in done.text()
    assert not [f for f in os.listdir(os.path.dirname(entry(root, rels[0]))) if f.endswith(".judged")]


def test_gc_leaves_a_stale_entry_rewritten_after_planning(cached):
    root, rels = cached
    with open(os.path.join(root, rels[4]), "ab") as f:
        f.write(b"edit")  # in place: the same file, changed: its entry is stale
    age(os.path.join(root, rels[4]))
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    plan = plan_gc(store, rels)
    assert [(i.path, i.kind) for i in plan.remove] == [(entry(root, rels[4]), "stale")]
    rewrite_fresh(root, rels[4])
    done = execute_gc(store, plan)
    assert done.removed == [] and done.skipped == [(entry(root, rels[4]), KEPT)]
    assert_fresh(root, rels[4])


def test_gc_dir_layout_leaves_an_entry_rewritten_after_planning(tree, tmp_path):
    root, rels = tree
    cache = str(tmp_path / "cache")
    for r in rels:
        age(os.path.join(root, r))
    FeatureStore(root, "vggt", cache_dir=cache, fingerprint="fpB").put(rels[0], {"features": torch.ones(4)})
    store = FeatureStore(root, "vggt", cache_dir=cache, fingerprint="fpA")
    plan = plan_gc(store, rels, force=True)
    assert [i.kind for i in plan.remove] == ["foreign"]
    FeatureStore(root, "vggt", cache_dir=cache, fingerprint="fpA").put(rels[0], {"features": torch.full((4,), 7.0)})
    done = execute_gc(store, plan)
    assert done.removed == [] and [why for _, why in done.skipped] == [KEPT]
    fresh = FeatureStore(root, "vggt", cache_dir=cache, fingerprint="fpA")
    assert fresh.check(rels[0]).state == "valid"


def test_gc_without_a_known_fingerprint_removes_no_foreign_entry(tree):
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    FeatureStore(root, "vggt", fingerprint="fpA").put(rels[0], {"features": torch.zeros(4)})
    FeatureStore(root, "vggt", fingerprint="fpB").put(rels[1], {"features": torch.ones(4)})
    os.remove(os.path.join(root, "vggt_cache_manifest.json"))  # the first put recorded fpA: moved aside
    store = FeatureStore(root, "vggt")  # no manifest, no fingerprint: which one is current is unknown
    assert store.fingerprint is None
    plan = plan_gc(store, rels)
    assert plan.remove == []
    kept = {i.path: i.reason for i in plan.kept}
    assert any("no fingerprint" in why for why in kept.values())
    execute_gc(store, plan)
    assert os.path.exists(entry(root, rels[0])) and os.path.exists(entry(root, rels[1]))


def test_verify_quarantine_leaves_an_entry_rewritten_after_verify_judged_it(cached):
    root, rels = cached
    other = FeatureStore(root, "vggt", fingerprint="fpB")
    for r in rels[:2]:
        other.put(r, {"features": torch.ones(4)})
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    report = verify(store, rels)
    assert sorted(p.path for p in report.problems) == sorted(entry(root, r) for r in rels[:2])
    assert all(p.identity is not None for p in report.problems)
    rewrite_fresh(root, rels[0])
    moved = quarantine(store, report.problems)
    assert [src for src, _ in moved] == [entry(root, rels[1])]
    assert_fresh(root, rels[0])
    with open(os.path.join(quarantine_dir(store), "quarantine.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    assert [(r["from"], r["state"]) for r in log] == [(entry(root, rels[1]), "foreign")]
    assert "fpB" in log[0]["reason"]
    # The file moved is the one judged: the foreign entry, not a valid one.
    assert _core.read_header(moved[0][1])[0]["fingerprint"] == "fpB"


def test_verify_quarantine_reports_the_entries_it_kept(cached):
    root, rels = cached
    FeatureStore(root, "vggt", fingerprint="fpB").put(rels[0], {"features": torch.ones(4)})
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    report = verify(store, rels)
    rewrite_fresh(root, rels[0])
    kept: list[tuple[str, str]] = []
    assert quarantine(store, report.problems, kept=kept) == []
    assert kept == [(entry(root, rels[0]), KEPT)]
    assert_fresh(root, rels[0])


def test_migrate_delete_old_leaves_a_legacy_file_rewritten_after_planning(tree):
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    legacy = [os.path.join(root, r) + ".vggt_cache.pt" for r in rels[:2]]
    for p in legacy:
        torch.save({"features": torch.zeros(4)}, p)
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    plan = plan_migrate(store, rels)
    assert sorted(i.legacy for i in plan.convert) == sorted(legacy)
    # An old training script still running writes a fresh legacy file over the first one.
    tmp = legacy[0] + ".new"
    torch.save({"features": torch.full((4,), 3.0)}, tmp)
    os.replace(tmp, legacy[0])
    done = execute_migrate(store, plan, delete_old=True)
    assert done.deleted == [legacy[1]] and not os.path.exists(legacy[1])
    assert os.path.exists(legacy[0])
    assert torch.equal(torch.load(legacy[0], weights_only=True)["features"], torch.full((4,), 3.0))
    assert (legacy[0], KEPT) in done.kept
    assert KEPT in done.text() and [legacy[0], KEPT] in done.to_dict()["kept"]


def test_remove_leaves_an_entry_rewritten_after_its_check(cached, monkeypatch):
    root, rels = cached
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    judged = FeatureStore.check

    def check_then_rewrite(self, path, **kw):
        c = judged(self, path, **kw)
        rewrite_fresh(root, rels[0])  # between the judgment and the removal
        return c

    monkeypatch.setattr(FeatureStore, "check", check_then_rewrite)
    assert store.remove(rels[0]) is False
    monkeypatch.undo()
    assert_fresh(root, rels[0])
    assert store.remove(rels[1]) is True
    assert not os.path.exists(entry(root, rels[1]))
    assert store.state(rels[1]) == "missing"


def test_remove_never_deletes_a_legacy_file_or_a_source(tree):
    root, rels = tree
    age(os.path.join(root, rels[0]))
    legacy = os.path.join(root, rels[0]) + ".vggt_cache.pt"
    torch.save({"features": torch.zeros(4)}, legacy)
    store = FeatureStore(root, "vggt")
    assert store.remove(rels[0]) is False
    assert os.path.exists(legacy) and os.path.exists(os.path.join(root, rels[0]))
