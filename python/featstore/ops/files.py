"""The files the operations touch: where a feature's files live, which of them are featstore's,
and the error for a cache this user may not write.

What may be removed or moved is decided in one place, :func:`feature_files`: files named like
this feature's entries (``<source>.<feature>.safetensors`` beside a source, or
``<cache_dir>/<feature>/<key[:2]>/<key32>.safetensors``) and the temporary files featstore's
atomic writes leave when interrupted (``.<entry or manifest name>.<random>.tmp``). Which file
was judged is its identity (:func:`file_identity`): a removal or move goes through
:func:`featstore._core.remove_judged` / ``move_judged`` with it, so a file a concurrent writer
renamed over the name since is never the one removed.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from featstore import _core
from featstore.store import FeatureStore
from featstore.vocabulary import ENTRY_EXTENSION, sidecar_suffix

T = TypeVar("T")

_DIR_ENTRY = re.compile(r"^[0-9a-f]{32}\." + ENTRY_EXTENSION + "$")
# The random part the Rust writer (tempfile) puts between the target name and ".tmp".
_TMP_RANDOM = r"\.[A-Za-z0-9]+\.tmp$"


def base_dir(store: FeatureStore) -> str:
    """Where the feature's files live: the data root (sidecar) or the cache directory (dir)."""
    return store.cache_dir or store.data_root


def file_size(path: str) -> int:
    """The size of ``path`` in bytes (of a link itself, not its target); 0 when it cannot be read."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


#: A file's identity as featstore's core stamps it: ``(size, mtime_ns, ino, ctime_ns)``.
Identity = tuple[int, int, int, int]

#: What a destructive operation reports for a file it judged that a writer replaced meanwhile.
KEPT_REWRITTEN = "kept: rewritten since it was judged"


def file_identity(path: str) -> Identity | None:
    """The identity of the regular file at ``path`` from one ``lstat`` (None: gone, or not a
    regular file). :func:`featstore._core.remove_judged` and ``move_judged`` act on a file only
    while it still has the identity its judgment was made on."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def same_file(a: Identity | None, b: Identity | None) -> bool:
    """Whether two identities name one unchanged file (size, mtime and inode; ctime aside, as the
    core compares them: a rename of the file itself changes it)."""
    return a is not None and b is not None and a[:3] == b[:3]


def read_judged(path: str, read: Callable[[str], T]) -> tuple[T, Identity | None]:
    """``read(path)`` and the identity of the file it read: the file's stamp when it is the same
    before and after the read (None when a writer replaced it meanwhile, or it is not a regular
    file: then no judgment made from the read may be acted on)."""
    before = file_identity(path)
    got = read(path)
    after = file_identity(path)
    return got, (before if before is not None and before == after else None)


def judge_files(paths: Sequence[str], judge: Callable[[str], T], *, threads: int | None,
                identities: dict[str, Identity | None] | None = None) -> tuple[list[T], list[tuple[str, str]]]:
    """``judge(path)`` of every file (in parallel, each through :func:`read_judged`) and the files
    that could not be read, with why; ``identities`` receives the identity of each file judged
    (None: it changed meanwhile, so nothing may act on its verdict)."""
    def one(path: str) -> tuple[T, Identity | None] | str:
        try:
            return read_judged(path, judge)
        except OSError as exc:
            return str(exc)

    verdicts: list[T] = []
    errors: list[tuple[str, str]] = []
    if not paths:
        return verdicts, errors
    with ThreadPoolExecutor(max_workers=threads or _core.default_threads()) as pool:
        for path, got in zip(paths, pool.map(one, paths), strict=True):
            if isinstance(got, str):
                errors.append((path, got))
            else:
                verdicts.append(got[0])
                if identities is not None:
                    identities[path] = got[1]
    return verdicts, errors


def gone_or_kept(path: str) -> str:
    """Why a judged removal or move did not happen: the file is gone, or a writer replaced it."""
    return KEPT_REWRITTEN if os.path.lexists(path) else "already gone"


def feature_files(store: FeatureStore) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """This feature's entry files and featstore's temporary files (absolute paths), and walk errors.

    Sidecar: ``*.<feature>.safetensors`` under the data root. Dir: ``<key[:2]>/<key32>.safetensors``
    under ``<cache_dir>/<feature>``. Temporary files: ``.<such a name>.<random>.tmp`` beside
    them, and ``.<manifest name>.<random>.tmp`` beside the manifest. ``.featstore`` directories
    (frame sets, quarantine) are not walked.
    """
    suffix = sidecar_suffix(store.feature)
    manifest = store.manifest_path
    tmp_manifest = re.compile(r"^\." + re.escape(os.path.basename(manifest)) + _TMP_RANDOM)
    if store.layout == "sidecar":
        base = store.data_root
        tmp_entry = re.compile(r"^\..+" + re.escape(suffix) + _TMP_RANDOM)
    else:
        assert store.cache_dir is not None
        base = os.path.join(store.cache_dir, store.feature)
        if not os.path.isdir(base):
            return [], [], []
        tmp_entry = re.compile(r"^\.[0-9a-f]{32}\." + ENTRY_EXTENSION + _TMP_RANDOM)
    paths, _, _, errors, *_ = _core.scan(base, extensions=[ENTRY_EXTENSION, "tmp"])
    entries: list[str] = []
    temps: list[str] = []
    for p in map(os.fspath, paths):
        full = os.path.join(base, p)
        name, parent = os.path.basename(p), os.path.dirname(p)
        in_key_dir = store.layout == "sidecar" or parent == name[1:3]
        if name.endswith(".tmp"):
            if (tmp_entry.match(name) and in_key_dir) or (
                    tmp_manifest.match(name) and os.path.dirname(full) == os.path.dirname(manifest)):
                temps.append(full)
        elif store.layout == "sidecar":
            if name.endswith(suffix) and len(name) > len(suffix):
                entries.append(full)
        elif _DIR_ENTRY.match(name) and parent == name[:2]:
            entries.append(full)
    return entries, temps, [(os.fspath(a), b) for a, b in errors]


def not_writable(exc: OSError, path: str, directory: str, doing: str, done: int, total: int,
                 fix: str) -> PermissionError:
    """The error for a read-only cache: the path, what was done before it, and what to do."""
    return PermissionError(
        exc.errno or errno.EACCES,
        f"cannot {doing} {path}: {exc.strerror or exc}. {directory} is not writable by this user; {fix}. "
        f"{done} of {total} done before this, nothing was lost",
        path)
