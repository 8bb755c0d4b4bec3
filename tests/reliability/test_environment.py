"""Environment faults, each end to end through precompute and reads: a full disk, a file size
limit, permission denied on part of the tree, symlink loops, a source deleted between scan and
encode, an mtime in the future, and a same-size edit within the timestamp granularity.

Every scenario checks the same promises: a clear error or a recorded failure naming the path, no
partial entry (no temporary file left, every entry on disk whole and right), nothing finished
lost, and a rerun that completes once the fault is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import age, run_unprivileged
from PIL import Image
from toy_encoders import MeanColor, Wide

import featstore
from featstore import FeatureStore, _core
from featstore.errors import FeatstoreError
from featstore.examples import make_image_tree
from featstore.lock import lock_is_held
from featstore.pipeline import precompute
from featstore.sets import set_entry_path, set_state

from .conftest import check_entries, entry_files, expected_outputs, in_one_thread, temp_files


def run(root: str, encoder: object, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return precompute(root, encoder=encoder, **kw)


def quietly(fn, *args, **kwargs):
    """Calls a read whose misses warn (once per kind), without the warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------- full disk
@contextlib.contextmanager
def small_filesystem(path: str, size: int) -> Iterator[bool]:
    """Mounts a tmpfs of ``size`` bytes at ``path``; yields False where this process may not
    mount (not root, or a container without the capability)."""
    os.makedirs(path)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], check=True)


def test_full_disk_during_precompute_leaves_whole_entries_and_a_clear_error(tmp_path, figures):
    fig = figures("environment: full disk (ENOSPC)")
    disk = str(tmp_path / "disk")
    with small_filesystem(disk, 1_200_000) as mounted:  # room for 4 entries of 256 KiB
        if not mounted:
            pytest.skip("cannot mount a small tmpfs here; test_file_size_limit covers the fallback")
        root = os.path.join(disk, "data")
        rels = make_image_tree(root, 12, size=32)
        expected = expected_outputs(Wide(), root, rels)
        with pytest.raises(OSError) as info:
            run(root, Wide(), batch_size=2)
        err = info.value
        assert err.errno == errno.ENOSPC
        assert "no space left" in str(err) and "--cache-dir" in str(err) and ".wide.safetensors" in str(err)
        written = entry_files(root, "wide")
        assert 0 < len(written) < len(rels) and not temp_files(root)
        problems = check_entries(root, "wide", expected)
        assert not lock_is_held(os.path.join(root, ".featstore", "wide", "locks", "precompute.lock"))
        # A direct write fails the same way and leaves nothing behind.
        store = FeatureStore(root, "wide", fingerprint=Wide().fingerprint())
        missing = [r for r in rels if not store.contains(r)]
        with pytest.raises(OSError) as info:
            store.put(missing[0], {"wide": torch.zeros(1 << 20)})
        assert info.value.errno == errno.ENOSPC and not temp_files(root)
        # With entries to measure, the next run sees that the rest cannot fit and does not start.
        with pytest.raises(FeatstoreError, match="not enough space"):
            run(root, Wide())
        assert entry_files(root, "wide") == written
        subprocess.run(["mount", "-o", "remount,size=16m", disk], check=True)
        summary = run(root, Wide())
        assert summary["written"] == len(rels) - len(written) and summary["failed"] == 0
        problems += check_entries(root, "wide", expected)
        fig.add(runs=1, cases=2 * len(written) + len(rels), failures=len(problems))
        fig.note(f"tmpfs of 1.2 MB: the run stopped at entry {len(written) + 1} of {len(rels)} with ENOSPC naming "
                 "the entry and --cache-dir; no temp file; the next run refused up front; the rerun after a remount "
                 "completed")
        assert not problems, problems


def _precompute_limited(root: str, limit: int, queue) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    s = precompute(root, encoder=Wide(), batch_size=2, num_workers=0, progress=False)
    queue.put({k: s[k] for k in ("written", "failed", "failures")})


def test_file_size_limit_fails_each_entry_cleanly(tmp_path, figures):
    """Where no file system can be mounted, RLIMIT_FSIZE still makes every entry write fail (EFBIG)
    partway: each is recorded, none is left half written."""
    fig = figures("environment: file size limit (EFBIG)")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=32)
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(
        target=in_one_thread, args=(_precompute_limited, (root, 100_000, queue)))
    child.start()
    summary = queue.get(timeout=120)
    child.join(30)
    assert child.exitcode == 0
    assert summary["written"] == 0 and summary["failed"] == len(rels)
    assert all("File too large" in why for _, why in summary["failures"]), summary["failures"]
    assert not entry_files(root, "wide") and not temp_files(root)
    assert run(root, Wide())["written"] == len(rels)
    problems = check_entries(root, "wide", expected_outputs(Wide(), root, rels))
    fig.add(runs=1, cases=2 * len(rels), failures=len(problems))
    fig.note("RLIMIT_FSIZE 100 kB, SIGXFSZ ignored: every write failed with EFBIG, recorded per image; "
             "no temp file; rerun without the limit completed")
    assert not problems


