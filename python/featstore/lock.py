"""Locks that keep writers of one feature apart.

``featstore precompute`` holds ``<state dir>/locks/precompute.lock`` (or one per ``--shard``) for
its whole run; ``gc``, ``migrate --yes`` and ``verify --quarantine`` take the same lock and refuse
while any precompute of the feature runs. Locks are ``flock`` s: they go away with their process,
so a killed run's lock is taken over without cleanup. (On network file systems without working
``flock``, runs are not kept apart: use one node per feature or ``--shard``.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from featstore.errors import LockHeldError, ReadOnlyDataRootError

if TYPE_CHECKING:
    from featstore.store import FeatureStore


# Descriptors of the locks this process holds. A forked child (a DataLoader worker decoding for
# precompute) inherits them, and an flock lasts until every copy of its descriptor is closed: a
# worker outliving a killed run would keep the lock and refuse the rerun. Children close their
# copies at once; the parent's lock is unaffected.
_held: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_dir(store: FeatureStore) -> str:
    """Where the feature's lock files live."""
    return os.path.join(store.state_dir, "locks")


@contextlib.contextmanager
def feature_lock(store: FeatureStore, name: str) -> Iterator[str]:
    """Keeps two runs of one feature (and shard) apart. An ``flock``: it goes away with its
    process, so the lock of a killed run is taken over without any cleanup."""
    directory = lock_dir(store)
    path = os.path.join(directory, f"{name}.lock")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = store.cache_dir or store.data_root
        raise ReadOnlyDataRootError(
            exc.errno, f"cannot create the lock {path}: {exc.strerror}. {where} is not writable here; keep "
            "entries in a writable cache directory instead (--cache-dir DIR)", path) from exc
    _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LockHeldError(f"another precompute of feature {store.feature!r} is running ({holder}; lock "
                                f"{path}). Wait for it, or run a different --shard.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield path
    finally:
        if fd in _held:  # else a forked child already closed it (the number may be reused since)
            _held.discard(fd)
            os.close(fd)


def lock_is_held(path: str) -> bool:
    """True when a live process holds the lock file at ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def maintenance_lock(store: FeatureStore, doing: str) -> Iterator[None]:
    """For commands that change a feature's entries (gc, migrate, quarantine): holds the
    precompute lock, and refuses while a precompute shard of the feature runs."""
    with feature_lock(store, "precompute"):
        running = [os.path.basename(p) for p in glob.glob(os.path.join(lock_dir(store), "precompute.shard*.lock"))
                   if lock_is_held(p)]
        if running:
            raise LockHeldError(f"cannot {doing} while a precompute of feature {store.feature!r} runs "
                                f"({', '.join(sorted(running))}); wait for it to finish")
        yield


@contextlib.contextmanager
def run_lock(store: FeatureStore, shard: tuple[int, int] | None) -> Iterator[None]:
    """The lock of one precompute run. A plain run holds ``precompute.lock`` and refuses while a
    shard runs; a ``--shard I/N`` run holds its own lock and refuses while a plain run holds
    ``precompute.lock``. Shards of one split run side by side."""
    if shard is None:
        with maintenance_lock(store, "start a precompute"):
            yield
        return
    with feature_lock(store, f"precompute.shard{shard[0]}-of-{shard[1]}"):
        if lock_is_held(os.path.join(lock_dir(store), "precompute.lock")):
            raise LockHeldError(f"a precompute of feature {store.feature!r} over all sources is running; "
                                f"wait for it before running --shard {shard[0]}/{shard[1]}")
        yield


#: Lazy caching serializes computing one entry over this many lock files (a stripe per entry hash):
#: a lock file per entry would leave a million files behind. Entries whose stripe another process
#: holds are computed last (see entry_claims), so a shared stripe delays, never serializes.
CLAIM_STRIPES = 1024


@contextlib.contextmanager
def entry_claims(store: FeatureStore, rels: Sequence[str], *, wait: bool = True) -> Iterator[set[str]]:
    """Held while one process computes and writes the entries of ``rels`` on lazy misses, so that
    DataLoader workers (and ranks on one host) meeting the same missing entry compute it once:
    the others wait here, then find it written. Yields the claimed ``rels``: all of them when
    ``wait``; else those whose stripes were free (the caller computes those first, then waits
    for the rest, so two workers whose batches share a stripe do not take turns). Stripes are
    taken in sorted order, so overlapping claims cannot deadlock. Where locks cannot be taken (a
    read-only state directory, a file system without ``flock``), it claims without holding
    anything: entry writes are atomic, so the worst case is computing an entry twice."""
    import zlib

    stripe_of = {rel: zlib.crc32(rel.encode()) % CLAIM_STRIPES for rel in rels}
    fds: list[int] = []
    busy: set[int] = set()
    try:
        for stripe in sorted(set(stripe_of.values())):
            path = os.path.join(lock_dir(store), f"lazy-{stripe:04d}.lock")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                break  # no writable state directory: claim without holding (see above)
            fds.append(fd)
            _held.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.add(stripe)
            except OSError:
                pass  # no flock here (see above)
        yield {rel for rel, stripe in stripe_of.items() if stripe not in busy}
    finally:
        for fd in fds:
            if fd in _held:  # else a forked child already closed it (see _held)
                _held.discard(fd)
                # Unlock first: a child forked while this was held may still have a copy.
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
