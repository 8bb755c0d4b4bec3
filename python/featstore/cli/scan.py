"""``featstore scan``: the sources under a data root and, with --feature, their entry states."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from featstore import ops
from featstore.cli.common import (
    add_data_root,
    add_feature,
    add_json,
    add_sources,
    data_root,
    emit,
    find_sources,
    open_store,
)
from featstore.fmt import error_lines, human_bytes

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    """Adds ``scan``."""
    p = sub.add_parser("scan", help="find the sources under a data root and count entry states",
                       description="Find the sources (images by extension, or paths from .jsonl fields) under "
                                   "DATA_ROOT: counts and bytes per extension and, with --feature, how many entries "
                                   "are valid, missing, stale, ... Writes nothing unless --write-manifest.")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False)
    p.add_argument("--write-manifest", action="store_true",
                   help="write the feature's manifest (counts and an index of valid entries)")
    add_json(p)
    p.set_defaults(func=cmd_scan)


def cmd_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Counts the sources per extension and, with --feature, the entry states; writes the
    manifest only with --write-manifest."""
    root = data_root(args, parser)
    if args.write_manifest and not args.feature:
        parser.error("--write-manifest needs --feature")
    store = open_store(args, root) if args.feature else None
    t0 = time.perf_counter()
    found = find_sources(args, store, root=root)
    seconds = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "data_root": found.root, "sources": len(found), "bytes": found.total_bytes, "seconds": round(seconds, 3),
        "by_extension": {k: {"count": c, "bytes": b} for k, (c, b) in found.by_extension().items()},
        "sets": len(found.sets), "errors": [list(e) for e in found.errors],
    }
    lines = [f"{found.root}: {len(found):,} sources, {human_bytes(found.total_bytes)} (scanned in {seconds:.2f} s)"]
    for ext, (count, nbytes) in found.by_extension().items():
        lines.append(f"  {ext or '(none)':8} {count:>10,}  {human_bytes(nbytes):>10}")
    if found.sets:
        lines.append(f"  {len(found.sets):,} frame sets from .jsonl lists")
    if store is not None:
        status = ops.status(store, found.paths, lists=found.sets, threads=args.threads, progress=None).status
        doc["feature"] = status.to_dict()
        sets = (f", {status.items:,} frame sets of up to {status.frames_per_set} frames; counts are sets"
                if status.unit == "sets" else "")
        lines.append(f"feature {store.feature} ({store.layout} layout, fingerprint {store.fingerprint or 'any'}"
                     f"{sets}):")
        lines.append("  " + "  ".join(f"{s} {n:,}" for s, n in status.counts.items()))
        if args.write_manifest:
            doc["manifest"] = store.write_manifest(status, found.paths)
            lines.append(f"manifest written: {doc['manifest']}")
    if found.errors:
        lines.extend(error_lines(found.errors, "path could not be scanned", "paths could not be scanned"))
    emit(args, doc, "\n".join(lines))
    return 1 if found.errors else 0
