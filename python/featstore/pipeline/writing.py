"""Writing entries on a background thread (the Rust writer releases the GIL, so encoding goes on).

For each batch (or the few batches queued when the writer gets to them): every item's entry is
written atomically (temporary file, rename), the written files and their directories are fsynced
together, then one journal line per item is appended. A killed run so leaves only whole entries,
and a journal that names none that is not durable. Per-image entries of a batch are written by
one Rust call (in parallel, without the GIL), and the fsyncs run concurrently: featstore's own
cost per entry must stay far below any encoder's.

With a pack size (``precompute(layout="packed")``), per-image entries are appended to this
process's pack stream instead; when a pack is sealed (full, or open for ``PACK_MAX_OPEN_S``, and
at the end of the run) the core indexes its entries, and their journal lines are appended then.
A killed run loses the entries of its open pack, which the next run computes.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from featstore import _core
from featstore.errors import FeatstoreError
from featstore.history_writes import HistoryPass
from featstore.pipeline import journal as journal_lines
from featstore.pipeline.items import Kind, WorkItem
from featstore.pipeline.shape_log import ShapeLog
from featstore.pipeline.summary import Counts
from featstore.sets import put_set
from featstore.store import FeatureStore

#: A batch's outputs by name: one tensor with the batch as its first axis, or (ragged outputs of
#: ``encode_items``) a list of one tensor per item.
Outputs = Mapping[str, "torch.Tensor | list[torch.Tensor]"]


@dataclass(frozen=True)
class Written:
    """One entry written: its file, its size in bytes and its journal line."""

    path: str
    bytes: int
    record: journal_lines.Record


def _write_set(store: FeatureStore, item: WorkItem, tensors: Mapping[str, torch.Tensor],
               expected: Any) -> list[Written]:
    path = put_set(store, list(item.paths), tensors, expected=expected)
    return [Written(path, os.path.getsize(path), journal_lines.set_record(item.paths, path))]


def _write_history(store: FeatureStore, item: WorkItem, tensors: Mapping[str, torch.Tensor],
                   expected: Any) -> Iterator[Written]:
    """One entry per prefix length, shortest first: row ``n - 1`` of each ``[T, ...]`` output is
    the prefix of length ``n``. A prefix that fails (a frame edited since it was read, or one that
    could not be decoded) stops the longer ones, which hold the same frame; the shorter ones are
    already written. ``expected``: ``(the decoded frames' stamps, the error of the frame after
    them or None)``."""
    stamps, error = expected if expected is not None else (None, None)
    decoded = item.paths if stamps is None else item.paths[:len(stamps)]
    # The frames are stamped, digested and recorded once for every prefix the pass writes.
    history = HistoryPass(store, decoded, expected=stamps) if decoded else None
    for n in item.lengths:
        if history is None or n > len(decoded):
            raise FeatstoreError(f"{error}; the samples whose history holds it got no entry")
        path = history.put(n, {k: v[n - 1] for k, v in tensors.items()})
        yield Written(path, os.path.getsize(path), journal_lines.history_record(item.prefix(n), path))


# How the entries of sets and histories are written (see items.py; per-image entries are written a
# batch at a time, Writer._write_images): an iterable, as one causal pass over a
# history writes an entry per prefix (each yielded as soon as it is on disk, so a failure later
# in the item keeps it). ``expected`` is what the decoder read (see decoding.py): the source's
# stamp and its other inputs as stamped before reading, or the members' stamps, so features of
# an input edited since are never stored.
_WriteEntries = Callable[[FeatureStore, WorkItem, Mapping[str, torch.Tensor], Any], Iterable[Written]]
_WRITERS: dict[Kind, _WriteEntries] = {"set": _write_set, "history": _write_history}


#: Queued batches the writer takes at once (see Writer._run).
_COALESCE = 8

#: A pack open this long (seconds) is sealed even when smaller than the pack size: what a killed
#: packed run may lose.
PACK_MAX_OPEN_S = 300.0


class Writer:
    """Writes entries on a background thread: atomic entries, fsync in batches, then journal.

    Parameters
    ----------
    store : FeatureStore
        Where entries go.
    journal : str
        This process's journal.
    durable : bool
        fsync entries (and their directories) before journaling them.
    counts : Counts
        Tallies written and failed entries (samples of a history item), bytes, and the seconds
        spent writing.
    shape_log : ShapeLog
        Records the shapes of the entries, before they are written.
    pack_size : int or None
        Append per-image entries to packs of this size (None: a file per entry).
    """

    def __init__(self, store: FeatureStore, journal: str, durable: bool, counts: Counts, shape_log: ShapeLog,
                 pack_size: int | None = None) -> None:
        self.store, self.journal, self.durable, self.counts = store, journal, durable, counts
        self.shape_log = shape_log
        self.stream = _core.PackStream(pack_size, PACK_MAX_OPEN_S) if pack_size else None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=_COALESCE)
        # What each item's decoder read (stamps, inputs), set by the main loop before submitting.
        self.expected: dict[WorkItem, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def submit(self, items: list[WorkItem], outputs: Outputs) -> None:
        """Queues a batch's outputs (the batch is their first axis) for ``items``; raises what
        an earlier write raised."""
        if self.error is not None:
            raise self.error
        self.queue.put((items, outputs))

    def fail(self, item: WorkItem, reason: str) -> None:
        """Queues a failed item: it is counted and journaled."""
        self.queue.put(([item], reason))

    def close(self) -> None:
        """Writes what is queued, stops the thread and raises what a write raised."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        finished = False
        while not finished:
            # Whatever is queued is written together: one fsync pass and one journal append for
            # all of it (per-batch fsyncs cost more than a cheap encoder's batch).
            jobs = [self.queue.get()]
            while jobs[-1] is not None and len(jobs) < _COALESCE:
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if jobs[-1] is None:
                jobs.pop()
                finished = True
            if self.error is not None:
                continue  # drain
            try:
                if jobs:
                    self._write(jobs)
                if self.stream is not None:
                    self._seal(force=finished)
            except BaseException as exc:  # surfaced to the main thread on the next submit/close
                self.error = exc

    def _seal(self, *, force: bool) -> None:
        """Seals the pack stream's open pack when it is due (``force``: the end of the run): the
        core indexes its entries, and their lines go to the journal."""
        assert self.stream is not None
        t0 = time.perf_counter()
        sealed = self.store._core.seal_pack_stream(self.stream, force, self.durable)
        if sealed:
            journal_lines.append(self.journal, [journal_lines.indexed_record(self.store, r) for r in sealed],
                                 durable=self.durable)
        self.counts.stage_seconds["write"] += time.perf_counter() - t0

    def _write(self, jobs: list[tuple[list[WorkItem], Outputs | str]]) -> None:
        t0 = time.perf_counter()
        records: list[journal_lines.Record] = []
        written: list[Written] = []
        for items, outputs in jobs:
            if isinstance(outputs, str):  # a failure reason, from fail()
                self._failed(items[0], outputs, records)
                continue
            self.shape_log.observe_outputs(items, outputs)
            images = [i for i, item in enumerate(items) if item.kind == "image"]
            if images:
                written += self._write_images([items[i] for i in images], _rows(outputs, images, len(items)),
                                              records)
            for i, item in enumerate(items):
                if item.kind == "image":
                    continue
                done = 0
                try:
                    for w in _WRITERS[item.kind](self.store, item, {k: v[i] for k, v in outputs.items()},
                                                 self.expected.pop(item, None)):
                        written.append(w)
                        done += 1
                except Exception as exc:  # one bad item is recorded; the run goes on
                    if _fatal(exc):
                        raise
                    self._failed(item, exc, records, entries=item.entries - done)
        if self.durable:
            _fsync_all([w.path for w in written])
        for w in written:
            records.append(w.record)
            self.counts.written += 1
            self.counts.frames += len(w.record.get("members", ())) or 1
            self.counts.bytes += w.bytes
        journal_lines.append(self.journal, records, durable=self.durable)
        self.counts.stage_seconds["write"] += time.perf_counter() - t0

    def _write_images(self, batch: list[WorkItem], outputs: Outputs, records: list[journal_lines.Record]
                      ) -> list[Written]:
        """Writes a batch's per-image entries (``outputs``: one row, or list element, per item)
        in one call and returns them (fsynced by the caller with the rest of what it writes), or
        records each failure."""
        expected = [self.expected.pop(item, None) or (None, None) for item in batch]
        paths = [item.paths[0] for item in batch]
        stamps, inputs = [e[0] for e in expected], [e[1] for e in expected]
        if all(isinstance(v, torch.Tensor) for v in outputs.values()):
            results = self.store.write_rows(paths, outputs, inputs=inputs, expected=stamps,  # type: ignore[arg-type]
                                            stream=self.stream)
        else:  # ragged outputs of encode_items: one tensor per item
            results = self.store.write_many([(p, {k: v[i] for k, v in outputs.items()}, inp, st) for i, (p, inp, st)
                                             in enumerate(zip(paths, inputs, stamps, strict=True))], stream=self.stream)
        written = []
        for item, w in zip(batch, results, strict=True):
            if isinstance(w, BaseException):
                if _fatal(w):
                    raise w
                self._failed(item, w, records)
            elif isinstance(w, int):  # appended to the open pack: journaled when it is sealed
                self.counts.written += 1
                self.counts.frames += 1
                self.counts.bytes += w
            else:
                written.append(Written(os.fspath(w["path"]), int(w["bytes"]), journal_lines.ok_record(
                    self.store, item.paths[0], w)))
        return written

    def _failed(self, item: WorkItem, why: str | BaseException, records: list[journal_lines.Record], *,
                entries: int | None = None) -> None:
        """Counts a failed item's ``entries`` that were not written (default: all of them) and
        journals it: the manifest lists it."""
        if isinstance(why, BaseException):
            why = (f"source disappeared: {why}" if isinstance(why, FileNotFoundError)
                   else f"{type(why).__name__}: {why}")
        self.counts.failed += item.entries if entries is None else entries
        self.counts.failures.append((item.name, why))
        records.append(journal_lines.failed_record(self.store, item.name, why))


def _rows(outputs: Outputs, rows: list[int], n: int) -> Outputs:
    """``outputs`` (``n`` rows, or lists of ``n``) for ``rows`` only; as they are when that is all."""
    if rows == list(range(n)):
        return outputs
    index = torch.tensor(rows)
    return {k: v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) else [v[i] for i in rows]
            for k, v in outputs.items()}


def _fatal(exc: BaseException) -> bool:
    """Errors that will hit every item (a full or read-only disk) stop the run; others skip one."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _fsync_all(paths: Sequence[str]) -> None:
    """fsyncs files, then their directories once each (makes the renames durable), concurrently."""
    if paths:
        _core.sync_all(list(paths))
