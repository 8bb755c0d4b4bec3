"""Writing entries: one (:meth:`FeatureStore.write`, under ``put``), or a batch in one core call
(:meth:`FeatureStore.write_many`, :meth:`FeatureStore.write_rows`: in parallel without the GIL,
fsynced together; precompute's writer uses them). The Rust core does the writing; this module
turns tensors into what it takes and its errors into ones that say what to do."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featstore import _core, lazy_torch
from featstore.errors import ReadOnlyDataRootError
from featstore.inputs import InputValue, Stamp, to_core

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore

#: A write's result: ``put``'s dict (a packed write: the entry's length), or what it raised.
Result = dict[str, Any] | int | BaseException


def write_one(store: FeatureStore, path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *,
              inputs: Mapping[str, InputValue] | None, metadata: Mapping[str, str] | None, durable: bool,
              expected: Stamp | None) -> dict[str, Any]:
    """:meth:`FeatureStore.write`: one entry, raising what its write raised."""
    rel = store.rel(path)
    raw, keep = lazy_torch.helpers().to_raw(tensors)
    meta = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        meta[k] = v
    extra = [(name, to_core(name, v)) for name, v in (inputs or {}).items()]
    try:
        written: dict[str, Any] = store._core.put(rel, raw, meta, extra, durable, expected)
    except OSError as exc:
        raise write_error(store, rel, exc) from exc
    finally:
        del keep
    return written


def write_many(store: FeatureStore, items: Sequence[tuple[str, Mapping[str, torch.Tensor],
                                                          Mapping[str, InputValue] | None, Stamp | None]], *,
               durable: bool, threads: int | None, stream: _core.PackStream | None = None) -> list[Result]:
    """A batch ``(path, tensors, inputs, expected)`` written in parallel in Rust without the GIL
    (``threads``: default one per core), then with ``durable`` fsynced together (files, then their
    directories, concurrently) before it returns. One result per item, in order: what
    :meth:`FeatureStore.write` returns, or the exception its write raised (the other items are
    written). A failed fsync raises: no entry of the batch is known durable.

    With ``stream`` (precompute's packed writes) the entries are appended to the stream's open
    pack instead, and each result is the entry's length in bytes: nothing is served, durable or
    indexed until ``store._core.seal_pack_stream`` seals the pack."""
    raws, keep = [], []
    for _, tensors, _, _ in items:
        raw, held = lazy_torch.helpers().to_raw(tensors)
        raws.append(raw)
        keep.append(held)
    return _put_many(store, [(path, raw, inputs, expected) for (path, _, inputs, expected), raw
                             in zip(items, raws, strict=True)], keep, durable, threads, stream)


def write_rows(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], outputs: Mapping[str, torch.Tensor], *,
               inputs: Sequence[Mapping[str, InputValue] | None] | None, expected: Sequence[Stamp | None] | None,
               durable: bool, threads: int | None, stream: _core.PackStream | None = None) -> list[Result]:
    """:func:`write_many` of a batch of outputs: the entry of ``paths[i]`` holds row ``i`` of each
    tensor of ``outputs`` (first axis ``len(paths)``), read in place, with no copy or tensor per
    row. ``inputs`` and ``expected``: per path, as :meth:`FeatureStore.write` takes them."""
    rows, keep = lazy_torch.helpers().rows_to_raw(outputs, len(paths))
    inputs = inputs if inputs is not None else [None] * len(paths)
    expected = expected if expected is not None else [None] * len(paths)
    return _put_many(store, list(zip(paths, rows, inputs, expected, strict=True)), keep, durable, threads, stream)


def _put_many(store: FeatureStore, items: Sequence[tuple[str | os.PathLike[str], Any,
                                                         Mapping[str, InputValue] | None, Stamp | None]],
              keep: list[Any], durable: bool, threads: int | None, stream: _core.PackStream | None) -> list[Result]:
    """Writes ``(path, raw tensors, inputs, expected)`` in one core call; ``keep`` holds the
    tensors the raw pointers point into until it returns."""
    batch: list[tuple[str, Any, dict[str, str], list[Any], Stamp | None]] = [
        (store.rel(path), raw, {}, [(name, to_core(name, v)) for name, v in (inputs or {}).items()], stamp)
        for path, raw, inputs, stamp in items]
    try:
        results = (store._core.put_many(batch, durable, threads) if stream is None
                   else store._core.put_many_packed(stream, batch, threads))
    finally:
        del keep
    return [write_error(store, request[0], r) if isinstance(r, OSError) else r
            for request, r in zip(batch, results, strict=True)]


def write_error(store: FeatureStore, rel: str, exc: OSError) -> OSError:
    """The error of a failed write: a sidecar that cannot be written beside its source says so and
    gives the fix."""
    if store.layout == "sidecar" and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        err = ReadOnlyDataRootError(
            exc.errno, f"cannot write the entry of {rel} beside its source: {exc.strerror}. "
            f"The data root {store.data_root} is not writable here; keep entries in a cache "
            f"directory instead (--cache-dir DIR, or FeatureStore(..., cache_dir=DIR))", exc.filename)
        err.__cause__ = exc
        return err
    return exc
