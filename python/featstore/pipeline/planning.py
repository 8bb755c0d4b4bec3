"""Planning a precompute run: the settings, the encoder and store, the work items and their states.

Planning loads no weights (an encoder's fingerprint is computed without them), so ``--dry-run``
and every bad argument answer in about a second. Only items whose entry is missing or not valid
(all of them with ``overwrite``) are planned, restricted to a range, a shard and the torchrun rank.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from featstore import _core, env
from featstore.bulk import collector_paused
from featstore.encoders import Capabilities, Encoder, capabilities, describe, resolve_encoder
from featstore.env import parse_shard
from featstore.errors import CheckpointError, FeatstoreError
from featstore.history import history_states
from featstore.inputs import AbsentInput, FileInput, JsonlLine
from featstore.packs import DEFAULT_TARGET_SIZE
from featstore.pipeline.items import Kind, WorkItem, kind_for, work_items
from featstore.pipeline.refresh import refreshable
from featstore.pipeline.selection import check_range, distributed_rank, select
from featstore.scan import ScanResult, nothing_found, scan
from featstore.sets import set_entry_path, set_state
from featstore.store import FeatureStore
from featstore.vocabulary import TODO_STATES, check_error


@dataclass(frozen=True)
class Plan:
    """What a precompute run will do, decided before any weights load.

    Attributes
    ----------
    store, encoder, caps
        Where entries go, what computes them and which optional methods it has.
    description : dict
        :func:`featstore.encoders.describe` of the encoder when planned (summary, manifest).
    device : str
        Where the encoder runs.
    batch_size : int
        Items per batch to start with (halved on out-of-memory).
    rank, shard
        The torchrun ``(rank, world)`` and the ``(I, N)`` of ``--shard`` (or None).
    progress : bool
        Whether bars are shown on stderr.
    log_every : float
        Seconds between progress lines on stderr when it is not a terminal (0: none).
    unchecked : str or None
        Why the encoder has no fingerprint (a dry run without weights); None when it has one.
    estimate_from : str or None
        Where ``estimated_bytes`` came from: ``entries`` (the mean size of entries already
        written), ``encoder`` (its upper bound), None (no estimate).
    found : ScanResult
        Every source of the scan.
    items, states : list
        The work items this process selected, and the state of each one's entry (of a history,
        ``valid`` when every prefix entry is, else the first other state of its prefixes).
    todo : list of WorkItem
        The items to compute, in order (a history reduced to the prefixes needing work).
    refresh : list of WorkItem
        Stale items that only a shared input (a ``.jsonl`` edited on another line) made stale:
        rewritten with the same tensors, not computed (:mod:`.refresh`).
    pack_size : int or None
        ``layout="packed"``: per-image entries are written into packs of this size.
    plan_seconds : float
        Seconds spent judging states.
    target_dir : str
        Where entries are written (the cache directory, else the data root).
    free_bytes : int
        Free space there.
    estimated_bytes : int or None
        Bytes the planned entries need, when an estimate exists.
    model_path : str or None
        The model the features are for, recorded in the summary and the manifest.
    jsonl : str or None
        The ``.jsonl`` field sources came from (the manifest records it: frame sets are grouped
        from its lists).
    total_items : int
        Work items of the whole scan, before any range, shard or rank selection.
    entry_states : list of tuple of str
        The state of every entry each selected item writes (one for an image or a set, one per
        prefix of a history); empty when it equals ``states``.
    """

    store: FeatureStore
    encoder: Encoder
    caps: Capabilities
    description: dict[str, Any]
    device: str
    batch_size: int
    rank: tuple[int, int]
    shard: tuple[int, int] | None
    progress: bool
    found: ScanResult
    items: list[WorkItem]
    states: list[str]
    todo: list[WorkItem]
    plan_seconds: float
    target_dir: str
    free_bytes: int
    estimated_bytes: int | None
    model_path: str | None
    jsonl: str | None = None
    total_items: int = 0
    entry_states: list[tuple[str, ...]] = field(default_factory=list)
    log_every: float = 0.0
    unchecked: str | None = None
    estimate_from: str | None = None
    refresh: list[WorkItem] = field(default_factory=list)
    pack_size: int | None = None

    def states_of_entries(self) -> list[str]:
        """The state of every entry of the selected items, in order (samples in history mode)."""
        return [s for states in self.entry_states for s in states] if self.entry_states else list(self.states)

    def skipped_valid(self) -> list[WorkItem]:
        """The selected items left alone because their entry is valid."""
        planned = set(self.todo)
        return [item for item, s in zip(self.items, self.states, strict=True) if s == "valid" and item not in planned]

    def release_work(self) -> None:
        """Empties the work lists (items, states, todo, refresh) once the run is done with them:
        their few hundred bytes per source then go to the merge that follows instead of adding to
        the run's peak. The summary is taken before the run."""
        for work in (self.items, self.states, self.todo, self.refresh, self.entry_states):
            work.clear()

    def check_space(self, force: bool) -> None:
        """Raises :class:`FeatstoreError` when the estimate exceeds the free space, unless ``force``."""
        estimate, free = self.estimated_bytes, self.free_bytes
        if estimate is not None and estimate > free and not force:
            raise FeatstoreError(f"not enough space in {self.target_dir}: the plan needs about {estimate / 1e9:.2f} "
                                 f"GB, {free / 1e9:.2f} GB are free. Free space, use --cache-dir elsewhere, or --force")


