"""The stream that keeps the device busy: decode in workers, batch, encode, write behind.

Decoded items are grouped into batches of equal shape ("crop" preprocessing gives varying
heights; items for ``encode_items`` all go in one group; histories stream together only with
lists of the same length and frame shape) and each full group is encoded at once;
the writer thread stores the previous batch meanwhile. An item that cannot be decoded is recorded
as failed and the stream goes on.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from featstore.fmt import age, human_bytes
from featstore.pipeline.decoding import decode_loader, each_item
from featstore.pipeline.encoding import BatchEncoder
from featstore.pipeline.items import WorkItem
from featstore.pipeline.planning import Plan
from featstore.pipeline.shape_log import ShapeLog
from featstore.pipeline.summary import Counts
from featstore.pipeline.writing import Writer
from featstore.progress import counter


def stream(plan: Plan, *, num_workers: int | None, durable: bool, counts: Counts, journal: str,
           shape_log: ShapeLog) -> None:
    """Computes and writes the entries of ``plan.todo``, tallying in ``counts``.

    ``num_workers`` decoding processes (None: one per core on the CPU, cores - 1 with a GPU, at
    most 8); entries are fsynced in batches when ``durable``; ``shape_log`` records the shapes
    of what is written.
    """
    store, enc, todo = plan.store, plan.encoder, plan.todo
    dev = torch.device(plan.device)
    cores = len(os.sched_getaffinity(0))
    if num_workers is None:
        # On a GPU the main process needs a core to feed it; on the CPU it mostly waits for
        # decoded images while torch computes, so every core decodes.
        num_workers = min(8, cores if dev.type == "cpu" else max(cores - 1, 0))
    if plan.caps.to:
        t_load = time.perf_counter()
        enc.to(plan.device)  # type: ignore[attr-defined]
        # The summary's rate counts the whole run: its stage times say how much was loading.
        counts.stage_seconds["load"] += time.perf_counter() - t_load
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        # torch's intra-op threads would compete with the decoding workers for the same cores.
        torch.set_num_threads(max(1, cores - num_workers))
    loader = decode_loader(enc, store.data_root, todo, batch_size=plan.batch_size, num_workers=num_workers,
                           pin_memory=dev.type == "cuda")
    writer = Writer(store, journal, durable, counts, shape_log, pack_size=plan.pack_size)
    encoder = BatchEncoder(enc, dev, writer, counts, plan.batch_size)
    # A bar on a terminal; in a log file (stderr not a terminal) a line every plan.log_every seconds.
    show = True if plan.progress else None if plan.log_every > 0 else False
    bar = counter(sum(item.entries for item in todo), f"precompute {store.feature}", show=show,
                  every=plan.log_every, unit="item" if plan.caps.items else todo[0].unit if todo else "img",
                  duration=age)
    try:
        _batch_and_encode(each_item(loader), todo, writer, encoder, counts, bar, items_mode=plan.caps.items)
    finally:
        try:
            writer.close()
        finally:  # the last line counts what the writer finished
            bar.set_postfix(written=counts.written, failed=counts.failed, refresh=False)
            bar.close()
            torch.set_num_threads(threads_before)


def _batch_and_encode(loader: Iterable[tuple[int, Any, str | None, Any]], todo: list[WorkItem], writer: Writer,
                      encoder: BatchEncoder, counts: Counts, bar: Any, *, items_mode: bool) -> None:
    """Groups decoded items by shape and encodes each group when it reaches the batch size in
    force, then what is left; ``items_mode``: decoded items are not images (one group, a list)."""
    groups: dict[tuple[int, ...], list[tuple[int, Any]]] = defaultdict(list)

    def flush(key: tuple[int, ...]) -> None:
        members = groups.pop(key)
        batch = [x for _, x in members] if items_mode else torch.stack([x for _, x in members])
        items = [todo[i] for i, _ in members]
        encoder.encode(items, batch)
        bar.update(sum(item.entries for item in items))
        extra: dict[str, Any] = {"frame_passes": counts.frame_passes} if items[0].kind == "history" else {}
        if counts.written:  # the real outputs so far say what the whole run will take
            total = counts.bytes / counts.written * bar.total
            extra["size"] = f"{human_bytes(counts.bytes)} (about {human_bytes(total)} in all, estimated)"
        bar.set_postfix(written=counts.written, failed=counts.failed, **extra, refresh=False)

    t_wait = time.perf_counter()
    for index, decoded, error, stamp in loader:
        counts.stage_seconds["decode_wait"] += time.perf_counter() - t_wait
        if decoded is None:
            writer.fail(todo[index], error or "cannot decode")
            bar.update(todo[index].entries)
        else:
            key = () if items_mode else tuple(decoded.shape)
            groups[key].append((index, decoded))
            writer.expected[todo[index]] = stamp
            if len(groups[key]) >= encoder.batch_size:
                flush(key)
        t_wait = time.perf_counter()
    for key in list(groups):
        flush(key)
