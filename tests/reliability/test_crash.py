"""Crash: ``kill -9`` a precompute run at 20 seeded random moments; nothing finished is lost and
nothing torn is ever served.

Each run precomputes a copy of one image tree in a process forked from this one (torch is already
imported: no two-second start per run). The run announces on a pipe, one byte per event, when it
starts an entry write, an fsync batch, a journal append or the encoding of a batch. A seeded plan
picks each moment: the n-th event of one kind plus up to 2 ms (so the kill lands inside the
operation or just after it), or a uniform time during the run. A quarter of the runs decode in
DataLoader worker processes, which outlive the killed run for a few seconds.

After each kill: every entry on disk parses, matches its checksum and holds exactly the values
the encoder computes (``FeatureStore.get``), ``featstore verify`` agrees; a rerun writes exactly
the missing entries, leaves the finished ones untouched (same inode) and compacts the journals;
``featstore gc`` removes the temporary files of interrupted writes.
"""

from __future__ import annotations

import collections
import json
import os
import random
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import age, cli
from toy_encoders import Wide

from featstore import pipeline, writes
from featstore.examples import make_image_tree
from featstore.manifest import indexed_sources
from featstore.pipeline import journal, writing
from featstore.store import FeatureStore

from .conftest import check_entries, copy_tree, entry_files, expected_outputs, fork, temp_files

KILLS = 20
SEED = 7  # the plan of kill moments, hence the test, is reproducible
IMAGES = 12
BATCH = 2
EVENTS = {b"w": "entry write (a batch, fsynced when durable)", b"f": "fsync", b"j": "journal append",
          b"e": "between batches"}


class _AnnouncedJournal:
    """The extension module as the pipeline's journal sees it, with journal appends announced."""

    def __init__(self, core: Any, append_journal: Callable[..., Any]) -> None:
        self._core = core
        self.append_journal = append_journal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def _announcing(fd: int, code: bytes, fn: Callable[..., Any]) -> Callable[..., Any]:
    def announced(*args: Any, **kwargs: Any) -> Any:
        os.write(fd, code)
        return fn(*args, **kwargs)

    return announced


def _precompute_announcing(root: str, fd: int, workers: int) -> None:
    """The run to kill (in a forked child): precompute, announcing each event on ``fd``."""
    writes._put_many = _announcing(fd, b"w", writes._put_many)
    writing._fsync_all = _announcing(fd, b"f", writing._fsync_all)
    journal._core = _AnnouncedJournal(journal._core, _announcing(fd, b"j", journal._core.append_journal))
    enc = Wide(delay=0.02)
    enc.encode = _announcing(fd, b"e", enc.encode)  # type: ignore[method-assign]
    os.write(fd, b"s")
    pipeline.precompute(root, encoder=enc, batch_size=BATCH, num_workers=workers, progress=False)
    os.write(fd, b"d")


def _run(root: str, workers: int, kill_at: tuple[bytes, int, float] | None) -> tuple[bool, collections.Counter, float]:
    """Runs the announced precompute; with ``kill_at = (event, n, delay)`` sends SIGKILL ``delay``
    seconds after the n-th such event (event ``b"s"``: the start). Returns whether it was killed,
    the events seen and the seconds from its start to its end (or its kill)."""
    r, w = os.pipe()
    proc = fork(_precompute_announcing, root, w, workers)
    os.close(w)
    seen: collections.Counter = collections.Counter()
    started = ended = 0.0
    sent = False
    try:
        while True:
            ready, _, _ = select.select([r], [], [], 0.2)
            if not ready:
                if not proc.is_alive():
                    break
                continue
            chunk = os.read(r, 64)
            if not chunk:  # every writer is gone: the run ended
                break
            for byte in chunk:
                code = bytes([byte])
                seen[code] += 1
                if code == b"s":
                    started = time.perf_counter()
                if kill_at and code == kill_at[0] and seen[code] == kill_at[1]:
                    time.sleep(kill_at[2])
                    os.kill(proc.pid, signal.SIGKILL)
                    sent = True
                    break
            ended = time.perf_counter()
            if sent or seen[b"d"]:
                break
    finally:
        os.close(r)
        proc.join(60)
    killed = sent and proc.exitcode == -signal.SIGKILL  # else it had finished before the signal came
    assert killed or proc.exitcode == 0, f"the run failed on its own (exit code {proc.exitcode})"
    return killed, seen, ended - started


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], dict]:
    """The image tree every run copies (aged: out of the racy window) and the expected values."""
    root = str(tmp_path_factory.mktemp("crash") / "template")
    rels = make_image_tree(root, IMAGES, size=32)
    for rel in rels:
        age(os.path.join(root, rel))
    return root, rels, expected_outputs(Wide(), root, rels)


