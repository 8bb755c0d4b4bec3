"""Writing history entries: the entries of one causal pass over a list of frames, each frame
stamped, digested and recorded once (docs/design.md, "History entries"; the chains and lookups
are in :mod:`featstore.history`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from featstore import _core
from featstore.errors import SourceChangedError
from featstore.history import FORMAT, KIND, frames_record_path, history_key_path
from featstore.history_frames import chains, racy, record_frames, write_record

if TYPE_CHECKING:
    import torch

    from featstore.store import FeatureStore


class HistoryPass:
    """The entries of one causal pass over a list of frames: the frames are stamped and digested
    once and recorded in one frames record, then :meth:`put` writes the entry of each prefix with
    a header of constant size.

    ``expected`` holds the frames' stamps when they were read for encoding: the prefixes up to
    the first frame that changed since (or vanished, or cannot be read) can be written; a longer
    one raises :class:`~featstore.errors.SourceChangedError` and nothing is written for it.
    """

    def __init__(self, store: FeatureStore, paths: Sequence[str | os.PathLike[str]], *,
                 expected: Sequence[Sequence[int]] | None = None, durable: bool = False) -> None:
        self.store = store
        self.rels = [store.rel(p) for p in paths]
        if not self.rels:
            raise ValueError("a history needs at least one frame")
        self.durable = durable
        recorded = record_frames(store.data_root, self.rels, expected)
        self.records = recorded.records
        self.problem = recorded.problem
        self.chains = chains(self.records)
        self._record_path: str | None = None

    @property
    def recorded(self) -> int:
        """How many leading frames are recorded (prefixes up to this length can be written)."""
        return len(self.records)

    def put(self, length: int, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None
            ) -> str:
        """Writes the entry of the prefix of ``length`` frames atomically; returns its path."""
        from featstore._torch import to_raw  # imports torch: not at `import featstore`

        if not 1 <= length <= len(self.rels):
            raise ValueError(f"prefix length {length} is outside 1..{len(self.rels)}")
        if length > self.recorded:
            raise SourceChangedError(f"{self.problem}; the samples whose history holds it got no entry")
        if self._record_path is None:
            # Before the first entry: an entry whose record is missing is still served (the chains
            # decide), but the commands that judge entry files alone could not name its frames.
            self._record_path = frames_record_path(self.store, self.chains.keys[-1])
            write_record(self._record_path, self.store.feature, self.records, durable=self.durable)
        n = length - 1
        meta = dict(metadata or {})
        meta.update({"feature": self.store.feature, "fingerprint": self.store.fingerprint or "", "kind": KIND,
                     "format": FORMAT, "frames": str(length), "key": self.chains.keys[n],
                     "stamps": self.chains.stamps[n], "content": self.chains.contents[n], "last": self.rels[n],
                     "frames_record": self.chains.keys[-1],
                     "racy": "1" if racy([r["mtime_ns"] for r in self.records[:length]]) else "0"})
        path = history_key_path(self.store, self.chains.keys[n])
        raw, keep = to_raw(tensors)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _core.write_entry(path, raw, meta, self.durable)
        del keep
        return path


def put_history(store: FeatureStore, paths: Sequence[str | os.PathLike[str]], tensors: Mapping[str, torch.Tensor],
                *, expected: Sequence[Sequence[int]] | None = None, metadata: Mapping[str, str] | None = None,
                durable: bool = False) -> str:
    """Writes the entry of a history (its last frame's features given every frame before it)
    atomically; returns its path. Writing several prefixes of one list: :class:`HistoryPass`.

    ``expected`` holds the frames' stamps when they were read for encoding: if one changed
    since, :class:`~featstore.errors.SourceChangedError` is raised and nothing is written.
    """
    return HistoryPass(store, paths, expected=expected, durable=durable).put(len(paths), tensors, metadata=metadata)
