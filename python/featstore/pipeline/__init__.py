"""The precompute engine behind ``featstore precompute`` and :func:`featstore.precompute`.

The engine keeps the device busy:

1. **scan** the data root (Rust, parallel) and **plan** (:mod:`.planning`): only missing or stale
   entries (all with ``overwrite``), restricted to a list, an index range, a shard and the
   torchrun rank (:mod:`.selection`);
2. **decode** in DataLoader worker processes (:mod:`.decoding`: the encoder's ``preprocess``
   gives uint8, so workers send a quarter of the bytes of float images);
3. **batch** items of equal shape together ("crop" preprocessing gives varying heights) and
   **encode** on the device under ``inference_mode`` (:mod:`.streaming`, :mod:`.encoding`);
4. **write** in a background thread (:mod:`.writing`: the Rust writer releases the GIL): each
   entry atomically, fsynced in batches, then one journal line per entry (:mod:`.journal`), so a
   killed run leaves only complete entries and a journal the next run continues from;
5. **compact** the journals into the manifest at the end (:mod:`.manifest`).

A CUDA out-of-memory error halves the batch and retries; an undecodable image is recorded as
failed and the run goes on. A unit of work is a :class:`~.items.WorkItem`: one source, a
frame set encoded together, or a history streamed once for the entries of all its prefixes that
samples name (out-of-memory then halves the lists streamed together).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from featstore.env import parse_shard
from featstore.pipeline.items import WorkItem, frame_sets, histories
from featstore.pipeline.planning import make_plan
from featstore.pipeline.run import run_plan
from featstore.pipeline.selection import distributed_rank, select
from featstore.pipeline.summary import plan_summary, run_summary

__all__ = ["precompute", "select", "parse_shard", "distributed_rank", "frame_sets", "histories", "WorkItem"]


def precompute(data_root: str | os.PathLike[str], *, encoder: Any = "vggt", feature: str | None = None,
               layout: str = "sidecar", cache_dir: str | os.PathLike[str] | None = None,
               device: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
               skip_existing: bool | None = None, overwrite: bool = False, start_idx: int | None = None,
               end_idx: int | None = None, shard: str | tuple[int, int] | None = None,
               files_from: str | os.PathLike[str] | None = None, extensions: Sequence[str] | None = None,
               jsonl: str | None = None, dry_run: bool = False, force: bool = False, durable: bool = True,
               progress: bool | None = None, encoder_options: dict[str, Any] | None = None,
               model_path: str | None = None, log_every: float | None = None,
               on_plan: Callable[[dict[str, Any]], None] | None = None,
               pack_size: int | None = None) -> dict[str, Any]:
    """Computes and stores an encoder's features for every source under ``data_root``.

    Parameters
    ----------
    data_root : path
        The dataset directory.
    encoder : str, encoder, nn.Module or callable
        ``"vggt"``, ``"module.path:callable"``, an encoder object (see
        :mod:`featstore.encoders.base`), an ``nn.Module``, or a factory of one.
    feature : str, optional
        Feature name (default: the encoder's ``name``).
    layout, cache_dir
        Where entries go (see :class:`featstore.FeatureStore`); ``layout="packed"`` writes
        per-image entries straight into packs (of ``pack_size`` bytes, default 2 GiB) in the
        state directory of the data root, or of ``cache_dir`` when given: one pack stream per
        process, each pack indexed once sealed (see ``featstore pack``).
    device : str, optional
        Default ``$DEVICE``, else ``cuda:0`` when available, else ``cpu``.
    batch_size : int, optional
        Images per batch (default ``$BATCH_SIZE`` or 16); halved on CUDA out-of-memory.
    num_workers : int, optional
        Decoding processes (default: one per core on the CPU, cores - 1 with a GPU, at most 8; 0
        decodes in this process). On the CPU, torch computes with the cores left over.
    skip_existing : bool, optional
        Skip sources whose entry is valid (default ``$SKIP_EXISTING`` or True). ``overwrite``
        recomputes everything.
    start_idx, end_idx : int, optional
        A range of the sorted source list.
    shard : "I/N", optional
        Take every N-th source starting at I (run N shards anywhere, in any order).
    files_from : path, optional
        Only the sources listed in this file.
    extensions, jsonl
        What to scan (see :func:`featstore.scan`).
    dry_run : bool
        Plan only: counts, estimated bytes, free space. Nothing is loaded or written; the
        ``vggt`` encoder needs no weights (a path given must exist; without one, states are
        judged against the manifest's fingerprint and the summary says the weights were not
        checked).
    force : bool
        Start even when the estimate says the disk is too small.
    durable : bool
        fsync entries (in batches) before recording them in the journal.
    progress : bool, optional
        Progress bar on stderr (default: when stderr is a terminal; when it is not, a progress
        line every ``log_every`` seconds). False: nothing.
    log_every : float, optional
        Seconds between progress lines when stderr is not a terminal (default
        ``$FEATSTORE_LOG_EVERY`` or 30; 0: none).
    on_plan : callable, optional
        Called with the plan's half of the summary before any work starts (the command line
        prints the plan first, so a log file shows it while the run goes on).
    model_path : str, optional
        The model the features are for (recorded in the manifest as ``model_path``, as the old
        scripts did); the encoder's own weights are part of the encoder.
    encoder_options : dict, optional
        Options of the ``vggt`` encoder (``model_path``, ``layers``, ``tokens``, ``dtype``,
        ``mode``, ``random_weights_seed``, ``frames_per_set``, and for history mode ``history``,
        ``window``, ``reverse``). History mode (an encoder with ``encode_history``) reads each
        ``jsonl`` line's list as one sample's history, streams each longest list once and writes
        an entry for every prefix a sample names; the summary counts samples and
        ``frame_passes``.

    Returns
    -------
    dict
        The summary ``featstore precompute --json`` prints.
    """
    t_start = time.perf_counter()
    plan = make_plan(data_root, encoder=encoder, feature=feature, layout=layout, cache_dir=cache_dir, device=device,
                     batch_size=batch_size, skip_existing=skip_existing, overwrite=overwrite, start_idx=start_idx,
                     end_idx=end_idx, shard=shard, files_from=files_from, extensions=extensions, jsonl=jsonl,
                     progress=progress, encoder_options=encoder_options, model_path=model_path,
                     log_every=log_every, dry_run=dry_run, pack_size=pack_size)
    summary = plan_summary(plan, dry_run=dry_run)
    if on_plan is not None:
        on_plan(dict(summary))
    if dry_run:
        return summary
    plan.check_space(force)
    outcome = run_plan(plan, num_workers=num_workers, durable=durable)
    summary["manifest"] = outcome.manifest
    summary.update(run_summary(outcome.counts, time.perf_counter() - t_start, outcome.interrupted,
                               frames_per_set=plan.caps.frames_per_set, history=plan.caps.history))
    if outcome.interrupted:
        raise KeyboardInterrupt(summary)
    return summary
