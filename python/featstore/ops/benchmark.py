"""``featstore bench``: per-item lookup and read latency of featstore and of the schemes it
replaces, on the user's own data."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from featstore.errors import NoImagesFoundError
from featstore.fmt import human_bytes
from featstore.ops.files import base_dir, file_size
from featstore.progress import each
from featstore.scan import scan
from featstore.store import FeatureStore
from featstore.vocabulary import LEGACY_SIDECAR_SUFFIX, sidecar_suffix

# (group, name, function timed, its arguments, note)
_Operation = tuple[str, str, Callable[[Any], Any], Sequence[Any], str]


@dataclass
class BenchRow:
    """One measured operation.

    Attributes
    ----------
    group : str
        ``lookup``, ``read`` or ``tree`` (per source, over the whole tree).
    name : str
        What was timed.
    seconds : float
        Per item (the fastest of the repeated passes), in seconds.
    ratio : float
        ``seconds`` over featstore's time for the same group (above 1: slower than featstore).
    note : str
        What the scheme checks, or does not.
    """

    group: str
    name: str
    seconds: float
    ratio: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "seconds": self.seconds, "us": round(self.seconds * 1e6, 3),
                "ratio": round(self.ratio, 3), "note": self.note}


@dataclass
class BenchReport:
    """Per-item latencies of featstore and the schemes it replaces on the user's own data."""

    data_root: str
    feature: str
    samples: int
    repeat: int
    image_bytes: int
    entry_bytes: int
    legacy_copies: str
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {"data_root": self.data_root, "feature": self.feature, "samples": self.samples, "repeat": self.repeat,
                "mean_image_bytes": self.image_bytes, "mean_entry_bytes": self.entry_bytes,
                "legacy_copies": self.legacy_copies, "rows": [r.to_dict() for r in self.rows]}

    def text(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"bench of feature {self.feature} under {self.data_root}: {self.samples} sources with valid "
                 f"entries (images {human_bytes(self.image_bytes)}, entries {human_bytes(self.entry_bytes)} on "
                 f"average), fastest of {self.repeat} passes, warm page cache, one torch thread",
                 f"  {'operation':{width}}  {'per item':>10}  {'vs featstore':>12}"]
        group = ""
        for r in self.rows:
            if r.group != group:
                group = r.group
                lines.append(f"{group}:")
            lines.append(f"  {r.name:{width}}  {_fmt_seconds(r.seconds):>10}  {r.ratio:>11.2f}x  {r.note}")
        lines.append("legacy reads use torch.save copies of the sampled entries' tensors, written to "
                     f"{self.legacy_copies} for the run and removed after")
        return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def bench(store: FeatureStore, sources: Sequence[str], *, samples: int = 200, repeat: int = 3,
          threads: int | None = None, progress: bool | None = None, seed: int = 0) -> BenchReport:
    """Measures lookup and read latency per item on the store's own data.

    Samples up to ``samples`` sources with valid entries and times, per item, the fastest of
    ``repeat`` passes after one warm-up pass (so the page cache is warm for every scheme):

    - lookup: ``FeatureStore.contains`` (two stats, catches edits); the legacy SHA256 scheme
      (``sha256(path + image bytes)[:16]`` in Python, as the old loader did, then ``exists``);
      the path-concatenation check ``os.path.exists(path + ".vggt_cache.pt")`` (checks nothing).
    - read: ``FeatureStore.get`` (zero-copy), ``get`` plus a copy of every tensor (touches
      every byte), and ``torch.load(weights_only=True)`` of ``torch.save`` copies of the same
      tensors, with and without the SHA256 key.
    - tree (per source, over every source): what ``featstore status`` costs (one walk, then a
      check of every source by a store opened afresh) against ``find -printf`` of every file's
      stamp, the floor of any check of the tree.

    The copies are written to a temporary directory beside the entries (same file system) and
    removed afterwards. torch runs on one thread meanwhile, as in DataLoader workers.

    Raises
    ------
    NoImagesFoundError
        No source has a valid entry to measure.
    """
    import torch  # imported here so that the CLI, which imports ops at start-up, stays fast

    rels = list(sources)
    states = store.states(rels, threads=threads, progress=progress)
    valid = [r for r, s in zip(rels, states, strict=True) if s == "valid"]
    if not valid:
        raise NoImagesFoundError(f"no source under {store.data_root} has a valid {store.feature} entry to measure "
                                 f"({len(rels):,} sources checked); compute entries first (`featstore precompute`)")
    picked = sorted(random.Random(seed).sample(valid, min(samples, len(valid))))
    paths = [os.path.join(store.data_root, r) for r in picked]
    fresh = FeatureStore(**store.__getstate__())  # a new store: as a new training process sees it
    try:
        copies = tempfile.mkdtemp(prefix=".featstore-bench-", dir=base_dir(store))
    except OSError:
        copies = tempfile.mkdtemp(prefix="featstore-bench-")
    # One torch thread, as in DataLoader workers: per-sample copies are too small to gain from
    # more, and on a busy machine waking a thread pool costs milliseconds of noise.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        legacy_files = []
        entry_bytes = 0
        for rel, path in zip(each(picked, "preparing", progress, "sources"), paths, strict=True):
            tensors = fresh.get(rel)
            assert tensors is not None
            entry_bytes += file_size(fresh.entry_path(rel))
            target = os.path.join(copies, _legacy_key_python(path) + ".pt")
            torch.save({k: v.clone() for k, v in tensors.items()}, target)
            legacy_files.append(target)
        operations = _operations(fresh, picked, paths, copies, legacy_files)
        timed = [(group, name, _fastest(fn, args, repeat), note)
                 for group, name, fn, args, note in each(operations, "measuring", progress, "operations")]
        timed += _whole_tree(store, repeat, threads)
    finally:
        torch.set_num_threads(torch_threads)
        shutil.rmtree(copies, ignore_errors=True)
    base = {g: s for g, n, s, _ in timed
            if n.startswith(("featstore contains", "featstore get (", "featstore status"))}
    rows = [BenchRow(g, n, s, s / base[g] if base[g] > 0 else float("nan"), note) for g, n, s, note in timed]
    image_bytes = sum(file_size(p) for p in paths) // len(paths)
    return BenchReport(store.data_root, store.feature, len(picked), repeat, image_bytes, entry_bytes // len(paths),
                       copies, rows)


