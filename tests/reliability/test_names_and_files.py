"""Renames, special files and odd file names, end to end: the promises are that a path is only
ever served its own entry, that nothing blocks on a file that is not a regular file, and that any
file name either works or gets an error naming the file and the fix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from toy_encoders import MeanColor

from featstore import FeatureStore, _core, ops
from featstore.pipeline import precompute

WHEN = 1_600_000_000  # whole seconds, as a tar extraction leaves mtimes


def frames(root: str, count: int) -> list[str]:
    """Uncompressed BMP frames of equal size, each a different color, with equal whole-second mtimes."""
    os.makedirs(root, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{i:03d}.bmp"
        Image.fromarray(np.full((32, 32, 3), 40 * i + 10, np.uint8)).save(os.path.join(root, name))
        os.utime(os.path.join(root, name), (WHEN, WHEN))
        names.append(name)
    return names


def run(root: str, **kw):
    return precompute(root, encoder=MeanColor(), num_workers=0, progress=False, **kw)


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("layout", ["sidecar", "dir"])
def test_renumbered_frames_are_never_served_another_frames_features(tmp_path, layout, figures):
    fig = figures("renames: renumbered frames, moved sidecars")
    root = str(tmp_path / "data")
    names = frames(root, 4)
    cache = {"cache_dir": str(tmp_path / "cache")} if layout == "dir" else {}
    run(root, **cache)
    want = {n: MeanColor().encode(MeanColor().preprocess(os.path.join(root, n))[None].float().div(255))["features"][0]
            for n in names}
    # Frame 000 deleted, the others renumbered with mv (001 -> 000, 002 -> 001, 003 -> 002).
    os.remove(os.path.join(root, "000.bmp"))
    for i in range(1, 4):
        os.rename(os.path.join(root, f"{i:03d}.bmp"), os.path.join(root, f"{i - 1:03d}.bmp"))
    store = FeatureStore(root, "toy", **cache)
    for i in range(3):
        got = quietly(store.get, f"{i:03d}.bmp")
        fig.add(cases=1, failures=int(got is not None))
        assert got is None, f"{i:03d}.bmp served a cached entry after the renumbering"
    report = ops.verify(FeatureStore(root, "toy", **cache), [f"{i:03d}.bmp" for i in range(3)], progress=False)
    assert not report.ok
    fig.add(cases=1, failures=int(report.ok))
    again = run(root, **cache)
    assert again["written"] == 3
    store = FeatureStore(root, "toy", **cache)
    for i in range(3):
        served = store.get(f"{i:03d}.bmp")
        ok = served is not None and torch.allclose(served["features"].float(), want[names[i + 1]].float())
        fig.add(cases=1, failures=int(not ok))
        assert ok, f"{i:03d}.bmp is not frame {i + 1}'s features after the rerun"
    fig.add(runs=1)
    fig.note("BMP frames of equal size and whole-second mtimes renumbered with mv, both layouts: every "
             "renamed frame missed, verify reported them, the rerun wrote each frame's own features")


def _special(kind: str, path: str, elsewhere: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a fifo":
        os.mkfifo(elsewhere)
        os.symlink(elsewhere, path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()


# Each command runs in a child process with a deadline: a hang is a failure, not a stuck suite.
_COMMANDS = {
    "state": "print(FeatureStore(root, 'toy').state(rel))",
    "get": "print(FeatureStore(root, 'toy').get(rel))",
    "status": "print(FeatureStore(root, 'toy').status([rel]).counts)",
    "verify": "print(ops.verify(FeatureStore(root, 'toy'), [rel], progress=False).ok)",
    "gc --dry-run": "print(len(ops.plan_gc(FeatureStore(root, 'toy'), [rel], progress=False).remove))",
    "read_batch": ("\ntry:\n    FeatureStore(root, 'toy').read_batch([rel], 'features')\n"
                   "except Exception as e:\n    print(type(e).__name__)"),
}


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo", "directory", "socket"])
def test_an_entry_path_that_is_not_a_regular_file_is_a_miss_found_without_blocking(tmp_path, kind, figures):
    fig = figures("special files at entry paths (no hang)")
    root = str(tmp_path / "data")
    frames(root, 1)
    rel = "000.bmp"
    entry = os.path.join(root, rel + ".toy.safetensors")
    _special(kind, entry, str(tmp_path / "fifo-elsewhere"))
    for name, code in _COMMANDS.items():
        script = ("import warnings; warnings.simplefilter('ignore')\n"
                  "from featstore import FeatureStore, ops\n"
                  f"root, rel = {root!r}, {rel!r}\n{code}\n")
        try:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            fig.add(cases=1, failures=1)
            pytest.fail(f"{name} blocked on a {kind} at the entry path")
        fig.add(cases=1, failures=int(done.returncode != 0))
        assert done.returncode == 0, f"{name} on a {kind}: {done.stderr[-2000:]}"
    assert FeatureStore(root, "toy").state(rel) == "corrupt"
    fig.add(runs=1)
    fig.note("a FIFO, a symlink to a FIFO, a directory and a socket where an entry belongs: state, get, "
             "status, verify, gc --dry-run and read_batch each returned at once (child process, 60 s "
             "deadline) and counted a corrupt miss")


def test_names_that_are_not_utf8_go_through_precompute_the_journal_and_the_manifest(tmp_path, figures):
    fig = figures("file names: not UTF-8, over the length limit")
    root = tmp_path / "data"
    root.mkdir()
    odd = os.fsdecode(b"frame-\xff\xfe.png")
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(os.path.join(root, odd), format="PNG")
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(os.path.join(root, "plain.png"))
    first = run(str(root))
    assert first["written"] == 2 and not first["failed"], first
    manifest = FeatureStore(str(root), "toy").manifest_path
    assert _core.read_manifest(manifest) is not None
    store = FeatureStore(str(root), "toy")
    assert store.contains(odd) and store.get(odd) is not None
    again = run(str(root))
    assert again["written"] == 0, again
    fig.add(runs=1, cases=4)


def test_a_sidecar_name_over_the_limit_is_a_miss_and_a_failure_that_names_the_dir_layout(tmp_path, figures):
    fig = figures("file names: not UTF-8, over the length limit")
    root = tmp_path / "data"
    root.mkdir()
    long = "x" * 245 + ".png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(root / long)
    store = FeatureStore(str(root), "toy")
    assert not store.contains(long) and quietly(store.get, long) is None
    summary = run(str(root))
    assert summary["failed"] == 1, summary
    reason = str(summary["failures"])
    assert "--cache-dir" in reason, reason
    with_cache = run(str(root), cache_dir=str(tmp_path / "cache"))
    assert with_cache["written"] == 1
    assert FeatureStore(str(root), "toy", cache_dir=str(tmp_path / "cache")).get(long) is not None
    fig.add(runs=1, cases=4)
    fig.note("a name that is not UTF-8: scanned, precomputed, journaled, indexed and served, a rerun "
             "computes nothing; a 249-byte name: a miss, the run records a failure naming --cache-dir, "
             "and with it the entry is written and served")
