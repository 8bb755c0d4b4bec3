"""The precompute engine behind ``featstore precompute`` and :func:`featstore.pipeline`.

The pipeline keeps the device busy:

1. **scan** the data root (Rust, parallel) and **plan**: only missing or stale entries (all with
   ``overwrite``), restricted to a list, an index range, a shard and the torchrun rank;
2. **decode** in DataLoader worker processes (the encoder's ``preprocess`` gives uint8, so
   workers send a quarter of the bytes of float images);
3. **batch** items of equal shape together ("crop" preprocessing gives varying heights);
4. **encode** on the device under ``inference_mode`` (the encoder picks its autocast);
5. **write** in a background thread (the Rust writer releases the GIL): each entry atomically,
   fsynced in batches, then one journal line per entry, so a killed run leaves only complete
   entries and a journal the next run continues from;
6. **compact** the journals into the manifest at the end.

A CUDA out-of-memory error halves the batch and retries; an undecodable image is recorded as
failed and the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from featstore import _core, env
from featstore.encoders import Encoder, describe, resolve_encoder
from featstore.encoding import decode_source, encode_batch, is_out_of_memory
from featstore.errors import FeatstoreError
from featstore.lock import lock_dir, lock_is_held, run_lock
from featstore.scan import nothing_found, scan
from featstore.store import FeatureStore

#: States precompute (re)computes; `valid` ones only with overwrite.
TODO_STATES = ("missing", "stale", "foreign", "corrupt", "legacy")


# ----------------------------------------------------------------------------------- selection
def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) to ``(I, N)``."""
    if spec is None or isinstance(spec, tuple):
        return spec
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r} is not of the form I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: I must be in 0..N-1")
    return i, n


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun (from the environment), else ``(0, 1)``."""
    return env.distributed_rank()


def _join_process_group(world: int) -> bool:
    """Under torchrun, joins (or reuses) the process group so ranks can wait for each other
    before rank 0 compacts their journals. gloo: the group only ever sends a barrier."""
    if world <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
    return True


def select(paths: Sequence[Any], *, start_idx: int | None = None, end_idx: int | None = None,
           shard: tuple[int, int] | None = None, rank: tuple[int, int] = (0, 1)) -> list[Any]:
    """The sources this process works on: ``[start:end]`` of the sorted list, then every N-th
    for a shard, then every world-th for a torchrun rank (disjoint, together complete)."""
    chosen = list(paths[start_idx:end_idx])
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    r, world = rank
    return chosen[r::world] if world > 1 else chosen


# ----------------------------------------------------------------------------------- decoding
class _Decode(torch.utils.data.Dataset):
    """Decodes one source in a worker: ``(index, uint8 tensor or None, error or None)``; for an
    encoder with ``encode_items``, whatever its ``preprocess`` returns (a caption) instead of the
    tensor."""

    def __init__(self, encoder: Encoder, root: str, rels: Sequence[str]) -> None:
        self.encoder, self.root, self.rels = encoder, root, list(rels)

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None, Any]:
        """``(index, decoded or None, error or None, stamp(s) before reading)``: the writer
        refuses to store features of a source that changed after it was read."""
        item = self.rels[i]
        if isinstance(item, tuple):  # a frame set: [S, 3, H, W], smaller frames padded with white
            from featstore.models.vggt import stack_uint8_images

            frames = [decode_source(self.encoder, os.path.join(self.root, r)) for r in item]
            error = next((err for _, err, _ in frames if err is not None), None)
            if error is not None:  # one bad frame fails its set, never the run
                return i, None, error, None
            try:
                return i, stack_uint8_images([f for f, _, _ in frames]), None, tuple(st for _, _, st in frames)
            except Exception as exc:
                return i, None, f"{type(exc).__name__}: {exc}", None
        return (i, *decode_source(self.encoder, os.path.join(self.root, item)))


def _identity(item: Any) -> Any:
    return item


# ----------------------------------------------------------------------------------- writing
@dataclass
class _Counts:
    written: int = 0
    failed: int = 0
    bytes: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class _Writer:
    """Writes entries on a background thread: atomic entries, fsync in batches, then journal."""

    def __init__(self, store: FeatureStore, journal: str, durable: bool, counts: _Counts,
                 inputs: Callable[[str, str], Mapping[str, str | bytes]] | None = None) -> None:
        self.store, self.journal, self.durable, self.counts = store, journal, durable, counts
        self.inputs = inputs  # the encoder's optional inputs(rel, path): caption files, control images
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        # Each item's source stamp(s) when it was read, set by the main loop before submitting.
        self.expected: dict[Any, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def submit(self, rels: list[Any], outputs: dict[str, torch.Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((rels, outputs))

    def fail(self, rel: str, reason: str) -> None:
        self.queue.put(([rel], reason))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain
            try:
                self._write(*job)
            except BaseException as exc:  # surfaced to the main thread on the next submit/close
                self.error = exc

    def _write(self, rels: list[Any], outputs: dict[str, torch.Tensor] | str) -> None:
        t0 = time.perf_counter()
        records: list[dict[str, Any]] = []
        if isinstance(outputs, str):
            self._failed(rels[0], outputs, records)
        elif rels and isinstance(rels[0], tuple):
            self._write_sets(rels, outputs, records)
        else:
            written = []
            for i, rel in enumerate(rels):
                try:
                    inputs = self.inputs(rel, os.path.join(self.store.data_root, rel)) if self.inputs else None
                    w = self.store.write(rel, {k: v[i] for k, v in outputs.items()}, inputs=inputs,
                                        expected=self.expected.pop(rel, None))
                except Exception as exc:  # one bad item is recorded; the run goes on
                    if _fatal(exc):
                        raise
                    self._failed(rel, exc, records)
                    continue
                written.append((rel, w))
            if self.durable:
                _fsync_all([os.fspath(w["path"]) for _, w in written])
            for rel, w in written:
                records.append({"op": "ok", "path": rel, "source": list(w["source"]), "entry": list(w["entry"]),
                                "racy": bool(w["check_first"])})
                self.counts.written += 1
                self.counts.bytes += int(w["bytes"])
        _core.append_journal(self.journal, [json.dumps(r) for r in records], durable=self.durable)
        self.counts.stage_seconds["write"] += time.perf_counter() - t0

    def _failed(self, item: Any, why: str | BaseException, records: list[dict[str, Any]]) -> None:
        """Counts a failed item (a source or a frame set) and journals it: the manifest lists it."""
        if isinstance(why, BaseException):
            why = (f"source disappeared: {why}" if isinstance(why, FileNotFoundError)
                   else f"{type(why).__name__}: {why}")
        name = _item_name(item)
        self.counts.failed += 1
        self.counts.failures.append((name, why))
        records.append({"op": "failed", "path": name, "reason": why})

    def _write_sets(self, sets: list[tuple[str, ...]], outputs: dict[str, torch.Tensor],
                    records: list[dict[str, Any]]) -> None:
        from featstore.sets import put_set

        paths = []
        for i, members in enumerate(sets):
            try:
                path = put_set(self.store, list(members), {k: v[i] for k, v in outputs.items()},
                               expected=self.expected.pop(members, None))
            except Exception as exc:  # one bad set is recorded; the run goes on
                if _fatal(exc):
                    raise
                self._failed(members, exc, records)
                continue
            paths.append(path)
            # Sets are not in the per-image index; the journal line documents the write.
            records.append({"op": "set", "members": list(members), "entry": path})
            self.counts.written += 1
            self.counts.bytes += os.path.getsize(path)
        if self.durable:
            _fsync_all(paths)


def _fatal(exc: BaseException) -> bool:
    """Errors that will hit every item (a full or read-only disk) stop the run; others skip one."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _journal_unindexed(store: FeatureStore, rels: list[str], journal: str) -> None:
    """Journals an ``ok`` record for each valid entry among ``rels`` that this process judged
    itself rather than taking it from the manifest's index (``Store.unindexed_records``)."""
    records = [json.dumps({"op": "ok", "path": os.fspath(rel), "source": [size, mtime], "entry": [esize, emtime],
                           "racy": bool(racy)})
               for rel, (size, mtime, esize, emtime, racy) in store.index_records(rels, unindexed_only=True)]
    if records:
        _core.append_journal(journal, records)


