"""Concurrency: many processes writing and reading the same keys, readers holding mapped entries
while their keys are rewritten, and two precompute runs of one feature.

Every write carries its writer: ``value`` is 32768 float64 all equal to ``writer * 10**6 + seq``
and ``writer`` holds ``[writer, seq]``, so a reader can tell one whole write from a torn or mixed
one without knowing who wrote last.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import signal
import time
import warnings

import pytest
import torch
from conftest import age, cli
from toy_encoders import MeanColor

from featstore import FeatureStore, _core
from featstore.errors import FeatstoreError, LockHeldError
from featstore.examples import make_image_tree
from featstore.lock import lock_is_held
from featstore.pipeline import precompute

from .conftest import fork

PROCESSES = 8
SECONDS = 2.5  # per layout: long enough for thousands of interleavings, short enough for CI
ELEMS = 1 << 15


def _payload(writer: int, seq: int) -> dict[str, torch.Tensor]:
    value = float(writer * 10**6 + seq)  # exact in float64
    return {"value": torch.full((ELEMS,), value, dtype=torch.float64),
            "writer": torch.tensor([writer, seq], dtype=torch.int64)}


def _whole_write(t: dict[str, torch.Tensor]) -> str | None:
    """None when the tensors are one writer's whole write; else what is wrong."""
    value, who = t["value"], t["writer"]
    first = value[0].item()
    if value.shape != (ELEMS,) or not bool((value == first).all()):
        return "value mixes writes (a torn or partial file)"
    if first != who[0].item() * 10**6 + who[1].item():
        return f"value {first} was not written with writer {who.tolist()}"
    return None


def _read_and_write(store_args: dict, rels: list[str], me: int, seconds: float, queue) -> None:
    """One of the processes: random puts, gets, batch reads and checksum checks of the same keys.
    It keeps up to 16 entries it read (views of private mappings) and checks at every step that
    one of them still holds what it held when read, whatever was renamed over it since."""
    rng = random.Random(me)
    store = FeatureStore(**store_args)
    done: collections.Counter = collections.Counter()
    problems: list[str] = []
    held: list[tuple[dict[str, torch.Tensor], float]] = []
    seq = 0
    deadline = time.monotonic() + seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a miss would warn; it is counted as a problem below
        while time.monotonic() < deadline:
            rel = rng.choice(rels)
            op = rng.random()
            try:
                if op < 0.3:
                    seq += 1
                    store.put(rel, _payload(me, seq))
                    done["writes"] += 1
                elif op < 0.8:
                    got = store.get(rel)
                    why = "a miss" if got is None else _whole_write(got)
                    if why:
                        problems.append(f"get {rel}: {why}")
                    else:
                        held = [*held[-15:], (got, got["value"][0].item())]
                    done["gets"] += 1
                elif op < 0.9:
                    batch = store.read_batch(rels, "value")
                    if not bool((batch == batch[:, :1]).all()):
                        problems.append("read_batch: a row mixes writes")
                    done["batch reads"] += len(rels)
                else:
                    _core.verify_entry(store.entry_path(rel))  # parses, checksum matches
                    done["checksums"] += 1
            except (FeatstoreError, OSError) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
            if held:
                t, value = held[rng.randrange(len(held))]
                if not bool((t["value"] == value).all()):
                    problems.append("an entry mapped by this reader changed under it")
                done["held checks"] += 1
    for t, value in held:
        if not bool((t["value"] == value).all()):
            problems.append("an entry mapped by this reader changed under it")
    queue.put((me, dict(done), problems[:10], len(problems)))


