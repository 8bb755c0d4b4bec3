"""`FeatureStore`: one feature's entries under one data root.

The Rust core decides where entries live and whether they may be served (``_core.Store``); this
module adds what needs Python: path handling, torch tensors, legacy pickles, warnings, counters.
torch is imported on first use, so opening a store (and ``import featstore``) stays fast.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featstore import _core, batches, explain, history, history_writes, lazy_torch, manifest, removal, sets, writes
from featstore.compat import load_legacy_sidecar
from featstore.errors import (
    CorruptEntryError,
    DataRootError,
)
from featstore.inputs import InputValue, Stamp
from featstore.progress import run_with_progress
from featstore.roots import SourceNames
from featstore.status import Status, count_states, sidecar_entry_files
from featstore.vocabulary import (
    LAYOUTS,
    LEGACY_SIDECAR_SUFFIX,
    MISS_ADVICE,
    STATES,
    UNREADABLE,
    check_feature_name,
)

if TYPE_CHECKING:
    import torch

class FeatureStore:
    """Cached features of one encoder output (``feature``) for the sources under a data root.

    Parameters
    ----------
    data_root : path
        The dataset directory. Sources are named by their path relative to it.
    feature : str
        The feature's name (``"vggt"``, ``"pixel_latent"``, ...): part of entry file names.
    layout : {"sidecar", "dir"}
        ``sidecar`` stores ``<source>.<feature>.safetensors`` beside each source; ``dir`` stores
        entries under ``cache_dir`` named by key, for read-only datasets. Giving ``cache_dir``
        implies ``dir``.
    cache_dir : path, optional
        The cache directory of the ``dir`` layout.
    fingerprint : str, optional
        The encoder fingerprint entries must carry. None means the one recorded in the feature's
        manifest (training never needs to load the encoder); when there is no manifest, only
        entries written without a fingerprint (``put`` on such a store) are served, and an
        encoder's entries are ``foreign`` until its fingerprint is given.
    read_mode : {"auto", "map", "pread"}
        ``map`` maps entries (zero-copy; those of at most 16 KiB are read, which costs less);
        ``pread`` reads them into memory; ``auto`` maps except on network file systems, where a
        file replaced by another node could fault a mapping.
    allow_legacy : bool
        Serve old ``<image>.vggt_cache.pt`` sidecars (read with ``weights_only=True``) when no
        entry exists.

    Notes
    -----
    The check behind :meth:`contains` and :meth:`get` costs two ``stat`` calls (source and entry)
    once an entry has been seen; the first look at an entry reads its header. On network file
    systems attribute caches can hide another node's edit for up to a minute (``actimeo``).
    """

    def __init__(self, data_root: str | os.PathLike[str], feature: str, *, layout: str = "sidecar",
                 cache_dir: str | os.PathLike[str] | None = None, fingerprint: str | None = None,
                 read_mode: str = "auto", allow_legacy: bool = True) -> None:
        self._args: dict[str, Any] = dict(data_root=data_root, feature=feature, layout=layout, cache_dir=cache_dir,
                          fingerprint=fingerprint, read_mode=read_mode, allow_legacy=allow_legacy)
        root = os.path.abspath(os.fspath(data_root))
        if not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "does not exist"
            raise DataRootError(f"data root {root} {what}; pass the dataset's top directory")
        check_feature_name(feature)
        if cache_dir is not None:
            layout = "dir"
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        if layout == "dir" and cache_dir is None:
            raise ValueError("layout 'dir' needs cache_dir (where the entries go)")
        if read_mode not in ("auto", "map", "pread"):
            raise ValueError(f"read_mode {read_mode!r} is not one of 'auto', 'map', 'pread'")
        self.data_root = root
        self.feature = feature
        self.layout = layout
        self.cache_dir = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else None
        entries_at = self.cache_dir if self.cache_dir else root
        if read_mode == "auto":
            read_mode = "pread" if _core.is_network_fs(entries_at) else "map"
        self.read_mode = read_mode
        self.allow_legacy = allow_legacy
        self._core = _core.Store(root, feature, cache_dir=self.cache_dir, fingerprint=fingerprint,
                                 legacy_suffix=LEGACY_SIDECAR_SUFFIX if feature == "vggt" else None,
                                 pread=read_mode == "pread")
        if fingerprint is None and self._core.fingerprint is None:
            manifest.check_fingerprint_field(self.manifest_path)  # a number or a list must not mean "any"
        self._root = SourceNames(root)
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, UNREADABLE: 0,
                                      **{s: 0 for s in STATES if s != "valid"}}
        self._warned: set[str] = set()
        self._fingerprint_recorded = False

    # Pickling reopens the store from its arguments (DataLoader workers under spawn).
    def __getstate__(self) -> dict[str, Any]:
        return dict(self._args)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        where = f", cache_dir={self.cache_dir!r}" if self.cache_dir else ""
        return f"FeatureStore({self.data_root!r}, {self.feature!r}, layout={self.layout!r}{where})"

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint entries are checked against (None: neither given nor recorded in a
        manifest, so only entries written without one are served)."""
        return self._core.fingerprint

    def foreign_reason(self, fingerprint: str) -> str | None:
        """Why an entry written with ``fingerprint`` is foreign to this store, or None when it
        may be served. Without a fingerprint (none given, no manifest) only entries written
        without one may: never whichever encoder's entry happens to be read first."""
        return self._core.foreign_reason(fingerprint)

    @property
    def requested_fingerprint(self) -> str | None:
        """The fingerprint this store was opened with (None: the manifest's, if any)."""
        return self._args["fingerprint"]  # type: ignore[no-any-return]

    @property
    def state_dir(self) -> str:
        """featstore's own directory for this feature (``<root or cache_dir>/.featstore/<feature>``):
        locks, frame sets, quarantine."""
        return os.fspath(self._core.state_dir)

    @property
    def manifest_path(self) -> str:
        """The feature's manifest (``<root>/<feature>_cache_manifest.json`` in the sidecar layout)."""
        return os.fspath(self._core.manifest_path)

    @property
    def index_dir(self) -> str:
        """The directory of the index's segments (``<state_dir>/index``)."""
        return os.fspath(self._core.index_dir)

    def rel(self, path: str | os.PathLike[str]) -> str:
        """The path of a source relative to the data root (absolute paths must lie inside it,
        also when reached through a symlink to the root)."""
        return self._root.rel(path)

    def rels(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """:meth:`rel` of many paths (those already relative and normal, as a scan gives them,
        pass through in one cheap pass)."""
        return self._root.rels(paths)

    def entry_path(self, path: str | os.PathLike[str]) -> str:
        """Where the entry of ``path`` is (or would be written) for the source as it is now."""
        rel = self.rel(path)
        st = os.stat(os.path.join(self.data_root, rel))
        return os.fspath(self._core.entry_path(rel, st.st_size, st.st_mtime_ns))

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """True when a valid entry exists for ``path`` (two ``stat`` calls once seen)."""
        return self._core.state(self.rel(path)) == "valid"

    def state(self, path: str | os.PathLike[str]) -> str:
        """The entry state of ``path``: one of :data:`STATES`."""
        return self._core.state(self.rel(path))

    def states(self, paths: Iterable[str | os.PathLike[str]], *, threads: int | None = None,
               progress: bool | None = False, stamps: np.ndarray | None = None) -> list[str]:
        """:meth:`state` of many sources, checked in parallel in Rust (``"error: ..."`` where a
        check failed); ``progress`` shows a bar on stderr when it takes a while. ``stamps``: the
        sources' stamps as a scan just took them (:attr:`ScanResult.stamps`, aligned with
        ``paths``), used instead of a second ``stat`` of each."""
        rels = self._root.rels(paths)
        packed = None if stamps is None else np.ascontiguousarray(stamps, dtype="<u8").tobytes()
        return run_with_progress(lambda p: self._core.check_many(rels, threads, p, packed), desc="checking entries",
                                 total=len(rels), show=progress, unit="sources")

    def check(self, path: str | os.PathLike[str], *, deep: bool = False) -> _core.Check:
        """The full check of ``path``: its ``state``, the ``entry`` file ('' when there is none to
        name), the ``reason``, and the ``identity`` (stamp) of the entry file judged, which
        destructive commands pass back so that they act on that very file. Off the hot path: it
        finds legacy sidecars and says why. ``deep`` digests the source and its inputs whatever
        their stamps (``verify``)."""
        return self._core.check(self.rel(path), deep)

    def check_many(self, paths: Iterable[str | os.PathLike[str]], *, threads: int | None = None,
                   progress: bool | None = False, desc: str = "checking entries",
                   deep: bool = False) -> list[_core.Check]:
        """:meth:`check` of many sources in parallel in Rust; a failed check's state is
        ``"error: ..."`` (:func:`featstore.vocabulary.check_error` tells it)."""
        rels = self.rels(paths)
        return run_with_progress(lambda p: self._core.check_many_full(rels, threads, p, deep), desc=desc,
                                 total=len(rels), show=progress, unit="sources")

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Forgets what this process and the manifest index vouch for about ``path``: the next check
        reads its entry's header again."""
        self._core.forget(self.rel(path))

    def explain(self, path: str | os.PathLike[str]) -> str:
        """A few lines saying why a lookup of ``path`` hits or misses: the state, the entry, and
        what differs (stamps and digests of a changed input, both fingerprints, the parse error).
        :func:`featstore.explain.explain` returns the same as data."""
        return explain.explain(self, path).text()

    def _miss(self, rel: str, state: str, entry: str, reason: str) -> None:
        """Counts a miss, and warns once per kind of miss a user can act on."""
        self.stats["misses"] += 1
        if state in self.stats:
            self.stats[state] += 1
        if state in MISS_ADVICE and state not in self._warned:
            self._warned.add(state)
            warnings.warn(f"featstore: {state} entry for {rel} ({os.fspath(entry)}): {reason}; "
                          f"{MISS_ADVICE[state]}. Further {state} entries are counted in "
                          f"FeatureStore.stats without warning.", stacklevel=3)

    def get(self, path: str | os.PathLike[str], *, device: Any = None,
            dtype: Any = None) -> dict[str, torch.Tensor] | None:
        """The cached tensors of ``path``, or None when there is no valid entry.

        Tensors view the entry's private copy-on-write mapping: no copy is made, and in-place
        changes never reach the file (an entry of at most 16 KiB is read into memory instead:
        copying it costs less than mapping it). ``device``/``dtype`` move or cast on request (floating
        tensors only for ``dtype``). A stale, foreign or corrupt entry is a counted miss
        (``stats``) with one warning per kind, never an exception.
        """
        rel = self.rel(path)
        try:
            capsules = self._core.read(rel)
        except (CorruptEntryError, PermissionError) as exc:
            self._miss(rel, "corrupt" if isinstance(exc, CorruptEntryError) else UNREADABLE, "", str(exc))
            return None
        if capsules is None:
            # Off the hot path: one full check says why, and finds a legacy sidecar.
            c = self._core.check(rel)
            if c.state == "legacy" and self.allow_legacy:
                self.stats["hits"] += 1
                return load_legacy_sidecar(os.fspath(c.entry))
            self._miss(rel, c.state, os.fspath(c.entry), c.reason)
            return None
        self.stats["hits"] += 1
        if device is None and dtype is None:
            # The hot path: no helper calls between the core and torch.
            from_dlpack = lazy_torch.from_dlpack()
            return {name: from_dlpack(cap) for name, cap in capsules}
        return lazy_torch.helpers().from_capsules(capsules, device, dtype)

    def get_many(self, paths: Iterable[str | os.PathLike[str]], *, device: Any = None,
                 dtype: Any = None) -> list[dict[str, torch.Tensor] | None]:
        """:meth:`get` for each path, in order."""
        return [self.get(p, device=device, dtype=dtype) for p in paths]

    def put(self, path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *,
            inputs: Mapping[str, InputValue] | None = None,
            metadata: Mapping[str, str] | None = None, durable: bool = False) -> str:
        """Writes the entry of ``path`` atomically and returns its file path.

        Parameters
        ----------
        tensors : dict of str to Tensor
            Any device and layout; stored contiguous on CPU.
        inputs : dict, optional
            Inputs besides the source: a path (str or PathLike, relative to the root or
            absolute) for files such as a caption ``.txt`` or a control image, recorded by stamp
            and digest and checked on every lookup (a :class:`FileInput` also carries the stamp
            taken when the encoder read it); an :class:`AbsentInput` for a file that must not
            appear; ``bytes`` for a text (a caption from a ``.jsonl``), recorded by digest.
        metadata : dict of str to str, optional
            Extra header metadata; featstore's own keys take precedence.
        durable : bool
            fsync the entry and its directory before returning.

        Raises
        ------
        FileNotFoundError
            The source does not exist.
        ReadOnlyDataRootError
            Sidecar layout on a read-only data root: use a cache directory (``cache_dir=``,
            ``--cache-dir``).

        Notes
        -----
        On a store opened with a fingerprint, the first ``put`` of a feature without a manifest
        writes one recording it (see :func:`featstore.manifest.ensure_manifest`), so a store
        opened later without a fingerprint serves these entries, and no other encoder's.
        """
        written = self.write(path, tensors, inputs=inputs, metadata=metadata, durable=durable)
        self._record_fingerprint()
        return os.fspath(written["path"])

    def _record_fingerprint(self, **mode: Any) -> None:
        """After a write outside precompute: the manifest records the fingerprint (and ``mode``:
        how entries are grouped), once."""
        if not self._fingerprint_recorded:
            self._fingerprint_recorded = True
            manifest.ensure_manifest(self, **mode)

    def write(self, path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *,
             inputs: Mapping[str, InputValue] | None = None,
             metadata: Mapping[str, str] | None = None, durable: bool = False,
             expected: Stamp | None = None) -> dict[str, Any]:
        """:meth:`put`, returning what was written (what a journal line records): ``path``, the
        ``source`` and ``entry`` stamps as ``(size, mtime_ns, ino, ctime_ns)``, ``racy``,
        ``check_first``, ``inputs`` (the extra inputs' record, for the index; None: none) and
        ``bytes``. With ``expected`` (the source's stamp when the encoder read it), a source
        changed since raises :class:`FeatstoreError` and nothing is written."""
        return writes.write_one(self, path, tensors, inputs=inputs, metadata=metadata, durable=durable,
                                expected=expected)

    def write_many(self, items: Sequence[tuple[str, Mapping[str, torch.Tensor], Mapping[str, InputValue] | None,
                                               Stamp | None]], *, durable: bool = False,
                   threads: int | None = None, stream: _core.PackStream | None = None) -> list[writes.Result]:
        """:meth:`write` of a batch ``(path, tensors, inputs, expected)`` in parallel, fsynced together
        when ``durable``: one result (or exception) per item (:func:`featstore.writes.write_many`;
        ``stream``: appended to precompute's pack stream instead)."""
        return writes.write_many(self, items, durable=durable, threads=threads, stream=stream)

    def write_rows(self, paths: Sequence[str | os.PathLike[str]], outputs: Mapping[str, torch.Tensor], *,
                   inputs: Sequence[Mapping[str, InputValue] | None] | None = None,
                   expected: Sequence[Stamp | None] | None = None, durable: bool = False,
                   threads: int | None = None, stream: _core.PackStream | None = None) -> list[writes.Result]:
        """:meth:`write_many` where the entry of ``paths[i]`` holds row ``i`` of each output, read in
        place (:func:`featstore.writes.write_rows`)."""
        return writes.write_rows(self, paths, outputs, inputs=inputs, expected=expected, durable=durable,
                                 threads=threads, stream=stream)

    def read_batch(self, paths: Sequence[str | os.PathLike[str]], name: str, out: torch.Tensor | None = None, *,
                   pin_memory: bool = False, threads: int | None = None) -> torch.Tensor:
        """Reads tensor ``name`` of many entries into one ``[N, ...]`` tensor: one ``pread`` per
        entry straight into its slot, in parallel, without the GIL (no mapping, no per-sample
        tensors sent through worker processes).

        Parameters
        ----------
        paths : sequence of path
            The sources, in batch order.
        name : str
            The tensor to read (e.g. ``"features"``); all entries must hold it with one dtype and
            shape.
        out : Tensor, optional
            A contiguous CPU tensor of shape ``[len(paths), *shape]`` to fill (reuse one across
            steps, pinned for fast host-to-device copies). Default: a new one, shaped after the
            first valid entry.
        pin_memory : bool
            Allocate the new tensor in pinned memory.
        threads : int, optional
            Reader threads (default: one per core).

        Raises
        ------
        BatchReadError
            Some slots could not be filled; ``exc.failed`` names them and why, ``exc.out`` holds
            the others.
        TensorNameError
            A valid entry holds no tensor ``name`` (a ``KeyError`` too); the message names those
            it holds.
        StaleEntryError
            No source in the batch has a valid entry to take the shape from.
        """
        return batches.read_batch(self, self.rels(paths), name, out, pin_memory=pin_memory, threads=threads)

    def entry_layout(self, path: str | os.PathLike[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        """The dtype and shape of each tensor in the valid entry of ``path`` (from its header;
        nothing is mapped), or None when there is no valid entry."""
        return batches.entry_layout(self, path)

    def with_fingerprint(self, fingerprint: str) -> FeatureStore:
        """The same store checking (and writing) entries against ``fingerprint``."""
        args: dict[str, Any] = {**self._args, "fingerprint": fingerprint}
        return FeatureStore(**args)

    def put_set(self, paths: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor], *,
                metadata: Mapping[str, str] | None = None, durable: bool = False) -> str:
        """Writes the entry of an ordered set of frames encoded together (see
        :mod:`featstore.sets`); returns its path."""
        path = sets.put_set(self, paths, tensors, metadata=metadata, durable=durable)
        self._record_fingerprint(frames_per_set=len(paths))
        return path

    def get_set(self, paths: Sequence[str | os.PathLike[str]], *, device: Any = None,
                dtype: Any = None) -> dict[str, torch.Tensor] | None:
        """The tensors of a frame set's entry, zero-copy, or None unless it is valid for these
        members as they are now, in this order."""
        return sets.get_set(self, paths, device=device, dtype=dtype)

    def put_history(self, frames: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor], *,
                    expected: Sequence[Sequence[int]] | None = None, metadata: Mapping[str, str] | None = None,
                    durable: bool = False) -> str:
        """Writes the entry of a history: an ordered list of frames whose last frame's features
        (given every frame before it) ``tensors`` hold (see :mod:`featstore.history`); returns
        its path. ``expected``: the frames' stamps when they were read for encoding."""
        path = history_writes.put_history(self, frames, tensors, expected=expected, metadata=metadata, durable=durable)
        self._record_fingerprint(history=True)
        return path

    def put_histories(self, frames: Sequence[str | os.PathLike[str]], tensors: Mapping[int, Mapping[str, torch.Tensor]],
                      *, expected: Sequence[Sequence[int]] | None = None, durable: bool = False) -> list[str]:
        """Writes the entries of several prefixes of one list (``tensors`` by prefix length, what
        one causal pass gives), the frames stamped, digested and recorded once; returns their
        paths. A prefix holding a frame changed since ``expected`` raises SourceChangedError
        after the shorter ones are written."""
        written = history_writes.HistoryPass(self, frames, expected=expected, durable=durable)
        self._record_fingerprint(history=True)
        return [written.put(n, tensors[n]) for n in sorted(tensors)]

    def get_history(self, frames: Sequence[str | os.PathLike[str]], *, device: Any = None,
                    dtype: Any = None) -> dict[str, torch.Tensor] | None:
        """The tensors of a history's entry, zero-copy, or None unless it is valid for these
        frames as they are now, in this order."""
        return history.get_history(self, frames, device=device, dtype=dtype)

    def history_state(self, frames: Sequence[str | os.PathLike[str]]) -> str:
        """The state of a history's entry: one of :data:`STATES` (``missing`` also when a frame
        is gone)."""
        return history.history_state(self, frames)

    def remove(self, path: str | os.PathLike[str]) -> bool:
        """Removes the entry of ``path`` (never the source, never a legacy file), only while it is
        still the file this call judged (see :func:`featstore.removal.remove_entry`); True if a
        file was removed."""
        return removal.remove_entry(self, self.rel(path))

    def clear(self) -> int:
        """Removes every entry of this feature, its manifest, journals and state; returns the
        number of entry files removed. Sources are never touched."""
        removed = removal.remove_all(self)
        self.__init__(**self._args)  # type: ignore[misc]  # forget everything known in memory
        return removed

    def status(self, sources: Iterable[str] | None = None, *, threads: int | None = None,
               progress: bool | None = False, entries: Sequence[str] | None = None,
               stamps: np.ndarray | None = None) -> Status:
        """Counts entries per state. ``sources`` defaults to a scan of the root for images.

        Opens no entry that was seen before (in this process or in the manifest's index).
        Orphans are entries whose source is gone (among ``entries``, the sidecar entry files a
        caller's scan listed, else a walk finds them); ``stamps``, the sources' stamps that
        scan took (:attr:`ScanResult.stamps`), spare each source a second ``stat``. Counts
        per-image entries: :func:`featstore.ops.status` counts frame sets when the manifest
        records that mode.
        """
        return count_states(self, sources, threads=threads, progress=progress, entries=entries, stamps=stamps)

    def write_manifest(self, status: Status, sources: Iterable[str], fields: Mapping[str, Any] | None = None) -> str:
        """Writes the feature's manifest atomically and returns its path (see
        :func:`featstore.manifest.write_manifest`)."""
        return manifest.write_manifest(self, status, sources, fields)

    def manifest_fields(self, *, total_images: int) -> dict[str, Any]:
        """The manifest fields that describe this store (see :func:`featstore.manifest.store_fields`)."""
        return manifest.store_fields(self, total_images=total_images)

    def index_records(self, paths: Iterable[str | os.PathLike[str]], *, unindexed_only: bool = False
                      ) -> list[_core.IndexRecord]:
        """The index records (source, its stamp, the entry's stamp, ``check_first``) of the valid
        entries among ``paths``: what the manifest's index holds. ``unindexed_only`` keeps those the
        index does not know yet (entries a killed run wrote without a journal line)."""
        rels = self.rels(paths)
        return self._core.unindexed_records(rels) if unindexed_only else self._core.index_records(rels)

    def journal_paths(self) -> list[str]:
        """The per-rank journals beside the manifest (``<manifest>.rank<R>-of-<N>.jsonl``), sorted."""
        return manifest.journal_paths(self.manifest_path)

    def entry_files(self) -> list[str]:
        """Relative paths of this feature's sidecar entry files under the root ([] in the dir layout)."""
        return sidecar_entry_files(self)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        return self.contains(path)