# ----------------------------------------------------------------------------------- permissions
def _precompute_and_read(root: str, rels: list[str]) -> tuple[dict, dict]:
    s = precompute(root, encoder=MeanColor(), num_workers=0, progress=False)
    store = FeatureStore(root, "toy")
    reads = {}
    for rel in rels:
        try:
            reads[rel] = "hit" if quietly(store.get, rel) is not None else "miss"
        except PermissionError:
            reads[rel] = "PermissionError"
    return {k: s[k] for k in ("sources", "written", "failed", "failures", "scan_errors")}, reads


def test_permission_denied_on_part_of_the_tree(public_tmp, figures):
    fig = figures("environment: permission denied")
    root = os.path.join(public_tmp, "data")
    rels = make_image_tree(root, 9, scenes=3, size=32)
    by_scene = {s: [r for r in rels if r.startswith(s)] for s in ("scene000", "scene001", "scene002")}
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    unreadable = by_scene["scene000"][0]
    os.chmod(os.path.join(root, unreadable), 0o000)  # an image nobody may read
    os.chmod(os.path.join(root, "scene001"), 0o000)  # a directory nobody may list
    os.chmod(os.path.join(root, "scene002"), 0o555)  # a directory nobody may write into
    summary, reads = run_unprivileged(in_one_thread, _precompute_and_read, (root, rels))
    reasons = dict(summary["failures"])
    assert summary["scan_errors"] == 1 and summary["sources"] == 6  # scene001 is reported, the run goes on
    assert summary["written"] == 2 and summary["failed"] == 4
    assert "PermissionError" in reasons[unreadable]
    assert all("--cache-dir" in reasons[r] for r in by_scene["scene002"])
    assert [r for r, how in reads.items() if how == "hit"] == by_scene["scene000"][1:]
    assert all(reads[r] == "miss" for r in by_scene["scene001"] + by_scene["scene002"] + [unreadable])
    assert not temp_files(root)
    for d in ("scene001", "scene002"):
        os.chmod(os.path.join(root, d), 0o777)
    os.chmod(os.path.join(root, unreadable), 0o644)
    assert run(root, MeanColor())["written"] == 7
    problems = check_entries(root, "toy", expected_outputs(MeanColor(), root, rels))
    fig.add(runs=1, cases=len(reads) + len(rels), failures=len(problems))
    fig.note("as user nobody: an unreadable image (recorded, PermissionError), an unlistable directory (scan "
             "error), a read-only directory (recorded, suggests --cache-dir); reads miss cleanly; rerun completed")
    assert not problems


# ----------------------------------------------------------------------------------- symlinks
def test_symlink_loops_are_reported_and_the_rest_is_cached(tmp_path, figures):
    fig = figures("environment: symlink loops")
    root, real = str(tmp_path / "data"), str(tmp_path / "real")
    make_image_tree(root, 4, size=16)
    make_image_tree(real, 2, scenes=1, size=16)
    os.symlink(real, os.path.join(root, "linked"))                  # a tree of symlinks, as datasets are
    os.symlink(root, os.path.join(root, "scene000", "loop"))        # a directory loop
    os.symlink("self.jpg", os.path.join(root, "self.jpg"))          # a link to itself
    os.symlink("b.jpg", os.path.join(root, "a.jpg"))                # two links to each other
    os.symlink("a.jpg", os.path.join(root, "b.jpg"))
    os.symlink("nowhere.jpg", os.path.join(root, "dangling.jpg"))   # a link to nothing
    # Sidecars are written only inside the data root: the 2 images reached through the directory
    # link (it leads out of the root) fail, named, and nothing is written into the linked tree.
    summary = run(root, MeanColor())
    assert summary["sources"] == 6 and summary["written"] == 4 and summary["failed"] == 2
    assert summary["scan_errors"] == 5  # the loop, the three looping links and the dangling one
    assert all("linked" in path and "writes only inside the data root" in why and "--cache-dir" in why
               for path, why in summary["failures"]), summary["failures"]
    assert not [f for _, _, files in os.walk(real) for f in files if f.endswith(".safetensors")]
    # With a cache directory (as the failure says) every image is cached, the linked ones too.
    cache = str(tmp_path / "cache")
    summary = run(root, MeanColor(), cache_dir=cache)
    assert summary["written"] == 6 and summary["failed"] == 0
    store = FeatureStore(root, "toy", cache_dir=cache)
    found = featstore.scan(root)
    reasons = {why.split(":")[0] for _, why in found.errors}
    assert reasons >= {"symlink loop", "Too many levels of symbolic links (os error 40)"}
    assert all(store.contains(r) for r in found.paths)
    assert quietly(store.get, "linked/scene000/img_00000.jpg") is not None
    with pytest.raises(OSError) as info:  # a read of a looping path is an OS error naming it
        store.get("self.jpg")
    assert info.value.errno == errno.ELOOP and "self.jpg" in str(info.value)
    inside = [p for p in found.paths if not p.startswith("linked/")]
    problems = check_entries(root, "toy", expected_outputs(MeanColor(), root, inside))
    fig.add(runs=1, cases=len(found.paths) + 5, failures=len(problems))
    fig.note("a directory loop, a self link, two mutual links, a dangling link: 5 scan errors; the 6 real "
             "images cached and served (the 2 behind a link out of the root in --cache-dir only: no sidecar "
             "is written outside the data root)")
    assert not problems