def _item_name(item: Any) -> str:
    """A work item's name in messages: a source path, or a frame set's members joined by '+'."""
    return "+".join(item) if isinstance(item, tuple) else str(item)


def _fsync_all(paths: Sequence[str]) -> None:
    """fsyncs files, then their directories once each (makes the renames durable)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in {os.path.dirname(p) for p in paths}:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------- the run
def _default_device() -> str:
    return env.device() or ("cuda:0" if torch.cuda.is_available() else "cpu")


def precompute(data_root: str | os.PathLike[str], *, encoder: Any = "vggt", feature: str | None = None,
               layout: str = "sidecar", cache_dir: str | os.PathLike[str] | None = None,
               device: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
               skip_existing: bool | None = None, overwrite: bool = False, start_idx: int | None = None,
               end_idx: int | None = None, shard: str | tuple[int, int] | None = None,
               files_from: str | os.PathLike[str] | None = None, extensions: Sequence[str] | None = None,
               jsonl: str | None = None, dry_run: bool = False, force: bool = False, durable: bool = True,
               progress: bool | None = None, encoder_options: dict[str, Any] | None = None,
               model_path: str | None = None) -> dict[str, Any]:
    """Computes and stores an encoder's features for every source under ``data_root``.

    Parameters
    ----------
    data_root : path
        The dataset directory.
    encoder : str, encoder, nn.Module or callable
        ``"vggt"``, ``"module.path:callable"``, an encoder object (see
        :mod:`featstore.encoders.base`), an ``nn.Module``, or a factory of one.
    feature : str, optional
        Feature name (default: the encoder's ``name``).
    layout, cache_dir
        Where entries go (see :class:`featstore.FeatureStore`).
    device : str, optional
        Default ``$DEVICE``, else ``cuda:0`` when available, else ``cpu``.
    batch_size : int, optional
        Images per batch (default ``$BATCH_SIZE`` or 16); halved on CUDA out-of-memory.
    num_workers : int, optional
        Decoding processes (default: one per core on the CPU, cores - 1 with a GPU, at most 8; 0
        decodes in this process). On the CPU, torch computes with the cores left over.
    skip_existing : bool, optional
        Skip sources whose entry is valid (default ``$SKIP_EXISTING`` or True). ``overwrite``
        recomputes everything.
    start_idx, end_idx : int, optional
        A range of the sorted source list.
    shard : "I/N", optional
        Take every N-th source starting at I (run N shards anywhere, in any order).
    files_from : path, optional
        Only the sources listed in this file.
    extensions, jsonl
        What to scan (see :func:`featstore.scan`).
    dry_run : bool
        Plan only: counts, estimated bytes, free space. Nothing is loaded or written.
    force : bool
        Start even when the estimate says the disk is too small.
    durable : bool
        fsync entries (in batches) before recording them in the journal.
    progress : bool, optional
        Progress bar on stderr (default: when stderr is a terminal).
    model_path : str, optional
        The model the features are for (recorded in the manifest as ``model_path``, as the old
        scripts did); the encoder's own weights are part of the encoder.
    encoder_options : dict, optional
        Options of the ``vggt`` encoder (``model_path``, ``layers``, ``tokens``, ``dtype``,
        ``mode``, ``random_weights_seed``).

    Returns
    -------
    dict
        The summary ``featstore precompute --json`` prints.
    """
    t_start = time.perf_counter()
    shard_spec = parse_shard(shard)  # a bad spec fails before anything loads
    device = device or _default_device()
    if batch_size is None:
        batch_size = env.batch_size(16)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if skip_existing is None:
        skip_existing = env.skip_existing()
    if encoder == "vggt":
        # The default stored dtype depends on the device (bf16 on GPUs that support it).
        enc = resolve_encoder(encoder, **{"device": device, **(encoder_options or {})})
    else:
        enc = resolve_encoder(encoder)
    feature = feature or enc.name
    fingerprint = enc.fingerprint()
    store = FeatureStore(data_root, feature, layout=layout, cache_dir=cache_dir, fingerprint=fingerprint)

    rank = distributed_rank()
    show = sys.stderr.isatty() if progress is None else progress

    found = scan(store.data_root, extensions=extensions, jsonl=jsonl, files_from=files_from,
                 skip_dirs=[store.cache_dir] if store.cache_dir else (), progress=show)
    if len(found) == 0:
        raise nothing_found(found, extensions=extensions, jsonl=jsonl, files_from=files_from)
    frames = int(getattr(enc, "frames_per_set", 1))
    items: list[Any] = found.paths if frames == 1 else frame_sets(found.sets, found.paths, frames)
    mine = select(items, start_idx=start_idx, end_idx=end_idx, shard=shard_spec, rank=rank)
    t_plan = time.perf_counter()
    if frames == 1:
        states = store.states(mine)
    else:
        from featstore.sets import set_state

        states = [set_state(store, list(members)) for members in mine]
    todo = [rel for rel, s in zip(mine, states, strict=True)
            if overwrite or not skip_existing or s in TODO_STATES or s.startswith("error")]
    plan_seconds = time.perf_counter() - t_plan
    counts_by_state: dict[str, int] = defaultdict(int)
    for s in states:
        counts_by_state[s if not s.startswith("error") else "error"] += 1

    target_dir = store.cache_dir or store.data_root
    probe = target_dir
    while not os.path.exists(probe):  # a cache directory is created on the first write
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    per_entry = _estimate_entry_bytes(store, enc, mine, states) if frames == 1 else None
    if frames > 1 and hasattr(enc, "estimate_entry_bytes"):
        per_entry = int(enc.estimate_entry_bytes()) * frames  # type: ignore[attr-defined]
    estimate = per_entry * len(todo) if per_entry is not None else None
    summary: dict[str, Any] = {
        "data_root": store.data_root, "feature": feature, "layout": store.layout, "cache_dir": store.cache_dir,
        "fingerprint": fingerprint, "encoder": describe(enc), "device": device, "sources": len(found),
        "selected": len(mine), "planned": len(todo), "skipped": len(mine) - len(todo),
        "states": dict(counts_by_state), "estimated_bytes": estimate, "free_bytes": free,
        "plan_seconds": round(plan_seconds, 3), "dry_run": dry_run, "scan_errors": len(found.errors),
        "shard": f"{shard_spec[0]}/{shard_spec[1]}" if shard_spec else None,
        "rank": f"{rank[0]}/{rank[1]}" if rank[1] > 1 else None, "frames_per_set": frames, "model_path": model_path,
        "note": ("frames-per-set 1: each image is encoded alone (S=1); its features differ from those computed "
                 "with other frames and are valid only for single-frame use") if frames == 1 else
                (f"frames-per-set {frames}: frames are encoded together in sets of up to {frames} (from .jsonl "
                 "lists, else each directory's sorted images); read them with FeatureStore.get_set(members)"),
    }
    if dry_run:
        return summary
    if estimate is not None and estimate > free and not force:
        raise FeatstoreError(f"not enough space in {target_dir}: the plan needs about {estimate / 1e9:.2f} GB, "
                             f"{free / 1e9:.2f} GB are free. Free space, use --cache-dir elsewhere, or --force")

    counts = _Counts()
    world = max(rank[1], 1) * (shard_spec[1] if shard_spec else 1)
    me = rank[0] + (shard_spec[0] * rank[1] if shard_spec else 0)
    journal = os.fspath(_core.journal_path(store.manifest_path, me, world))
    interrupted = False
    with contextlib.ExitStack() as stack:
        if rank[0] == 0:  # torchrun's ranks are one run: rank 0 holds its lock
            stack.enter_context(run_lock(store, shard_spec))
        os.makedirs(os.path.dirname(store.manifest_path), exist_ok=True)
        if frames == 1:
            # Valid entries the manifest may not index (a killed run wrote them but not their
            # journal lines; a touched source's refreshed stamp): journal them too, so the merged
            # index holds every valid entry, not only this run's.
            planned = set(todo)
            skipped = [r for r, s in zip(mine, states, strict=True) if s == "valid" and r not in planned]
            _journal_unindexed(store, skipped, journal)
        if todo:
            try:
                _run_pipeline(store, enc, todo, device, batch_size, num_workers, durable, counts, journal, show)
            except KeyboardInterrupt:
                interrupted = True
        if _join_process_group(rank[1]):
            torch.distributed.barrier()  # every rank's journal is complete before rank 0 merges
        # Still under the lock: no other run of the feature appends to a journal being merged.
        summary["manifest"] = _finish_manifest(store, enc, found.paths, rank, shard_spec, summary)
    seconds = time.perf_counter() - t_start
    summary.update({
        "written": counts.written, "failed": counts.failed, "bytes_written": counts.bytes,
        "failures": [list(f) for f in counts.failures[:100]], "seconds": round(seconds, 3),
        "images_per_second": round(counts.written / seconds, 2) if seconds > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in counts.stage_seconds.items()},
        "interrupted": interrupted,
    })
    if interrupted:
        raise KeyboardInterrupt(summary)
    return summary


def frame_sets(jsonl_sets: Sequence[Sequence[str]], paths: Sequence[str], frames: int) -> list[tuple[str, ...]]:
    """Work items of ``--frames-per-set N``: each ``.jsonl`` list, else each directory's sorted
    images, cut into consecutive chunks of up to N frames (a shorter last chunk is its own set)."""
    groups: list[Sequence[str]] = list(jsonl_sets)
    if not groups:
        by_dir: dict[str, list[str]] = defaultdict(list)
        for p in paths:  # already sorted
            by_dir[os.path.dirname(p)].append(p)
        groups = [by_dir[d] for d in sorted(by_dir)]
    return [tuple(g[i:i + frames]) for g in groups for i in range(0, len(g), frames)]


def _estimate_entry_bytes(store: FeatureStore, enc: Encoder, rels: Sequence[str], states: Sequence[str]) -> int | None:
    valid = [r for r, s in zip(rels, states, strict=True) if s == "valid"][:16]
    sizes = []
    for r in valid:
        with contextlib.suppress(OSError):
            sizes.append(os.path.getsize(store.entry_path(r)))
    if sizes:
        return int(sum(sizes) / len(sizes))
    estimate = getattr(enc, "estimate_entry_bytes", None)
    return int(estimate()) if callable(estimate) else None


def _run_pipeline(store: FeatureStore, enc: Encoder, todo: list[Any], device: str, batch_size: int,
                  num_workers: int | None, durable: bool, counts: _Counts, journal: str, show: bool) -> None:
    from tqdm import tqdm

    dev = torch.device(device)
    cores = len(os.sched_getaffinity(0))
    if num_workers is None:
        # On a GPU the main process needs a core to feed it; on the CPU it mostly waits for
        # decoded images while torch computes, so every core decodes.
        num_workers = min(8, cores if dev.type == "cpu" else max(cores - 1, 0))
    if hasattr(enc, "to"):
        enc.to(device)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        # torch's intra-op threads would compete with the decoding workers for the same cores.
        torch.set_num_threads(max(1, cores - num_workers))
    loader = torch.utils.data.DataLoader(
        _Decode(enc, store.data_root, todo), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=_identity, pin_memory=dev.type == "cuda",
        # Two batches in flight across the workers: decoding never waits for a batch to encode.
        prefetch_factor=max(2, -(-2 * batch_size // num_workers)) if num_workers else None,
        persistent_workers=False)
    writer = _Writer(store, journal, durable, counts, getattr(enc, "inputs", None))
    items_mode = hasattr(enc, "encode_items")  # preprocess gives items (captions), not images
    buckets: dict[tuple[int, ...], list[tuple[int, Any]]] = defaultdict(list)
    unit = "set" if todo and isinstance(todo[0], tuple) else "img"
    bar = tqdm(total=len(todo), desc=f"precompute {store.feature}", unit=unit, file=sys.stderr,
               disable=not show, dynamic_ncols=True)
    state = {"batch": batch_size}

    def flush(key: tuple[int, ...]) -> None:
        items = buckets.pop(key)
        batch = [x for _, x in items] if items_mode else torch.stack([img for _, img in items])
        _encode_batch(enc, dev, [todo[i] for i, _ in items], batch, writer, counts, state)
        bar.update(len(items))
        bar.set_postfix(written=counts.written, failed=counts.failed, refresh=False)

    try:
        t_wait = time.perf_counter()
        for index, image, error, stamp in loader:
            counts.stage_seconds["decode_wait"] += time.perf_counter() - t_wait
            if image is None:
                writer.fail(todo[index], error or "cannot decode")
                bar.update(1)
            else:
                key = () if items_mode else tuple(image.shape)
                buckets[key].append((index, image))
                writer.expected[todo[index]] = stamp
                if len(buckets[key]) >= state["batch"]:
                    flush(key)
            t_wait = time.perf_counter()
        for key in list(buckets):
            flush(key)
    finally:
        bar.close()
        writer.close()
        torch.set_num_threads(threads_before)


def _encode_batch(enc: Encoder, dev: torch.device, rels: list[Any], images: torch.Tensor | list[Any],
                  writer: _Writer, counts: _Counts, state: dict[str, int]) -> None:
    """Encodes one batch (uint8 images, or a list of items for ``encode_items``); on
    out-of-memory halves it (and later batches) and retries."""
    t0 = time.perf_counter()
    try:
        outputs = encode_batch(enc, dev, images)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if len(rels) == 1:
            writer.fail(rels[0], f"out of memory even alone: {str(exc).splitlines()[0]}")
            return
        half = len(rels) // 2
        state["batch"] = max(1, min(state["batch"], half))
        print(f"featstore precompute: out of memory at batch {len(rels)}; retrying with {half}", file=sys.stderr)
        _encode_batch(enc, dev, rels[:half], images[:half], writer, counts, state)
        _encode_batch(enc, dev, rels[half:], images[half:], writer, counts, state)
        return
    counts.stage_seconds["encode"] += time.perf_counter() - t0
    writer.submit(rels, outputs)


def _finish_manifest(store: FeatureStore, enc: Encoder, all_paths: list[str], rank: tuple[int, int],
                     shard: tuple[int, int] | None, summary: dict[str, Any]) -> str | None:
    """Compacts the journals into the manifest: rank 0 under torchrun; with shards, the last shard
    to finish (a later run or `featstore status` merges what an earlier one left)."""
    if rank[0] != 0:
        return None
    if shard is not None:
        others = [os.path.join(lock_dir(store), f"precompute.shard{i}-of-{shard[1]}.lock") for i in range(shard[1])
                  if i != shard[0]]
        if any(lock_is_held(p) for p in others):
            return None  # a shard still running merges when it finishes
    fields = store.manifest_fields(total_images=len(all_paths))
    fields.update({"encoder": describe(enc), "frames_per_set": summary["frames_per_set"]})
    weights = summary["encoder"].get("model_path")
    if weights:
        fields["vggt_model_path" if summary["encoder"].get("name") == "vggt" else "weights_path"] = weights
    if summary.get("model_path"):
        fields["model_path"] = summary["model_path"]
    _core.merge_journals(store.manifest_path, json.dumps(fields))
    return store.manifest_path
