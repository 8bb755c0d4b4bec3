"""Packs under fire: ``featstore pack`` killed with SIGKILL at seeded moments loses no entry and
leaves none torn, and a training loop reading while entries move into packs (and back into files
of their own) is always served its own bytes, never a miss (docs/design.md, "Packs").
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import age
from toy_datasets import Images, source_of

from featstore import CachedDataset, FeatureStore
from featstore.examples import make_image_tree
from featstore.ops import execute_gc, pack, plan_gc

from .conftest import fork

ENTRIES = 400
ELEMS = 5000  # 20 KB of float32: mapped, not read, and many per pack
KILLS = 10


def _want(i: int) -> torch.Tensor:
    return torch.arange(ELEMS, dtype=torch.float32) + i


def _fill(root: str, rels: list[str]) -> None:
    store = FeatureStore(root, "toy", fingerprint="fp")
    for i, r in enumerate(rels):
        store.put(r, {"features": _want(i)})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("packs") / "data")
    rels = make_image_tree(root, ENTRIES, size=16)
    for r in rels:
        age(os.path.join(root, r))
    _fill(root, rels)
    FeatureStore(root, "toy", fingerprint="fp").write_manifest(FeatureStore(root, "toy").status(rels), rels)
    return root, rels


def _pack_command(root: str) -> list[str]:
    return [sys.executable, "-m", "featstore.cli", "pack", root, "--feature", "toy", "--target-size", "200KiB",
            "--json"]


def _all_served(root: str, rels: list[str]) -> list[str]:
    store = FeatureStore(root, "toy")
    wrong = []
    for i, r in enumerate(rels):
        got = store.get(r)
        if got is None or not torch.equal(got["features"], _want(i)):
            wrong.append(f"{r}: {store.check(r).state} {store.check(r).reason}")
    return wrong


def test_pack_killed_at_random_moments_loses_and_tears_nothing(template, tmp_path, figures):
    fig = figures("crash: `kill -9` during `featstore pack` (seeded moments)")
    root, rels = template
    # How long a whole run takes here, so that the kills fall inside it.
    probe = str(tmp_path / "probe")
    shutil.copytree(root, probe)
    t0 = time.perf_counter()
    subprocess.run(_pack_command(probe), check=True, capture_output=True)
    whole = time.perf_counter() - t0
    rng = random.Random(20261207)
    problems: list[str] = []
    killed_mid_run = 0
    for k in range(KILLS):
        copy = str(tmp_path / f"kill{k}")
        shutil.copytree(root, copy)
        child = subprocess.Popen(_pack_command(copy), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, whole))
        if child.poll() is None:
            killed_mid_run += 1
            child.send_signal(signal.SIGKILL)
        child.wait()
        problems += [f"kill {k}: {w}" for w in _all_served(copy, rels)]
        # A second run finishes the job; gc clears what the killed one left (temporary files,
        # a pack sealed but never indexed).
        subprocess.run(_pack_command(copy), check=True, capture_output=True)
        store = FeatureStore(copy, "toy")
        execute_gc(store, plan_gc(store, rels, min_tmp_age_s=0, progress=False), progress=False)
        problems += [f"kill {k}, after a second run and gc: {w}" for w in _all_served(copy, rels)]
        own = [f for _, _, fs in os.walk(copy) for f in fs if f.endswith(".safetensors")]
        problems += [f"kill {k}: {f} still in its own file after a whole run" for f in own]
        # (A segment's temporary file is a compaction's to remove, once an hour old.)
        leftovers = [os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs
                     if f.endswith(".tmp") and os.path.basename(d) != "index"]
        problems += [f"kill {k}: {f} left after gc" for f in leftovers]
    fig.add(runs=KILLS, cases=KILLS * len(rels) * 2, failures=len(problems))
    fig.note(f"{killed_mid_run} of {KILLS} runs killed mid-pack ({len(rels)} entries, 200 KiB packs)")
    assert killed_mid_run > 0
    assert problems == []


def _repack_forever(root: str, rels: list[str], stop: str) -> None:
    """The other process: moves every entry into packs, then writes them back into files of their
    own (the same bytes), and collects the packs left dead, until ``stop`` exists."""
    while not os.path.exists(stop):
        pack(FeatureStore(root, "toy"), rels, target_size=100_000, progress=False)
        _fill(root, rels)
        store = FeatureStore(root, "toy")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            execute_gc(store, plan_gc(store, rels, min_tmp_age_s=0, progress=False), progress=False)


def test_a_training_loop_reading_while_entries_move_into_packs_is_served_its_own_bytes(template, tmp_path,
                                                                                       figures):
    fig = figures("concurrency: training reads while entries move into packs and back")
    src, rels = template
    root = str(tmp_path / "data")
    shutil.copytree(src, root)
    stop = str(tmp_path / "stop")
    other = fork(_repack_forever, root, rels, stop)
    ds = CachedDataset(Images(root, rels), FeatureStore(root, "toy"), path_fn=source_of, log_start=False)
    problems: list[str] = []
    served = 0
    deadline = time.monotonic() + 8
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while time.monotonic() < deadline:
            for batch in ds.loader(batch_size=16, num_workers=2, shuffle=True, multiprocessing_context=ctx):
                for j, i in enumerate(batch["index"].tolist()):
                    served += 1
                    if not bool(batch["cached"][j]):
                        problems.append(f"{rels[i]}: a miss")
                    elif not torch.equal(batch["features"][j], _want(i)):
                        problems.append(f"{rels[i]}: other bytes")
    open(stop, "w").close()
    other.join(120)
    assert other.exitcode == 0
    fig.add(runs=1, cases=served, failures=len(problems))
    fig.note(f"{served} samples read by 2 workers while another process packed, rewrote and collected")
    assert problems[:5] == []