def test_a_linked_directory_leading_out_of_the_root_is_read_through_never_written_into(tmp_path, figures):
    fig = figures("environment: symlink loops")
    root, outside = str(tmp_path / "data"), str(tmp_path / "someone-elses")
    make_image_tree(root, 2, scenes=1, size=16)
    make_image_tree(outside, 2, scenes=1, size=16)
    os.symlink(outside, os.path.join(root, "linked"))
    linked = "linked/scene000/img_00000.jpg"
    # What the root contains: scan, a .jsonl listing and lookups all read through the link.
    assert linked in featstore.scan(root).paths
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.write(json.dumps({"image": linked}) + "\n")
    assert featstore.scan(root, jsonl="image").paths == [linked]
    assert FeatureStore(root, "toy").state(linked) == "missing"
    # Writes stay inside it: put names the link and the fix, and nothing lands in the other tree.
    with pytest.raises(featstore.PathOutsideRootError, match="symbolic link inside the root.*--cache-dir"):
        FeatureStore(root, "toy").put(linked, {"features": torch.ones(2)})
    cache = str(tmp_path / "cache")
    FeatureStore(root, "toy", cache_dir=cache).put(linked, {"features": torch.ones(2)})
    assert FeatureStore(root, "toy", cache_dir=cache).state(linked) == "valid"
    assert not [f for _, _, files in os.walk(outside) for f in files if not f.endswith((".jpg", ".png"))]
    fig.add(runs=1, cases=6)


# ----------------------------------------------------------------------------------- vanishing sources
class DeletesSources(MeanColor):
    """Deletes sources during the run: after decoding the first image, one not decoded yet; while
    encoding the first batch, that batch's images (read, but not stored yet)."""

    def __init__(self, root: str, later: str) -> None:
        super().__init__()
        self.root, self.later, self.decoded = root, later, []

    def preprocess(self, path: str) -> torch.Tensor:
        image = super().preprocess(path)
        self.decoded.append(path)
        if len(self.decoded) == 1:
            os.remove(os.path.join(self.root, self.later))
        return image

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.calls == 0:
            for path in self.decoded[: batch.shape[0]]:
                os.remove(path)
        return super().encode(batch)


def test_source_deleted_between_scan_and_encode(tmp_path, figures):
    fig = figures("environment: source deleted mid-run")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 8, size=16)
    summary = run(root, DeletesSources(root, later=rels[5]), batch_size=2)
    reasons = dict(summary["failures"])
    assert summary["written"] == 5 and summary["failed"] == 3
    assert all("source disappeared" in reasons[r] for r in rels[:2]) and "FileNotFoundError" in reasons[rels[5]]
    gone = [rels[0], rels[1], rels[5]]
    store = FeatureStore(root, "toy")
    assert all(quietly(store.get, r) is None for r in gone)
    status = store.status()
    assert status["valid"] == 5 and status["orphan"] == 0 and not temp_files(root)
    assert run(root, MeanColor())["planned"] == 0
    kept = [r for r in rels if r not in gone]
    problems = check_entries(root, "toy", expected_outputs(MeanColor(), root, kept))
    fig.add(runs=1, cases=len(rels) + len(kept), failures=len(problems))
    fig.note("one source deleted before its decode, two after decode and before their write: each recorded, "
             "no entry and no orphan for them, the rest cached, rerun has nothing to do")
    assert not problems