def make_plan(data_root: str | os.PathLike[str], *, encoder: Any, feature: str | None, layout: str,
              cache_dir: str | os.PathLike[str] | None, device: str | None, batch_size: int | None,
              skip_existing: bool | None, overwrite: bool, start_idx: int | None, end_idx: int | None,
              shard: str | tuple[int, int] | None, files_from: str | os.PathLike[str] | None,
              extensions: Sequence[str] | None, jsonl: str | None, progress: bool | None,
              encoder_options: dict[str, Any] | None, model_path: str | None, log_every: float | None = None,
              dry_run: bool = False, pack_size: int | None = None) -> Plan:
    """The plan of :func:`featstore.pipeline.precompute` (see it for the parameters)."""
    if layout == "packed":  # packs live in the state directory of the root, or of the cache directory
        layout, pack_size = ("dir" if cache_dir is not None else "sidecar"), pack_size or DEFAULT_TARGET_SIZE
    elif pack_size is not None:
        raise ValueError(f"pack_size (--pack-size) applies to layout='packed' (--layout packed), not {layout!r}")
    shard_spec = parse_shard(shard)  # a bad spec fails before anything loads
    check_range(start_idx, end_idx)
    given_by = "$DEVICE" if env.device() else "the default: cuda:$LOCAL_RANK"
    device = check_device(device) if device else check_device(default_device(), given_by=given_by)
    batch_size = env.batch_size(16) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    skip_existing = env.skip_existing() if skip_existing is None else skip_existing
    enc = _open_encoder(encoder, device, encoder_options, dry_run=dry_run)
    fingerprint: str | None = None
    unchecked = None
    try:
        fingerprint = enc.fingerprint()
    except CheckpointError as exc:
        if not dry_run:
            raise
        # A dry run loads nothing, so it needs no weights: entries are judged against the
        # manifest's fingerprint (or any), and the summary says the weights were not checked.
        unchecked = str(exc)
    store = FeatureStore(data_root, feature or enc.name, layout=layout, cache_dir=cache_dir, fingerprint=fingerprint)
    rank = distributed_rank()
    show = sys.stderr.isatty() if progress is None else progress
    log_seconds = env.log_every(30.0) if log_every is None else log_every
    if log_seconds < 0:
        raise ValueError(f"log_every must be 0 (no progress lines) or more seconds, got {log_seconds}")

    # A few objects per source and no cycles: see featstore.bulk.
    with collector_paused():
        found = scan(store.data_root, extensions=extensions, jsonl=jsonl, files_from=files_from,
                     skip_dirs=[store.cache_dir] if store.cache_dir else (), progress=show)
        found = found.without_entries_of(store.feature)
        if len(found) == 0:
            raise nothing_found(found, extensions=extensions, jsonl=jsonl, files_from=files_from)
        caps = capabilities(enc)
        if caps.history and not found.sets:
            raise FeatstoreError(f"history mode reads each sample's history from a .jsonl list, and none was found "
                                 f"under {store.data_root}: pass jsonl=FIELD (--jsonl FIELD), the field of each line "
                                 "that lists the sample's frames, oldest first")
        every = work_items(found.paths, found.sets, caps)
        mine = select(every, start_idx=start_idx, end_idx=end_idx, shard=shard_spec, rank=rank)
        total_items = len(every)
        del every  # a selection's items are all the run keeps
        t_plan = time.perf_counter()
        redo = overwrite or not skip_existing
        if caps.history:  # an item writes an entry per prefix: each has its own state
            per_entry = entry_states(store, mine)
            states = [_item_state(s) for s in per_entry]
            todo = [narrowed for item, entries in zip(mine, per_entry, strict=True)
                    if (narrowed := item.needing([redo or _needs_work(s) for s in entries])) is not None]
        else:  # one entry per item: its state is the item's (no tuple per item: a million of them)
            per_entry = []
            states = item_states(store, mine)
            if caps.inputs:
                states = _inputs_now(store, enc, mine, states)
            todo = [item for item, s in zip(mine, states, strict=True) if redo or _needs_work(s)]
        refresh = refreshable(store, enc, mine, states) if caps.inputs and not redo else []
        if refresh:
            refreshed = set(refresh)
            todo = [item for item in todo if item not in refreshed]
        plan_seconds = time.perf_counter() - t_plan
        # The checks freed their temporary buffers, but the heap keeps the pages: give them back, or
        # the whole run carries them (about 100 bytes per source).
        _core.release_freed_memory()

        target_dir = store.cache_dir or store.data_root
        entry_bytes, estimate_from = _ESTIMATES[kind_for(caps)](store, enc, caps, mine, states)
        planned_entries = sum(item.entries for item in todo)
        return Plan(store=store, encoder=enc, caps=caps, description=describe(enc), device=device,
                    batch_size=batch_size, rank=rank, shard=shard_spec, progress=show, found=found, items=mine,
                    states=states, todo=todo, plan_seconds=plan_seconds, target_dir=target_dir,
                    free_bytes=_free_bytes(target_dir),
                    estimated_bytes=entry_bytes * planned_entries if entry_bytes is not None else None,
                    model_path=model_path, jsonl=jsonl, total_items=total_items,
                    entry_states=per_entry,
                    log_every=log_seconds if progress is None and not show else 0.0, unchecked=unchecked,
                    estimate_from=estimate_from, refresh=refresh, pack_size=pack_size)