def _operations(fresh: FeatureStore, picked: list[str], paths: list[str], copies: str,
                legacy_files: list[str]) -> list[_Operation]:
    """What :func:`bench` times: featstore's lookup and reads of the ``picked`` sources, and the
    legacy schemes' over the ``torch.save`` copies in ``copies``."""
    import torch  # on first use, as in bench

    def sha256_lookup(path: str) -> bool:
        return os.path.exists(os.path.join(copies, _legacy_key_python(path) + ".pt"))

    def sha256_read(path: str) -> Any:
        return torch.load(os.path.join(copies, _legacy_key_python(path) + ".pt"), weights_only=True)

    def get_copy(rel: str) -> Any:
        got = fresh.get(rel)
        return {k: v.clone() for k, v in (got or {}).items()}

    suffix = LEGACY_SIDECAR_SUFFIX
    return [
        ("lookup", "featstore contains", fresh.contains, picked, "2 stats; catches edited images"),
        ("lookup", "sha256(path + bytes) + exists", sha256_lookup, paths, "reads the whole image"),
        ("lookup", f"exists(path + '{suffix}')", lambda p: os.path.exists(p + suffix), paths,
         "checks nothing: serves stale features"),
        ("read", "featstore get (zero-copy)", fresh.get, picked, "maps the entry"),
        ("read", "featstore get + copy", get_copy, picked, "touches every byte"),
        ("read", "sha256 key + torch.load", sha256_read, paths, "the legacy SHA256 cache"),
        ("read", "torch.load (path-concat)", lambda f: torch.load(f, weights_only=True), legacy_files,
         "the legacy sidecar"),
    ]


def _whole_tree(store: FeatureStore, repeat: int, threads: int | None) -> list[tuple[str, str, float, str]]:
    """Per source, what ``featstore status`` costs over the whole tree (one walk for the sources
    and the entries' names, then a check of every source with a store opened afresh) against
    ``find -printf`` printing every file's stamp: the floor of any check of the tree. Fastest of
    ``repeat`` passes each; no ``find`` row where there is no ``find``."""
    suffix = sidecar_suffix(store.feature) if store.layout == "sidecar" else None
    sources = 0

    def status_pass() -> None:
        nonlocal sources
        found = scan(store.data_root, skip_dirs=[store.cache_dir] if store.cache_dir else (), threads=threads,
                     named_suffix=suffix)
        FeatureStore(**store.__getstate__()).states(found.paths, threads=threads)
        sources = len(found.paths)

    rows = [("tree", "featstore status (walk, check every source)", _best(status_pass, repeat), "")]
    find = shutil.which("find")
    if find is not None:
        cmd = [find, store.data_root, "-printf", "%p %s %T@ %i %C@\n"]
        rows.append(("tree", "find -printf (every file's stamp)", _best(
            lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False), repeat),
            "the floor: walks and stats, checks nothing"))
    return [(g, n, seconds / max(sources, 1), note) for g, n, seconds, note in rows]


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fastest(fn: Callable[[Any], Any], args: Sequence[Any], repeat: int) -> float:
    """Seconds per item of ``fn`` over ``args``: the fastest of ``repeat`` passes after a warm-up."""
    for a in args:  # warm-up: page cache, headers, first-use checks
        fn(a)
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for a in args:
            fn(a)
        best = min(best, time.perf_counter() - t0)
    return best / len(args)


def _legacy_key_python(path: str) -> str:
    # What the old data loader did for every sample (Python's hashlib over path + whole image).
    h = hashlib.sha256(path.encode("utf-8"))
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]