# ----------------------------------------------------------------------------------- timestamps
def write_png(path: str, seed: int, mtime_ns: int | None = None) -> None:
    """A 32x32 PNG stored uncompressed: any pixels give the same file size (a same-size edit)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, compress_level=0)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def same_size_edit(path: str, seed: int) -> None:
    """Rewrites the image with other pixels, keeping its size and mtime: what an edit within the
    file system's timestamp granularity looks like."""
    st = os.stat(path)
    write_png(path, seed, st.st_mtime_ns)
    assert os.stat(path).st_size == st.st_size


def racy_scenario(root: str, rel: str, fig) -> list[str]:
    """Precompute, read, edit the image keeping its stamp, read again: the reader that already
    served the entry must see the edit, and a rerun recomputes exactly that image."""
    rels = sorted(r for r in os.listdir(root) if r.endswith(".png"))
    run(root, MeanColor())
    store = FeatureStore(root, "toy")
    before = quietly(store.get, rel)
    assert before is not None and all(store.contains(r) for r in rels)
    if time.time_ns() - os.stat(os.path.join(root, rel)).st_mtime_ns > _core.RACY_WINDOW_NS:
        # Past the window an edit cannot keep the mtime: the scenario cannot be staged any more.
        pytest.skip("this machine took longer than the racy window between writing the image and reading it")
    same_size_edit(os.path.join(root, rel), seed=99)
    problems = []
    if quietly(store.get, rel) is not None:
        problems.append("the reader that served the entry before the edit served it after")
    if FeatureStore(root, "toy").state(rel) != "stale":
        problems.append("a new reader does not see the edit")
    summary = run(root, MeanColor())
    if (summary["planned"], summary["written"]) != (1, 1):
        problems.append(f"the rerun planned {summary['planned']}, wrote {summary['written']}")
    problems += check_entries(root, "toy", expected_outputs(MeanColor(), root, rels))
    fig.add(runs=1, cases=4 + len(rels), failures=len(problems))
    return problems


def test_same_size_edit_within_the_timestamp_granularity_is_caught(tmp_path, figures):
    fig = figures("environment: racy same-size edit")
    root = str(tmp_path / "data")
    os.makedirs(root)
    for i in range(4):
        write_png(os.path.join(root, f"img{i}.png"), seed=i)  # just written: every entry will be racy
    problems = racy_scenario(root, "img1.png", fig)
    fig.note("images written just before precompute; a reader served one, then it was rewritten with the same "
             "size and mtime: the same reader misses it (stale), a new one too, the rerun recomputes only it")
    assert not problems, problems


def test_frame_set_member_edited_within_the_timestamp_granularity_is_caught(tmp_path, figures, monkeypatch):
    """Frame sets are keyed by their members' stamps, which such an edit keeps."""
    fig = figures("environment: racy same-size edit")
    root = str(tmp_path / "data")
    os.makedirs(root)
    for i in range(4):
        write_png(os.path.join(root, f"img{i}.png"), seed=i)
    store = FeatureStore(root, "vggt", fingerprint="fp")
    edited, kept = ["img0.png", "img1.png"], ["img2.png", "img3.png"]
    for members in (edited, kept):
        store.put_set(members, {"features": torch.ones(2, 3)})
    assert store.get_set(edited) is not None and set_state(store, edited) == "valid"
    same_size_edit(os.path.join(root, "img1.png"), seed=99)
    problems = []
    if store.get_set(edited) is not None or set_state(store, edited) != "stale":
        problems.append("a frame set served after a same-stamp edit of a member")
    # Verified once the window has passed, a set's racy mark is cleared on disk: no more digests.
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 10 * 10**9)
    if store.get_set(kept) is None or _core.read_header(set_entry_path(store, kept))[0]["racy"] != "0":
        problems.append("the racy mark of a set verified after the window was not cleared")
    fig.add(runs=1, cases=4, failures=len(problems))
    assert not problems, problems


def test_mtime_in_the_future(tmp_path, figures):
    fig = figures("environment: mtime in the future")
    root = str(tmp_path / "data")
    os.makedirs(root)
    future = (os.stat(root).st_mtime_ns // 10**9 + 3600) * 10**9  # an hour ahead (a skewed clock, an NFS server)
    for i in range(4):
        write_png(os.path.join(root, f"img{i}.png"), seed=i, mtime_ns=future if i == 2 else None)
        if i != 2:
            age(os.path.join(root, f"img{i}.png"))
    problems = racy_scenario(root, "img2.png", fig)
    fig.note("one image dated an hour ahead: its entry is racy until then; served, rewritten with the same size "
             "and mtime: caught by the same reader and a new one, recomputed alone")
    assert not problems, problems
