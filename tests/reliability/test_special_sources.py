"""Nothing featstore reads may block: a source, a history frame, a caption, a control image or a
weights file replaced by a FIFO (or a symlink to ``/dev/zero``) is a miss or an error naming the
path, found at once. Every command runs in a child process with a deadline, so a hang fails the
test instead of stalling the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from toy_encoders import MeanColor

from featstore import FeatureStore
from featstore.examples import make_image_tree
from featstore.pipeline import precompute

from .conftest import listing

DEADLINE_S = 60

#: What a source (or input) is replaced with after it was cached.
KINDS = {
    "fifo": lambda path: os.mkfifo(path),
    "symlink to /dev/zero": lambda path: os.symlink("/dev/zero", path),
}


def _replace(path: str, kind: str) -> None:
    os.remove(path)
    KINDS[kind](path)


def _in_child(fig, what: str, code: str, **names: object) -> str:
    """Runs ``code`` in a fresh interpreter with ``names`` bound; its stdout. A run past the
    deadline, or one that fails, fails the test (and is counted)."""
    script = ("import warnings; warnings.simplefilter('ignore')\n"
              "import featstore, torch\nfrom featstore import FeatureStore, ops, CachedDataset\n"
              + "".join(f"{k} = {v!r}\n" for k, v in names.items()) + code)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S,
                              cwd=os.path.dirname(__file__))
    except subprocess.TimeoutExpired:
        fig.add(cases=1, failures=1)
        pytest.fail(f"{what} blocked")
    fig.add(cases=1, failures=int(done.returncode != 0))
    assert done.returncode == 0, f"{what}: {done.stderr[-3000:]}"
    return done.stdout.strip()


def _cli(fig, what: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run([sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True,
                              timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        fig.add(cases=1, failures=1)
        pytest.fail(f"featstore {what} blocked")
    fig.add(cases=1, failures=int("Traceback" in done.stderr))
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_source_replaced_by_a_fifo_or_a_device_is_a_miss_found_at_once(tmp_path, kind, figures):
    fig = figures("special files as sources, frames, inputs and weights (no hang)")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=16)
    assert precompute(root, encoder=MeanColor(), num_workers=0, progress=False)["written"] == 3
    rel = rels[0]
    _replace(os.path.join(root, rel), kind)
    # The training hot path and every command that judges entries.
    out = _in_child(fig, f"lookups of a source that is a {kind}", (
        "s = FeatureStore(root, 'toy')\n"
        "print(s.state(rel), s.contains(rel), s.get(rel) is None, s.states([rel, other]))\n"
        "print(ops.status(s, [rel, other], progress=False).status.counts['stale'])\n"
        "print(ops.verify(s, [rel, other], progress=False).ok)\n"
        "print(len(ops.plan_gc(s, [rel, other], progress=False).remove))\n"
        "ds = CachedDataset([{'p': rel}, {'p': other}], s, path_fn=lambda x: x['p'], log_start=False)\n"
        "print([bool(x['cached']) for x in ds])\n"), root=root, rel=rel, other=rels[1])
    lines = out.splitlines()
    assert lines[0] == "stale False True ['stale', 'valid']", out
    assert lines[1:4] == ["1", "False", "1"], out  # status counts it, verify reports it, gc plans it
    assert lines[4] == "[False, True]", out
    explained = _cli(fig, "explain", "explain", rel, "--data-root", root, "--feature", "toy")
    assert explained.returncode == 1 and "not a regular file" in explained.stdout, explained.stdout
    for command in ("status", "verify"):
        assert _cli(fig, command, command, root, "--feature", "toy").returncode in (0, 1)
    # Precompute never reads it: the scan names it (not a file), the rest is kept.
    summary = _in_child(fig, "precompute over a special source", (
        "from featstore.pipeline import precompute\nimport sys; sys.path.insert(0, tests)\n"
        "from toy_encoders import MeanColor\n"
        "s = precompute(root, encoder=MeanColor(), num_workers=0, progress=False, files_from=listed)\n"
        "print(s['written'], s['skipped'], s['scan_errors'])\n"),
        root=root, tests=os.path.dirname(os.path.dirname(__file__)), listed=listing(tmp_path, [rel, rels[1]]))
    assert summary == "0 1 1", summary
    fig.add(runs=1)
    fig.note("a cached image replaced by a FIFO or a symlink to /dev/zero: state, contains, get, states, status, "
             "verify, gc --dry-run, a CachedDataset read, explain, the CLI's status and verify, and precompute of "
             "it each returned at once (child process, 60 s deadline): a stale miss, or a named failure")




@pytest.mark.parametrize("kind", list(KINDS))
def test_frames_captions_control_images_and_weights_that_are_special_never_block(tmp_path, kind, figures):
    fig = figures("special files as sources, frames, inputs and weights (no hang)")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 4, size=16)
    for r in rels:
        os.utime(os.path.join(root, r), (1_600_000_000, 1_600_000_000))
    store = FeatureStore(root, "toy", fingerprint="fp")
    frames = rels[:3]
    store.put_history(frames, {"features": torch.ones(4)})
    caption = os.path.join(root, "caption.txt")
    control = os.path.join(root, "control.bin")
    for path in (caption, control):
        with open(path, "w") as f:
            f.write("a photo")
    store.put(rels[3], {"features": torch.ones(4)}, inputs={"caption": caption, "control": control})
    weights = str(tmp_path / "model.pt")
    torch.save({"w": torch.ones(2)}, weights)
    # A history frame, the caption and the control image all special: each lookup misses at once.
    _replace(os.path.join(root, frames[1]), kind)
    _replace(caption, kind)
    out = _in_child(fig, f"a history whose frame is a {kind}", (
        "s = FeatureStore(root, 'toy')\n"
        "print(s.get_history(frames) is None, s.history_state(frames))\n"
        "print(s.state(captioned), s.explain(captioned).count('not a regular file') > 0)\n"),
        root=root, frames=frames, captioned=rels[3])
    first, second = out.splitlines()
    assert first.startswith("True ") and first.split()[1] in ("missing", "stale"), out
    assert second == "stale True", out
    _replace(control, kind)
    # Reading a caption or an image through featstore's own readers: a named error, not a hang.
    out = _in_child(fig, f"readers of a {kind}", (
        "from featstore.regular import read_text\n"
        "from featstore.models.vggt.preprocess import preprocess_image_uint8\n"
        "for fn in (lambda: read_text(caption, 'caption'), lambda: preprocess_image_uint8(control)):\n"
        "    try:\n        fn()\n    except featstore.errors.NotARegularFileError as e:\n"
        "        print('refused', caption in str(e) or control in str(e))\n"), caption=caption, control=control)
    assert out.splitlines() == ["refused True", "refused True"], out
    # Weights: the digest (the fingerprint) and the checkpoint loader refuse them by name.
    _replace(weights, kind)
    out = _in_child(fig, f"weights that are a {kind}", (
        "from featstore.encoders import weights_digest, VGGTEncoder\n"
        "from featstore.errors import CheckpointError, NotARegularFileError\n"
        "try:\n    weights_digest(weights)\nexcept NotARegularFileError as e:\n    print('digest', weights in str(e))\n"
        "try:\n    VGGTEncoder(weights).fingerprint()\nexcept NotARegularFileError as e:\n"
        "    print('fingerprint', weights in str(e))\n"
        "from featstore.models.vggt import load_vggt\n"
        "try:\n    load_vggt(weights)\nexcept CheckpointError as e:\n    print('load', weights in str(e))\n"),
        weights=weights)
    assert out.splitlines() == ["digest True", "fingerprint True", "load True"], out
    fig.add(runs=1)
    fig.note("a history frame, a caption file, a control image and a weights file replaced by a FIFO or a "
             "symlink to /dev/zero: get_history, history_state, state, explain, the caption and image readers, "
             "weights_digest, VGGTEncoder.fingerprint and load_vggt each returned at once with a miss or an "
             "error naming the file")