@pytest.mark.parametrize("layout", ["sidecar", "dir"])
def test_processes_writing_and_reading_the_same_keys_see_only_whole_entries(layout, tmp_path, figures):
    fig = figures("concurrency: 8 processes, same keys")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 4, size=16)
    for rel in rels:
        age(os.path.join(root, rel))
    args = {"data_root": root, "feature": "conc", "fingerprint": "fp"}
    if layout == "dir":
        args["cache_dir"] = str(tmp_path / "cache")
    store = FeatureStore(**args)
    for rel in rels:
        store.put(rel, _payload(99, 0))
    queue = multiprocessing.get_context("fork").Queue()
    procs = [fork(_read_and_write, args, rels, i, SECONDS, queue) for i in range(PROCESSES)]
    results = [queue.get(timeout=SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(30)
    crashed = [f"process exit code {p.exitcode}" for p in procs if p.exitcode != 0]
    problems = crashed + [p for _, _, some, _ in results for p in some]
    ops = collections.Counter()
    for _, done, _, _ in results:
        ops.update(done)
    fig.add(runs=len(procs), cases=sum(ops.values()), failures=len(crashed) + sum(n for *_, n in results))
    fig.note(f"{SECONDS:.1f} s per layout (sidecar, dir); " + ", ".join(f"{k} {v:,}" for k, v in sorted(ops.items())))
    assert not problems, problems
    assert ops["writes"] and ops["gets"] and ops["held checks"]
    assert all(_whole_write(FeatureStore(**args).get(rel)) is None for rel in rels)


def _rewrite(root: str, rel: str, times: int) -> None:
    store = FeatureStore(root, "conc", fingerprint="fp")
    for seq in range(1, times + 1):
        store.put(rel, _payload(1, seq))
        if seq % 10 == 0:
            store.remove(rel)  # unlinked under the reader too, then written again
            store.put(rel, _payload(1, seq))


def test_mapped_entries_survive_rewrites_of_their_key(tmp_path, figures):
    fig = figures("concurrency: mapped entries vs rewrites")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 1, size=16)
    age(os.path.join(root, rels[0]))
    store = FeatureStore(root, "conc", fingerprint="fp", read_mode="map")
    store.put(rels[0], _payload(0, 0))
    held = store.get(rels[0])
    assert held is not None and _whole_write(held) is None
    mapped = held["value"].data_ptr()
    writer = fork(_rewrite, root, rels[0], 200)
    checks = 0
    # Read the old tensors all through the rewrites: a truncated or rewritten mapping would raise
    # SIGBUS here, a shared one would show the new values.
    while writer.is_alive() or checks == 0:
        assert bool((held["value"] == 0.0).all()) and held["writer"].tolist() == [0, 0]
        checks += 1
    writer.join(30)
    assert writer.exitcode == 0
    assert held["value"].data_ptr() == mapped and _whole_write(held) is None
    latest = FeatureStore(root, "conc", fingerprint="fp").get(rels[0])
    assert latest["writer"].tolist() == [1, 200] and _whole_write(latest) is None
    fig.add(runs=1, cases=checks + 200)
    fig.note("a reader held one entry's tensors while another process rewrote (and removed) its key 220 times")


def _slow_precompute(root: str) -> None:
    precompute(root, encoder=MeanColor(delay=0.05), batch_size=2, num_workers=2, progress=False)


def test_a_second_precompute_is_refused_and_a_killed_runs_lock_goes_with_it(tmp_path, figures):
    fig = figures("concurrency: precompute lock")
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 24, size=32)
    lock = os.path.join(root, ".featstore", "toy", "locks", "precompute.lock")
    first = fork(_slow_precompute, root)
    deadline = time.monotonic() + 60
    while not (lock_is_held(lock) and any(f.endswith(".toy.safetensors") for _, _, fs in os.walk(root) for f in fs)):
        assert time.monotonic() < deadline and first.is_alive(), "the first run did not start"
        time.sleep(0.02)
    # While it runs (decoding in two DataLoader worker processes), a second run is refused...
    with pytest.raises(LockHeldError, match=f"pid {first.pid}"):
        precompute(root, encoder=MeanColor(), num_workers=0, progress=False)
    rc, _, err = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--num-workers", "0")
    assert rc == 1 and "another precompute of feature 'toy' is running" in err
    rc, _, err = cli("gc", root, "--feature", "toy")
    assert rc == 1 and "another precompute of feature 'toy' is running" in err
    # ... and once it is killed, its lock is gone at once, though its workers live on a while.
    os.kill(first.pid, signal.SIGKILL)
    first.join(30)
    summary = precompute(root, encoder=MeanColor(), num_workers=0, progress=False)
    assert summary["written"] + summary["skipped"] == len(rels) and summary["failed"] == 0
    fig.add(runs=2, cases=4)
    fig.note("refused: precompute() and the CLI (LockHeldError naming the holder's pid), gc; "
             "a rerun right after kill -9 of the holder (its decoding workers still alive) starts")
