"""A fork in any thread state leaves a usable store in the child.

A DataLoader forks its workers while ``ds.loader()``'s prefetch thread reads batches; a child
that inherited a lock held by that thread (the store's index, the thread-pool cache) would wait
for it forever. Here a thread keeps the store busy with batch reads and parallel checks while the
main thread forks children that each use the store at once; every child must finish.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from featstore import FeatureStore

FORKS = 200
DEADLINE_S = 20.0


def _wait(pid: int, deadline: float) -> int | None:
    """The child's exit status, or None when it is still running at the deadline (then killed)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_children_forked_while_another_thread_reads_can_use_the_store(tree, figures):
    fig = figures("fork while another thread is inside a store call")
    root, rels = tree
    store = FeatureStore(root, "toy", fingerprint="fp")
    for r in rels:
        store.put(r, {"features": torch.arange(4096, dtype=torch.float32)})
    stop = threading.Event()
    calls = [0]

    def busy() -> None:
        out = torch.empty((len(rels), 4096))
        while not stop.is_set():
            store.read_batch(rels, "features", out, threads=2)
            # Forgotten entries are judged again in the pool's threads, which then write the
            # store's index: the lock a child could inherit held.
            for r in rels:
                store.forget(r)
            store.states(rels, threads=2)
            calls[0] += 1

    reader = threading.Thread(target=busy, daemon=True)
    reader.start()
    hung = failed = 0
    try:
        for _ in range(FORKS):
            pid = os.fork()
            if pid == 0:  # the child: use the inherited store and a new one, then leave at once
                try:
                    ok = store.state(rels[0]) == "valid"
                    ok &= store.read_batch(rels, "features").shape == (len(rels), 4096)
                    ok &= FeatureStore(root, "toy").states(rels, threads=2) == ["valid"] * len(rels)
                    os._exit(0 if ok else 1)
                except BaseException:
                    os._exit(2)
            code = _wait(pid, time.monotonic() + DEADLINE_S)
            hung += code is None
            failed += code not in (None, 0)
    finally:
        stop.set()
        reader.join()
    fig.add(runs=FORKS, cases=FORKS, failures=hung + failed)
    fig.note(f"{FORKS} forks while a thread ran read_batch and parallel checks ({calls[0]} rounds): "
             f"each child read a batch and checked every entry with the inherited store and a new one; "
             f"{hung} hung, {failed} failed")
    assert calls[0] > 0
    assert hung == 0 and failed == 0, f"{hung} children hung and {failed} failed after fork"
