"""What an entry was computed from besides its source, as the encoder read it.

An encoder's optional ``inputs(rel, path)`` names them: a path (a caption ``.txt``, a control
image), ``bytes`` (a caption's text), a :class:`FileInput` (a path with the stamp taken when it
was read) or an :class:`AbsentInput` (a file the input rule would prefer, which must not appear).
:func:`as_read` stamps the files *before* the encoder reads them, so that a write can refuse
features of a file edited in between (docs/design.md, "Invariants").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A file's stamp: ``(size, mtime_ns, ino, ctime_ns)`` from one ``stat``.
Stamp = tuple[int, int, int, int]


def stamp_of(path: str | os.PathLike[str]) -> Stamp:
    """The stamp of the file at ``path`` (following symlinks)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


@dataclass(frozen=True)
class FileInput:
    """An input file as the encoder read it: ``stamp`` (taken *before* reading it) makes the
    write refuse features of a file edited meanwhile.

    ``shared``: a file many entries each read one part of (a ``.jsonl`` of captions), whose part
    the entry also records as a text. Any edit of the file makes the entry stale on lookup;
    precompute then refreshes, without encoding, the entries whose own part is unchanged
    (:mod:`featstore.pipeline.refresh`)."""

    path: str | os.PathLike[str]
    stamp: Stamp | None = None
    shared: bool = False


@dataclass(frozen=True)
class AbsentInput:
    """A file that must not exist for the entry to hold: one the input rule would prefer (the
    caption rule takes ``img.txt`` over ``img.png.txt``). If it appears, the entry is stale."""

    path: str | os.PathLike[str]


@dataclass(frozen=True)
class JsonlLine:
    """One line of a ``.jsonl`` listing: the line that lists ``listed`` (spelled as in the
    file) in ``image_field`` gave ``text`` as ``field``. The entry holds while the listing still
    gives ``listed`` that text, whatever else in the file is edited (docs/design.md, "Inputs from
    a `.jsonl` line"); the write refuses features of a line edited since it was read."""

    path: str | os.PathLike[str]
    image_field: str
    field: str
    listed: str
    text: bytes


#: An input's value: a path (stamped and digested when the entry is written), a
#: :class:`FileInput`, an :class:`AbsentInput`, a :class:`JsonlLine`, or ``bytes`` (a text,
#: recorded by digest).
InputValue = str | os.PathLike[str] | bytes | FileInput | AbsentInput | JsonlLine


def as_read(inputs: Mapping[str, InputValue], root: str) -> dict[str, InputValue]:
    """``inputs`` with every file stamped now: call it before the encoder reads them. Relative
    paths are relative to ``root``."""
    out: dict[str, InputValue] = {}
    for name, value in inputs.items():
        if isinstance(value, (str, os.PathLike)):
            value = FileInput(value)
        if isinstance(value, FileInput) and value.stamp is None:
            value = FileInput(value.path, stamp_of(os.path.join(root, os.fspath(value.path))), value.shared)
        out[name] = value
    return out


def to_core(name: str, value: InputValue) -> tuple[Any, ...]:
    """An input as the core takes it: ``("file", path, stamp)``, ``("text", bytes)``, ``("absent", path)``,
    ``("jsonl", path, image_field, field, listed, text)``."""
    if isinstance(value, bytes):
        return ("text", value)
    if isinstance(value, FileInput):
        return ("file", os.fspath(value.path), value.stamp)
    if isinstance(value, AbsentInput):
        return ("absent", os.fspath(value.path))
    if isinstance(value, JsonlLine):
        return ("jsonl", os.fspath(value.path), value.image_field, value.field, value.listed, value.text)
    if isinstance(value, (str, os.PathLike)):
        return ("file", os.fspath(value), None)
    raise TypeError(f"input {name!r}: a path, FileInput, AbsentInput, JsonlLine or bytes, not {type(value).__name__}")
