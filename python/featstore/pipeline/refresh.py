"""Refreshing entries that a shared input made stale, without encoding them again.

A ``.jsonl`` file holds the captions (or control paths) of many images. An entry records it as a
shared input (:class:`~featstore.inputs.FileInput` with ``shared=True``) *and* the text it took
from its own line (a ``bytes`` input): any edit of the file makes every entry that read it stale on
lookup (a lookup never reads the ``.jsonl``, so it cannot tell which line changed, and never
serves an entry whose caption may have changed). Precompute can tell: an entry whose recorded
inputs all still match, its own line's text included, is rewritten with the same tensors and the
``.jsonl``'s new stamp (read and write, no encoding); only the entries whose line changed are
computed again.

Every file is stamped before it is compared, and the entry is written with those stamps as
``expected``: a file edited in between makes the write fail, and the item is computed instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from featstore import _core
from featstore._torch import from_capsules
from featstore.encoders import Encoder
from featstore.errors import FeatstoreError
from featstore.inputs import AbsentInput, FileInput, InputValue, Stamp, as_read, stamp_of
from featstore.pipeline import journal as journal_lines
from featstore.pipeline.items import WorkItem
from featstore.store import FeatureStore


def refreshable(store: FeatureStore, enc: Encoder, items: Sequence[WorkItem], states: Sequence[str]
                ) -> list[WorkItem]:
    """The stale items whose entry only a shared input (a ``.jsonl``) made stale: their own
    inputs, as the encoder reads them now, are those the entry was computed from (judged on the
    entries' headers; :func:`refresh` judges again on the entry it copies)."""
    found = []
    for item, state in zip(items, states, strict=True):
        if state != "stale" or item.kind != "image":
            continue
        try:
            meta, _, _ = _core.read_header(store.entry_path(item.paths[0]))
        except (OSError, FeatstoreError):
            continue
        if _judge(store, enc, item.paths[0], meta) is not None:
            found.append(item)
    return found


def refresh(store: FeatureStore, enc: Encoder, item: WorkItem) -> journal_lines.Record | None:
    """Rewrites the entry of ``item`` with its tensors and its inputs' stamps now; its journal
    line, or None when it no longer qualifies (something changed since it was planned, or its
    data fails its checksum: the item is then computed)."""
    rel = item.paths[0]
    path = store.entry_path(rel)
    try:
        # The data is checked against its checksum first: a fresh entry gets a fresh checksum,
        # so copying rotted bytes would hide the rot from `featstore verify` for good. The copy
        # is read privately (pread) and must be of the file verified (same metadata).
        verified = _core.verify_entry(path)
        capsules, meta, _ = _core.read_entry(path, pread=True)
    except (OSError, FeatstoreError):
        return None
    judged = _judge(store, enc, rel, meta) if meta == verified else None
    if judged is None:
        return None
    inputs, source = judged
    try:
        w = store.write(rel, from_capsules(capsules), inputs=inputs, expected=source)
    except (OSError, FeatstoreError):
        return None  # a file changed between stamping and writing: the write refused it
    return journal_lines.ok_record(store, rel, w)


def _judge(store: FeatureStore, enc: Encoder, rel: str, meta: Mapping[str, str]
           ) -> tuple[dict[str, InputValue], Stamp] | None:
    """``(the inputs stamped now, the source's stamp)`` when the entry of ``rel`` whose metadata
    is ``meta`` may be refreshed: same feature and fingerprint, the source's bytes and every
    input but the shared ones as recorded. Files are stamped before they are compared, and
    the write takes the stamps as ``expected``."""
    source_path = os.path.join(store.data_root, rel)
    try:
        source = stamp_of(source_path)
        now = as_read(enc.inputs(rel, source_path), store.data_root)  # type: ignore[attr-defined]
    except Exception:  # an input that cannot be read now: computing it reports why
        return None
    shared = {name for name, v in now.items() if isinstance(v, FileInput) and v.shared}
    if not shared or meta.get("fingerprint") != store.fingerprint or meta.get("feature") != store.feature:
        return None
    try:
        recorded = {r["name"]: r for r in json.loads(meta.get("inputs", "[]"))}
        if recorded.pop("source", {}).get("blake3") != _core.file_digest(source_path):
            return None
        if set(recorded) != set(now) or not all(_same(store, recorded[n], v, n in shared) for n, v in now.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return now, source


def _same(store: FeatureStore, record: Mapping[str, Any], value: InputValue, shared: bool) -> bool:
    """Whether an input read now is the one ``record`` recorded (a shared file: the same file,
    whatever its content; its part is a text input of its own)."""
    if isinstance(value, bytes):
        return record.get("blake3") == _core.bytes_digest(value)
    if isinstance(value, AbsentInput):
        return bool(record.get("absent")) and not os.path.lexists(_abs(store, value.path))
    assert isinstance(value, FileInput)  # as_read made every path one
    now = _abs(store, value.path)
    if record.get("absent") or os.path.normpath(_abs(store, record.get("path", ""))) != os.path.normpath(now):
        return False
    return shared or record.get("blake3") == _core.file_digest(now)


def _abs(store: FeatureStore, path: str | os.PathLike[str]) -> str:
    return os.path.join(store.data_root, os.fspath(path))
