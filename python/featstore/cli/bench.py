"""``featstore bench``: lookup and read latency on the user's own data, against the schemes
featstore replaces. The measuring is in featstore.ops."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from featstore import ops
from featstore.cli.common import (
    ParagraphFormatter,
    add_data_root,
    add_feature,
    add_json,
    add_sources,
    at_least,
    data_root,
    emit,
    find_sources,
    open_store,
)

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    """Adds ``bench``."""
    p = sub.add_parser(
        "bench", help="measure lookup and read latency against the schemes featstore replaces",
        formatter_class=ParagraphFormatter,
        description="Measure, on your own data, the per-item lookup and read latency of featstore against the "
                    "legacy SHA256 cache (sha256(path + image bytes) then exists / torch.load) and the "
                    "path-concatenation check (exists(image + '.vggt_cache.pt')), on up to --samples sources with "
                    "valid entries. Prints a table with ratios. Legacy reads use torch.save copies of the sampled "
                    "entries, written beside the cache for the run and removed after.",
        epilog="example:\n  featstore bench /data --feature vggt --samples 500")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, default="vggt")
    p.add_argument("--samples", type=at_least(1), default=200, help="sources to measure (default: 200)")
    p.add_argument("--repeat", type=at_least(1), default=3, help="timed passes; the fastest is reported (default: 3)")
    add_json(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measures and prints the table (featstore.ops.bench)."""
    store = open_store(args, data_root(args, parser))
    found = find_sources(args, store)
    report = ops.bench(store, found.paths, samples=args.samples, repeat=args.repeat, threads=args.threads,
                       progress=None)
    emit(args, report.to_dict(), report.text())
    return 0
