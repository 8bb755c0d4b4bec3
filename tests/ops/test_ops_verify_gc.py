"""`featstore verify` and `featstore gc`: every bad entry found, only featstore's own files removed."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import age, cli, run_unprivileged, snapshot

from featstore import FeatureStore
from featstore.examples import make_image_tree


def rewrite_header(entry, change):
    """Rewrites an entry's JSON header with ``change(header)`` applied, data unchanged."""
    raw = open(entry, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(entry, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featstore-ops-pwned",))


@pytest.fixture
def damaged(tree):
    """A sidecar cache indexed by its manifest, then damaged in every way verify must notice.

    Returns (root, rels, {kind: relative source}).
    """
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    store = FeatureStore(root, "vggt", fingerprint="fpA")
    for r in rels[:8]:
        store.put(r, {"features": torch.randn(16, 8)})
    store.write_manifest(store.status(rels), rels)
    which = {"valid": rels[0], "truncated": rels[1], "offsets": rels[2], "orphan": rels[3], "stale": rels[4],
             "foreign": rels[5], "flipped": rels[6], "legacy_code": rels[9]}
    entry = {k: os.path.join(root, r) + ".vggt.safetensors" for k, r in which.items()}
    with open(entry["truncated"], "r+b") as f:
        f.truncate(os.path.getsize(entry["truncated"]) - 100)
    rewrite_header(entry["offsets"], lambda h: h["features"]["data_offsets"].__setitem__(1, 10**6))
    os.remove(os.path.join(root, which["orphan"]))
    with open(os.path.join(root, which["stale"]), "ab") as f:
        f.write(b"edit")
    FeatureStore(root, "vggt", fingerprint="fpB").put(which["foreign"], {"features": torch.ones(2)})
    st = os.stat(entry["flipped"])
    with open(entry["flipped"], "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\xff\xfe")
    os.utime(entry["flipped"], ns=(st.st_atime_ns, st.st_mtime_ns))
    with open(os.path.join(root, which["legacy_code"]) + ".vggt_cache.pt", "wb") as f:
        pickle.dump({"features": _RunsCode()}, f)
    return root, rels, which


def test_verify_reports_each_bad_entry_with_its_reason(damaged):
    root, rels, which = damaged
    if os.path.exists("/tmp/featstore-ops-pwned"):
        os.remove("/tmp/featstore-ops-pwned")
    rc, out, _ = cli("verify", root, "--feature", "vggt", "--json")
    assert rc == 1
    doc = json.loads(out)
    bad = {p["source"]: (p["state"], p["reason"]) for p in doc["problems"]}
    assert bad[which["truncated"]][0] == "corrupt" and "truncated" in bad[which["truncated"]][1]
    assert bad[which["offsets"]][0] == "corrupt" and "out of range" in bad[which["offsets"]][1]
    assert bad[which["flipped"]][0] == "corrupt" and "checksum" in bad[which["flipped"]][1]
    assert bad[which["orphan"]][0] == "orphan"
    assert bad[which["stale"]][0] == "stale" and "changed" in bad[which["stale"]][1]
    assert bad[which["foreign"]][0] == "foreign" and "fpB" in bad[which["foreign"]][1]
    assert bad[which["legacy_code"]][0] == "corrupt" and "refused" in bad[which["legacy_code"]][1]
    assert which["valid"] not in bad and rels[7] not in bad
    assert not os.path.exists("/tmp/featstore-ops-pwned")
    assert doc["counts"]["valid"] == 2 and doc["quarantined"] == []
    rc, out, _ = cli("verify", root, "--feature", "vggt")
    assert "7 bad entries" in out and "--quarantine" in out


def test_verify_quarantine_moves_bad_entries_aside_and_deletes_nothing(damaged):
    root, rels, which = damaged
    before = snapshot(root)
    rc, out, _ = cli("verify", root, "--feature", "vggt", "--quarantine", "--json")
    assert rc == 1
    doc = json.loads(out)
    qdir = os.path.join(root, ".featstore", "vggt", "quarantine")
    assert doc["quarantine_dir"] == qdir and len(doc["quarantined"]) == 7
    for src, dst in doc["quarantined"]:
        rel = os.path.relpath(src, root)
        assert dst == os.path.join(qdir, rel) and not os.path.exists(src)
        assert open(dst, "rb").read() == before[rel]  # moved, byte for byte
    log = [json.loads(line) for line in open(os.path.join(qdir, "quarantine.jsonl"))]
    assert len(log) == 7 and all(entry["reason"] for entry in log)
    for r in rels:
        if r != which["orphan"]:
            assert open(os.path.join(root, r), "rb").read() == before[r]  # sources untouched
    rc, out, _ = cli("verify", root, "--feature", "vggt", "--json")
    assert rc == 0 and json.loads(out)["problems"] == []
    rc, out, _ = cli("status", root, "--feature", "vggt", "--json")
    assert json.loads(out)["counts"]["valid"] == 2  # quarantined entries are not counted as orphans


def test_verify_clean_cache_exits_0(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    for r in rels[:3]:
        store.put(r, {"features": torch.randn(5)})
    rc, out, _ = cli("verify", root, "--feature", "vggt")
    assert rc == 0 and "no bad entries" in out and "3 entries read in full" in out


def test_verify_notices_a_changed_caption_the_index_vouches_for(tree):
    root, rels = tree
    caption = os.path.join(root, rels[0] + ".txt")
    with open(caption, "w") as f:
        f.write("a red chair")
    for p in (os.path.join(root, rels[0]), caption):
        age(p)
    store = FeatureStore(root, "prompt_embed")
    store.put(rels[0], {"embeds": torch.ones(3)}, inputs={"caption": caption})
    store.write_manifest(store.status(rels), rels)
    with open(caption, "w") as f:
        f.write("a blue chair!")
    rc, out, _ = cli("verify", root, "--feature", "prompt_embed", "--json")
    problems = json.loads(out)["problems"]
    assert rc == 1 and [p["state"] for p in problems] == ["stale"] and "caption" in problems[0]["reason"]


def test_gc_dry_run_lists_and_sums_then_gc_removes_only_featstore_files(damaged):
    root, rels, which = damaged
    scene = os.path.dirname(which["valid"])
    old_tmp = os.path.join(root, scene, "." + os.path.basename(which["valid"]) + ".vggt.safetensors.Ab12Cd.tmp")
    new_tmp = os.path.join(root, scene, "." + os.path.basename(rels[7]) + ".vggt.safetensors.Zz99Yy.tmp")
    for p in (old_tmp, new_tmp):
        with open(p, "wb") as f:
            f.write(b"partial write")
    age(old_tmp, 3600)
    # Files that merely look like featstore's: a user's own .safetensors and .tmp files.
    decoy = os.path.join(root, scene, "notes.vggt.safetensors")
    with open(decoy, "wb") as f:
        f.write(b"not an entry")
    user_tmp = os.path.join(root, scene, ".draft.txt.tmp")
    with open(user_tmp, "w") as f:
        f.write("mine")
    age(user_tmp, 3600)
    before = snapshot(root)

    rc, out, _ = cli("gc", root, "--feature", "vggt", "--dry-run", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert snapshot(root) == before  # a dry run removes nothing
    planned = {(i["kind"], os.path.relpath(i["path"], root)) for i in plan["remove"]}
    entry = {k: r + ".vggt.safetensors" for k, r in which.items()}
    assert planned == {("orphan", entry["orphan"]), ("stale", entry["stale"]), ("foreign", entry["foreign"]),
                       ("temp", os.path.relpath(old_tmp, root))}
    assert plan["bytes"] == sum(len(before[rel]) for _, rel in planned)
    kept = {i["kind"] for i in plan["kept"]}
    assert {"corrupt", "legacy", "temp", "unknown"} <= kept
    rc, text, _ = cli("gc", root, "--feature", "vggt", "--dry-run")
    assert "4 files" in text and "dry run" in text and "left by an interrupted write" in text

    rc, out, _ = cli("gc", root, "--feature", "vggt", "--json")
    assert rc == 0 and len(json.loads(out)["removed"]) == 4
    # featstore's own state (gc's lock, the index's segments) aside:
    after = {rel: v for rel, v in snapshot(root).items() if not rel.startswith(".featstore/")}
    before = {rel: v for rel, v in before.items() if not rel.startswith(".featstore/")}
    assert set(before) - set(after) == {rel for _, rel in planned}
    for rel in after:
        assert after[rel] == before[rel]
    for r in rels:  # never a source
        if r != which["orphan"]:
            assert after[r] == before[r]
    assert os.path.exists(decoy) and os.path.exists(user_tmp) and os.path.exists(new_tmp)


def test_gc_keep_fingerprint_keeps_foreign_entries(damaged):
    root, _, which = damaged
    rc, out, _ = cli("gc", root, "--feature", "vggt", "--keep-fingerprint", "fpB", "--json")
    assert rc == 0
    assert not any(i["kind"] == "foreign" for i in json.loads(out)["removed"])
    assert os.path.exists(os.path.join(root, which["foreign"]) + ".vggt.safetensors")


def test_gc_dir_layout(tree, tmp_path):
    root, rels = tree
    for r in rels:
        age(os.path.join(root, r))
    cache = str(tmp_path / "cache")
    store = FeatureStore(root, "pixel_latent", cache_dir=cache)
    paths = {r: store.put(r, {"x": torch.randn(8)}) for r in rels[:4]}
    store.write_manifest(store.status(rels), rels)
    os.remove(os.path.join(root, rels[0]))  # orphan
    with open(os.path.join(root, rels[1]), "ab") as f:  # stale, under its old key
        f.write(b"edit")
    tmp = os.path.join(os.path.dirname(paths[rels[2]]), "." + os.path.basename(paths[rels[2]]) + ".q1w2e3.tmp")
    with open(tmp, "wb") as f:
        f.write(b"x")
    age(tmp, 3600)
    rc, out, _ = cli("gc", root, "--feature", "pixel_latent", "--cache-dir", cache, "--json")
    assert rc == 0
    removed = {(i["kind"], i["path"]) for i in json.loads(out)["removed"]}
    assert removed == {("orphan", paths[rels[0]]), ("stale", paths[rels[1]]), ("temp", tmp)}
    assert os.path.exists(paths[rels[2]]) and os.path.exists(paths[rels[3]])
    assert not os.path.exists(os.path.dirname(paths[rels[0]])) or os.listdir(os.path.dirname(paths[rels[0]]))
    fresh = FeatureStore(root, "pixel_latent", cache_dir=cache)
    assert fresh.contains(rels[2]) and fresh.contains(rels[3])
    assert all(os.path.exists(os.path.join(root, r)) for r in rels[1:])


def test_gc_refuses_a_data_root_the_cache_was_not_made_for(tree, tmp_path):
    root, rels = tree
    cache = str(tmp_path / "cache")
    store = FeatureStore(root, "pixel_latent", cache_dir=cache)
    for r in rels[:3]:
        store.put(r, {"x": torch.ones(2)})
    other = str(tmp_path / "other")
    make_image_tree(os.path.join(other, "nested"), 2, size=16, seed=1)
    rc, _, err = cli("gc", other, "--feature", "pixel_latent", "--cache-dir", cache)
    assert rc == 2 and "none belongs to a source" in err and "--force" in err and "Traceback" not in err
    assert FeatureStore(root, "pixel_latent", cache_dir=cache).contains(rels[0])
    # With a manifest, a root other than the recorded one is refused outright.
    store.write_manifest(store.status(rels), rels)
    make_image_tree(other, 2, size=16, seed=1)  # same relative names, other bytes: all would look stale
    rc, _, err = cli("gc", other, "--feature", "pixel_latent", "--cache-dir", cache)
    assert rc == 2 and root in err and "--force" in err
    assert FeatureStore(root, "pixel_latent", cache_dir=cache).contains(rels[0])
    # --force while the recorded root still holds those sources: they are its valid entries (a
    # copy sharing the cache never loses them); once the data really moved, they go.
    rc, out, _ = cli("gc", other, "--feature", "pixel_latent", "--cache-dir", cache, "--force", "--json")
    assert rc == 0 and json.loads(out)["removed"] == []
    assert FeatureStore(root, "pixel_latent", cache_dir=cache).contains(rels[0])
    os.rename(root, root + ".gone")
    rc, out, _ = cli("gc", other, "--feature", "pixel_latent", "--cache-dir", cache, "--force", "--json")
    assert rc == 0 and len(json.loads(out)["removed"]) == 3


def _as_user(*args):
    return cli(*args)


def test_read_only_cache_directory_gives_a_clear_error_and_loses_nothing(public_tmp):
    root = os.path.join(public_tmp, "data")
    cache = os.path.join(public_tmp, "cache")
    rels = make_image_tree(root, 4, size=16)
    store = FeatureStore(root, "pixel_latent", cache_dir=cache)
    entries = [store.put(r, {"x": torch.ones(4)}) for r in rels]
    with open(entries[2], "r+b") as f:
        f.truncate(30)  # corrupt: verify --quarantine wants to move it
    os.remove(os.path.join(root, rels[0]))  # orphan: gc wants to remove it
    for d, _, _ in os.walk(cache):
        os.chmod(d, 0o555)
    before = snapshot(cache)
    rc, out, err = run_unprivileged(_as_user, "gc", root, "--feature", "pixel_latent", "--cache-dir", cache)
    assert rc == 1 and "Traceback" not in err
    # gc takes the feature's lock first: creating it in the read-only cache fails with the reason.
    assert "cannot create the lock" in err and cache in err and "not writable" in err
    rc, out, err = run_unprivileged(_as_user, "verify", root, "--feature", "pixel_latent", "--cache-dir", cache,
                                    "--quarantine")
    assert rc == 1 and "Traceback" not in err and "lock" in err and "not writable" in err
    assert snapshot(cache) == before


def test_gc_and_verify_need_a_feature_and_a_root(tmp_path):
    rc, _, err = cli("gc", str(tmp_path / "nope"), "--feature", "vggt")
    assert rc == 2 and "does not exist" in err
    # Without --feature, the root's one manifest names it (as for status); with none, a usage error.
    rc, _, err = cli("verify", str(tmp_path))
    assert rc == 2 and "no feature has a manifest" in err and "--feature" in err


def test_the_installed_command_reports_bad_entries_without_a_traceback(tree):
    root, rels = tree
    entry = FeatureStore(root, "vggt").put(rels[0], {"features": torch.randn(32)})
    with open(entry, "r+b") as f:
        f.truncate(os.path.getsize(entry) // 2)
    r = subprocess.run([sys.executable, "-m", "featstore.cli", "verify", root, "--feature", "vggt"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "corrupt" in r.stdout and "Traceback" not in r.stderr
    assert "1 bad entry:" in r.stdout  # not "1 bad entries"


def test_gc_is_refused_while_a_precompute_of_the_feature_runs(damaged):
    from featstore.lock import feature_lock

    root, _, _ = damaged
    store = FeatureStore(root, "vggt")
    with feature_lock(store, "precompute.shard1-of-2"):
        rc, _, err = cli("gc", root, "--feature", "vggt")
    assert rc == 1 and "while a precompute of feature 'vggt' runs" in err and "shard1-of-2" in err
    rc, _, _ = cli("gc", root, "--feature", "vggt")
    assert rc == 0