def _open_encoder(spec: Any, device: str, options: dict[str, Any] | None, *, dry_run: bool) -> Encoder:
    if spec == "vggt":
        # The default stored dtype depends on the device (bf16 on GPUs that support it); a dry
        # run loads nothing, so it needs no weights.
        return resolve_encoder(spec, **{"device": device, **(options or {}),
                                        **({"require_weights": False} if dry_run else {})})
    return resolve_encoder(spec)


def _needs_work(state: str) -> bool:
    """Whether an entry in ``state`` is (re)computed without ``overwrite``: not valid, or its check failed."""
    return state in TODO_STATES or check_error(state) is not None


def default_device() -> str:
    """``$DEVICE``, else this rank's GPU when available (``cuda:$LOCAL_RANK`` under torchrun, so
    eight ranks on a node use eight GPUs, not all ``cuda:0``), else ``cpu``."""
    chosen = env.device()
    if chosen:
        return chosen
    if not torch.cuda.is_available():
        return "cpu"
    local = env.local_rank()
    return f"cuda:{local}" if local is not None else "cuda:0"


def check_device(device: str, *, given_by: str = "--device") -> str:
    """``device`` when torch can use it here; else ValueError naming it, where it came from
    (``given_by``) and the devices there are. Checked before scanning, decoding or loading weights."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device {device!r} ({given_by}) is not a torch device ({exc}); pass cpu, cuda or "
                         "cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device} ({given_by}) is not available: torch finds no CUDA GPU here; "
                             "pass --device cpu (or unset $DEVICE), or run on a machine with a GPU")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device} ({given_by}) is not available: this machine has {count} CUDA "
                             f"GPU(s), cuda:0 to cuda:{count - 1}; pass one of those")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} ({given_by}) is not available here; pass --device cpu")
    return device


def entry_states(store: FeatureStore, items: Sequence[WorkItem]) -> list[tuple[str, ...]]:
    """The state of every entry each item writes, in order (one per prefix length of a history);
    each kind's items are judged together (sources in parallel, in Rust)."""
    by_kind: dict[Kind, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_kind[item.kind].append(i)
    states: list[tuple[str, ...]] = [()] * len(items)
    for kind, indices in by_kind.items():
        judged = _STATES[kind](store, [items[i] for i in indices])
        for i, state in zip(indices, judged, strict=True):
            states[i] = state
    return states


def item_states(store: FeatureStore, items: Sequence[WorkItem]) -> list[str]:
    """The state of each item that writes one entry (an image, a frame set), in order; each
    kind's items are judged together."""
    by_kind: dict[Kind, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_kind[item.kind].append(i)
    if set(by_kind) == {"image"}:  # the common case, without an index list per item
        return store.states([item.paths[0] for item in items])
    states = [""] * len(items)
    for kind, indices in by_kind.items():
        for i, (state,) in zip(indices, _STATES[kind](store, [items[i] for i in indices]), strict=True):
            states[i] = state
    return states


def _item_state(entries: Sequence[str]) -> str:
    """An item's state from its entries': ``valid`` when all are, else the first other one."""
    return next((s for s in entries if s != "valid"), "valid")


def _image_states(store: FeatureStore, items: Sequence[WorkItem]) -> list[tuple[str, ...]]:
    return [(s,) for s in store.states([item.paths[0] for item in items])]


def _set_states(store: FeatureStore, items: Sequence[WorkItem]) -> list[tuple[str, ...]]:
    return [(set_state(store, list(item.paths)),) for item in items]


def _history_states(store: FeatureStore, items: Sequence[WorkItem]) -> list[tuple[str, ...]]:
    return [tuple(history_states(store, item.paths, item.lengths)) for item in items]


def _inputs_now(store: FeatureStore, enc: Encoder, items: Sequence[WorkItem], states: list[str]) -> list[str]:
    """``states`` with ``stale`` for each valid entry whose inputs differ from what the encoder
    would read now: another set of inputs (the caption rule now picks another file, captions
    moved from ``.txt`` files to a ``.jsonl``), a text input (a caption given as text) with
    another digest, or a file input taken from another path (a ``.jsonl`` line now naming another
    control image). Lookups compare recorded files themselves; texts and paths only the planner can."""
    out = list(states)
    compared: list[int] = []
    asked: list[tuple[str, list[tuple[str, tuple[Any, ...]]]]] = []
    # Sources are relative and normal and the root absolute: joined by hand (os.path.join
    # costs more than the rest of a source's turn here, times a million).
    prefix = store.data_root.rstrip("/") + "/"
    inputs = enc.inputs  # type: ignore[attr-defined]
    for i, (item, state) in enumerate(zip(items, states, strict=True)):
        if state != "valid" or item.kind != "image":
            continue
        rel = item.paths[0]
        try:
            now = inputs(rel, prefix + rel)
            asked.append((rel, [(name, _as_now(value)) for name, value in now.items()]))
            compared.append(i)
        except Exception:  # unreadable now: let the run find out and record why
            out[i] = "stale"
    # Another set of inputs, a text with another digest, or a file (or a .jsonl line) the encoder
    # would now take from elsewhere (a line naming another control image): the recorded file may
    # be unchanged, but it is not the input any more. One parallel pass, over the index's copy of
    # each entry's inputs (or its header).
    for i, changed in zip(compared, store._core.inputs_differ_many(asked), strict=True):
        if changed:
            out[i] = "stale"
    return out


def _as_now(value: Any) -> tuple[Any, ...]:
    """An input the encoder would read now, as the core compares it with what an entry recorded."""
    if isinstance(value, bytes):
        return ("text", value)
    if isinstance(value, AbsentInput):
        return ("absent",)
    if isinstance(value, JsonlLine):
        return ("jsonl", os.fspath(value.path), value.listed)
    return ("file", os.fspath(value.path if isinstance(value, FileInput) else value))


def _free_bytes(target_dir: str) -> int:
    probe = target_dir
    while not os.path.exists(probe):  # a cache directory is created on the first write
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


#: Bytes of one entry and where the number came from (``entries`` or ``encoder``).
Estimate = tuple[int | None, str | None]


def _mean_size(paths: Sequence[str]) -> int | None:
    """The mean size in bytes of the files among ``paths`` that exist (None: none does)."""
    sizes = []
    for path in paths:
        with contextlib.suppress(OSError):
            sizes.append(os.path.getsize(path))
    return int(sum(sizes) / len(sizes)) if sizes else None


def _encoder_bytes(enc: Encoder, caps: Capabilities, frames: int = 1) -> Estimate:
    """The encoder's upper bound of one entry of ``frames`` frames, if it has one."""
    if not caps.estimate_entry_bytes:
        return None, None
    return int(enc.estimate_entry_bytes()) * frames, "encoder"  # type: ignore[attr-defined]


def _image_entry_bytes(store: FeatureStore, enc: Encoder, caps: Capabilities, items: Sequence[WorkItem],
                       states: Sequence[str]) -> Estimate:
    """The mean size of up to 16 valid entries, else the encoder's estimate."""
    valid = [item.paths[0] for item, s in zip(items, states, strict=True) if s == "valid"][:16]
    mean = _mean_size([store.entry_path(rel) for rel in valid])
    return (mean, "entries") if mean is not None else _encoder_bytes(enc, caps)


def _set_entry_bytes(store: FeatureStore, enc: Encoder, caps: Capabilities, items: Sequence[WorkItem],
                     states: Sequence[str]) -> Estimate:
    """The mean size of up to 16 valid set entries, else the encoder's estimate of one frame's
    entry times the frames of a set."""
    valid = [item.paths for item, s in zip(items, states, strict=True) if s == "valid"][:16]
    mean = _mean_size([set_entry_path(store, list(paths)) for paths in valid])
    return (mean, "entries") if mean is not None else _encoder_bytes(enc, caps, caps.frames_per_set)


def _history_entry_bytes(store: FeatureStore, enc: Encoder, caps: Capabilities, items: Sequence[WorkItem],
                         states: Sequence[str]) -> Estimate:
    """The encoder's estimate of one frame's entry: a history entry holds its last frame's."""
    return _encoder_bytes(enc, caps)


_StatesOf = Callable[[FeatureStore, Sequence[WorkItem]], list[tuple[str, ...]]]
_EntryBytes = Callable[[FeatureStore, Encoder, Capabilities, Sequence[WorkItem], Sequence[str]], Estimate]

# How each kind's entries are judged, and how big one is (see items.py).
_STATES: dict[Kind, _StatesOf] = {"image": _image_states, "set": _set_states, "history": _history_states}
_ESTIMATES: dict[Kind, _EntryBytes] = {"image": _image_entry_bytes, "set": _set_entry_bytes,
                                       "history": _history_entry_bytes}
