"""``featstore status`` and ``featstore explain``: what state a feature's entries are in, and why
one lookup hits or misses. Both only read; the logic is in featstore.ops and featstore.explain."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from featstore import env, explain, ops
from featstore.cli.common import (
    ParagraphFormatter,
    add_data_root,
    add_feature,
    add_json,
    add_sources,
    cache_dir,
    data_root,
    emit,
    find_sources,
    only_feature,
    open_store,
)
from featstore.errors import DataRootError
from featstore.roots import CWD, reading_of

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    """Adds ``status`` and ``explain``."""
    p = sub.add_parser(
        "status", help="count entries per state (fast: no entry opened)", formatter_class=ParagraphFormatter,
        description="Count the entries of a feature per state: valid, missing, stale (an input changed), foreign "
                    "(another encoder fingerprint), orphan (the source is gone), legacy (old .vggt_cache.pt).\n"
                    "Costs two stats per source; sources in the feature's manifest index open no entry. Finding "
                    "corrupt entries needs `featstore verify`, which reads them all. Writes nothing. A feature "
                    "precomputed in frame sets (--frames-per-set N, recorded in its manifest) is counted in sets, one "
                    "precomputed as histories (--history) in histories, one per sample.\n"
                    "Exit code 1 when some sources could not be checked.",
        epilog="example:\n  featstore status /data --feature vggt\n  featstore status /data --feature pixel_latent "
               "--cache-dir /cache --json")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, note=" (default: the feature, when the root has one manifest)")
    add_json(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "explain", help="say why a source's lookup hits or misses", formatter_class=ParagraphFormatter,
        description="Say why a lookup of each PATH hits or misses: the entry state, the entry file, and for a stale "
                    "entry the recorded and current stamp of the input that changed and whether its bytes differ; "
                    "for a foreign entry both fingerprints; for a corrupt one the parse error.\n"
                    "PATH is relative to the data root, or absolute, or relative to the working directory when it "
                    "exists there. Without --data-root the root is found from the feature's manifest.\n"
                    "--history: the PATHs are one history, oldest frame first (a sample of a causal model): say "
                    "why its history entry hits or misses, which frame changed or is gone, and the longest prefix "
                    "that is cached.\n"
                    "Exit code 0 when every lookup hits, 1 when one misses.",
        epilog="example:\n  featstore explain scene001/img_0001.jpg --data-root /data --feature vggt\n"
               "  featstore explain --history ep1/000.jpg ep1/001.jpg ep1/002.jpg --data-root /data --feature vggt")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a source image (or several)")
    p.add_argument("--history", action="store_true",
                   help="the PATHs are one history, oldest frame first: explain its history entry")
    p.add_argument("--data-root", "--data_root", dest="data_root_flag", metavar="DIR",
                   help="the dataset directory (default: $DATA_ROOT, else found from the manifest)")
    add_feature(p, required=True)
    add_json(p)
    p.set_defaults(func=cmd_explain)


def cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Counts entry states, first merging journals an interrupted precompute left."""
    root = data_root(args, parser)
    args.feature = only_feature(args, root, "status")
    store = open_store(args, root)
    inline = store._core.holds_inline_index  # a manifest of an earlier version: the merge upgrades it
    merged = ops.merge_leftover_journals(store)
    if merged:
        print(f"featstore status: merged {merged} journal(s) left by an earlier run into {store.manifest_path}",
              file=sys.stderr)
    if merged or inline:
        store = open_store(args, store.data_root)  # with the merged index
    if inline and not store._core.holds_inline_index:
        print(f"featstore status: moved the index of an earlier version's manifest into {store.index_dir}",
              file=sys.stderr)
    found = find_sources(args, store, entry_names=True)
    report = ops.status(store, found.paths, lists=found.sets, threads=args.threads, progress=None,
                        entries=found.named, stamps=found.stamps)
    report.status.errors[:0] = found.errors
    emit(args, report.to_dict(), report.text())
    return 1 if report.status.errors else 0  # some sources could not be checked


def cmd_explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Explains each PATH's lookup; exit code 1 when one misses."""
    root, why = _explain_root(args, args.paths)
    if not os.path.isdir(root):
        raise DataRootError(f"cannot tell the data root of {args.paths[0]}: {root} ({why}) does not exist; pass "
                            "--data-root DIR, the dataset's top directory (or set $DATA_ROOT)")
    only_feature(args, root, "explain")  # a mistyped --feature is an error, not "no entry"
    store = open_store(args, root)
    if why:
        print(f"featstore explain: data root {store.data_root} ({why})", file=sys.stderr)
    # The rule for paths users give (featstore.roots): relative to the data root, else to the
    # working directory when only that names a file in the root; both: an error naming both.
    paths = [os.path.abspath(p) if reading_of(store.data_root, p) == CWD else p for p in args.paths]
    found = [ops.explain_history(store, paths)] if args.history else [explain.explain(store, p) for p in paths]
    emit(args, {"data_root": store.data_root, "explanations": [e.to_dict() for e in found]},
         "\n".join(e.text() for e in found))
    return 0 if all(e.hit for e in found) else 1


def _explain_root(args: argparse.Namespace, paths: list[str]) -> tuple[str, str]:
    """The data root for ``explain`` and where it came from: --data-root or $DATA_ROOT, else the
    data root recorded in the cache directory's manifest, else the nearest directory above the
    first path holding the feature's manifest, else that path's directory."""
    root = args.data_root_flag or env.data_root()
    if root:
        return root, ""
    directory = cache_dir(args, args.feature)
    if directory is not None:
        manifest = os.path.join(directory, args.feature, "manifest.json")
        try:
            with open(manifest, encoding="utf-8") as f:
                recorded = json.load(f).get("data_root")
        except (OSError, ValueError):
            recorded = None
        if not recorded:
            raise DataRootError(f"explain with a cache directory needs --data-root DIR ({manifest} does not "
                                "record one)")
        return recorded, f"recorded in {manifest}"
    here = os.path.dirname(os.path.abspath(paths[0]))
    d = here
    while True:
        if os.path.exists(os.path.join(d, f"{args.feature}_cache_manifest.json")):
            return d, f"it holds {args.feature}_cache_manifest.json"
        parent = os.path.dirname(d)
        if parent == d:
            return here, "the path's directory; pass --data-root for the dataset's top directory"
        d = parent