def _recover(root: str, expected: dict) -> tuple[int, bool, list[str]]:
    """Checks a killed run's tree, reruns it and cleans up. Returns the entries the kill left,
    whether it left a temporary file, and every problem found."""
    done = entry_files(root, "wide")
    temps = temp_files(root)
    problems = check_entries(root, "wide", expected)
    rc, out, _ = cli("verify", root, "--feature", "wide", "--json")
    report = json.loads(out)
    problems += [f"verify: {p}" for p in report["problems"]]
    if rc != 0 or report["entries"] != len(done):
        problems.append(f"verify: exit code {rc}, {report['entries']} entries read of {len(done)}")

    # The rerun writes exactly what is missing and leaves every finished entry alone.
    inodes = {p: os.stat(p).st_ino for p in done}
    s = pipeline.precompute(root, encoder=Wide(), batch_size=4, num_workers=0, progress=False)
    if (s["written"], s["skipped"], s["failed"]) != (IMAGES - len(done), len(done), 0):
        problems.append(f"rerun: wrote {s['written']}, skipped {s['skipped']}, failed {s['failed']} "
                        f"with {len(done)} of {IMAGES} entries done")
    problems += [f"rerun rewrote {p}" for p, ino in inodes.items() if os.stat(p).st_ino != ino]
    problems += [f"after the rerun: {p}" for p in check_entries(root, "wide", expected)]
    if len(entry_files(root, "wide")) != IMAGES:
        problems.append(f"after the rerun: {len(entry_files(root, 'wide'))} entries of {IMAGES}")
    with open(os.path.join(root, "wide_cache_manifest.json")) as f:
        manifest = json.load(f)
    indexed = indexed_sources(FeatureStore(root, "wide"))
    if len(indexed) != IMAGES or manifest["processed_images"] != IMAGES:
        problems.append(f"after the rerun the index holds {len(indexed)} of {IMAGES} entries "
                        f"(processed_images {manifest['processed_images']}): the entries the killed run wrote "
                        "without a journal line are missing")
    if FeatureStore(root, "wide").journal_paths():
        problems.append("journals left after the rerun")

    rc, out, _ = cli("gc", root, "--feature", "wide", "--min-tmp-age", "0", "--json")
    removed = {item["path"] for item in json.loads(out)["removed"]}
    if rc != 0 or removed != set(temps) or temp_files(root) or len(entry_files(root, "wide")) != IMAGES:
        problems.append(f"gc: exit code {rc}, removed {sorted(removed)}, temps were {temps}")
    return len(done), bool(temps), problems


def test_kill_9_at_random_moments_loses_and_tears_nothing(template, tmp_path, figures):
    source, rels, expected = template
    fig = figures("crash: kill -9 during precompute")
    rng = random.Random(SEED)
    # One uninterrupted run gives the number of events of each kind and the run's length.
    _, counts, seconds = _run(copy_tree(source, str(tmp_path / "calibration")), 0, None)
    assert all(counts[e] for e in EVENTS), counts
    aimed: collections.Counter = collections.Counter()
    left_temps = early = 0
    problems: list[str] = []
    for i in range(KILLS + 10):
        if sum(aimed.values()) == KILLS:
            break
        root = copy_tree(source, str(tmp_path / f"run{i:02d}"))
        workers = 2 if i % 4 == 3 else 0
        kind = rng.choice([*EVENTS, b"s"])
        if kind == b"s":
            kill_at = (kind, 1, rng.uniform(0, seconds))
        else:
            kill_at = (kind, rng.randint(1, counts[kind]), rng.uniform(0, 0.002))
        killed, _, _ = _run(root, workers, kill_at)
        if not killed:  # a moment late in the run, and this run was faster: still checked, not counted
            early += 1
        else:
            aimed["any time" if kind == b"s" else EVENTS[kind]] += 1
        done, temp, found = _recover(root, expected)
        left_temps += temp
        problems += [f"run {i} (kill at {kill_at}, {workers} workers): {p}" for p in found]
        fig.add(runs=killed, cases=done + IMAGES, failures=len(found))
    fig.note(f"seed {SEED}; kills aimed at {', '.join(f'{k} {n}' for k, n in sorted(aimed.items()))}; "
             f"{left_temps} interrupted an entry write (its temp file removed by gc)"
             + (f"; {early} runs ended before their moment" if early else ""))
    assert not problems, "\n".join(problems)
    assert sum(aimed.values()) == KILLS


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (zombies count as gone)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_precompute_leaves_no_decoding_worker_behind(template, tmp_path, figures):
    fig = figures("crash: kill -9 during precompute")
    root = copy_tree(template[0], str(tmp_path / "run"))
    r, w = os.pipe()
    proc = fork(_precompute_announcing, root, w, 2)
    os.close(w)
    try:
        while os.read(r, 1) != b"e":  # the first batch is being encoded: the workers run
            pass
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        deadline = time.monotonic() + 30
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in workers if _alive(p)]
    finally:
        os.close(r)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    fig.add(runs=1, cases=len(workers), failures=len(left))
    assert not left, f"decoding workers {left} outlived their killed precompute"
