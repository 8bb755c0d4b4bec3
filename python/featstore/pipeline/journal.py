"""The journal: one append-only file of progress lines per process of a run.

Each line records one entry written (``ok`` for a source, ``set`` for a frame set, ``history``
for a history prefix) or one item failed; the manifest is compacted from the journals at the end
(:mod:`.manifest`). An entry's line is appended only after the entry is durable, so a killed run's
journal names only whole entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from featstore import _core
from featstore.pipeline.items import WorkItem
from featstore.pipeline.selection import split_position
from featstore.store import FeatureStore
from featstore.vocabulary import path_to_json

Record = dict[str, Any]


def journal_path(store: FeatureStore, rank: tuple[int, int], shard: tuple[int, int] | None) -> str:
    """This process's journal: ``<manifest>.rank<R>-of-<N>.jsonl``, R and N over shards and ranks."""
    me, world = split_position(rank, shard)
    return os.fspath(_core.journal_path(store.manifest_path, me, world))


def append(journal: str, records: Sequence[Record], *, durable: bool = False) -> None:
    """Appends ``records`` to the journal, one JSON line each (fsynced when ``durable``)."""
    _core.append_journal(journal, [json.dumps(r) for r in records], durable=durable)


def ok_record(store: FeatureStore, rel: str, written: Mapping[str, Any]) -> Record:
    """The line of a source's valid entry, from what the store's write returned: the source's and
    the entry's stamps ``(size, mtime_ns, ino, ctime_ns)``, whether it must be checked by digest
    on first use, the entry's extra inputs as its header records them (so that lookups check
    them without opening the entry), and the fingerprint it was written with (a merge for another
    encoder configuration leaves it out of the index)."""
    record = {"op": "ok", "path": path_to_json(os.fspath(rel)), "source": list(written["source"]),
              "entry": list(written["entry"]), "racy": bool(written["check_first"]),
              "fingerprint": store.fingerprint}
    if written.get("inputs") is not None:
        record["inputs"] = written["inputs"]
    return record


def indexed_record(store: FeatureStore, record: _core.IndexRecord) -> Record:
    """The line of an entry already indexed (a sealed pack's, see the pack stream): the record as
    the index holds it, so a merge of the journal writes the same."""
    key, value = record.to_json()
    return {"op": "ok", "path": key, "record": json.loads(value), "fingerprint": store.fingerprint}


def set_record(members: Sequence[str], entry: str) -> Record:
    """The line of a frame set's entry: sets are not in the per-source index, the line documents
    the write."""
    return {"op": "set", "members": [path_to_json(m) for m in members], "entry": path_to_json(entry)}


def history_record(frames: Sequence[str], entry: str) -> Record:
    """The line of a history's entry: like sets, histories are not in the per-source index; the
    line documents the write (the history's length, its last frame and the entry)."""
    return {"op": "history", "frames": len(frames), "last": path_to_json(frames[-1]), "entry": path_to_json(entry)}


def failed_record(store: FeatureStore, name: str, reason: str) -> Record:
    """The line of an item that got no entry: the manifest lists it with its reason."""
    return {"op": "failed", "path": path_to_json(name), "reason": reason, "fingerprint": store.fingerprint}


def journal_unindexed(store: FeatureStore, items: Sequence[WorkItem], journal: str) -> None:
    """Journals an ``ok`` line for each valid entry among ``items`` that the manifest's index
    does not hold (a killed run wrote it but not its line; a touched source's refreshed stamp), so
    the merged index holds every valid entry, not only this run's."""
    if not store._core.judged_outside_the_index():  # every verdict came from the index
        return
    rels = [item.paths[0] for item in items if item.indexed]
    if not rels:
        return
    records = [indexed_record(store, r) for r in store.index_records(rels, unindexed_only=True)]
    if records:
        append(journal, records)
