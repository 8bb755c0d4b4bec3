"""The ``featstore`` command line.

Every command has ``--help`` and ``--json``; exit codes: 0 success, 1 when some items failed or
nothing was found to work on, 2 on a usage error (including a data root that does not exist).
Flags of the scripts featstore replaces keep working as aliases (``--data_root``, ``--cache_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from featstore.errors import DataRootError, FeatstoreError, NoImagesFoundError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root", nargs="?", metavar="DATA_ROOT",
                   help="the dataset directory (default: $DATA_ROOT)")
    p.add_argument("--data-root", "--data_root", dest="data_root_flag", metavar="DIR", help=argparse.SUPPRESS)


def _add_feature(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("feature")
    g.add_argument("--feature", required=required, metavar="F",
                   help="feature name, e.g. vggt, pixel_latent" + ("" if required else " (counts entry states)"))
    g.add_argument("--layout", choices=("sidecar", "dir"), default=None,
                   help="sidecar: <image>.<feature>.safetensors beside each image (default); "
                        "dir: entries under --cache-dir")
    g.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", metavar="DIR", default=None,
                   help="cache directory of the dir layout (default for vggt: $VGGT_CACHE_DIR)")
    g.add_argument("--fingerprint", default=None,
                   help="expected encoder fingerprint (default: the one in the feature's manifest)")


def _add_sources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sources")
    g.add_argument("--ext", nargs="+", metavar="EXT", default=None,
                   help="image extensions, any case (default: jpg jpeg png webp bmp tif tiff)")
    g.add_argument("--jsonl", metavar="FIELD", default=None,
                   help="take sources from this field of every line of the .jsonl files under the root "
                        "(a path or a list of paths, relative to the jsonl's folder or the root)")
    g.add_argument("--files-from", "--files_from", dest="files_from", metavar="FILE", default=None,
                   help="only the sources listed in FILE, one per line")
    g.add_argument("--no-follow-symlinks", dest="follow_symlinks", action="store_false",
                   help="do not follow symbolic links")
    g.add_argument("--threads", type=int, default=None, help="worker threads (default: one per core)")


def _data_root(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    root = args.data_root or args.data_root_flag or os.environ.get("DATA_ROOT")
    if not root:
        parser.error("give DATA_ROOT (or set $DATA_ROOT)")
    return str(root)


def _open_store(args: argparse.Namespace, root: str) -> Any:
    from featstore.store import FeatureStore

    cache_dir = args.cache_dir
    if cache_dir is None and args.feature == "vggt" and args.layout != "sidecar":
        cache_dir = os.environ.get("VGGT_CACHE_DIR") or None
    if args.layout == "dir" and cache_dir is None:
        raise DataRootError("--layout dir needs --cache-dir DIR (where the entries go)")
    return FeatureStore(root, args.feature, layout=args.layout or "sidecar", cache_dir=cache_dir,
                        fingerprint=args.fingerprint)


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text)


def cmd_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore.scan import DEFAULT_EXTENSIONS, scan

    root = _data_root(args, parser)
    if args.write_manifest and not args.feature:
        parser.error("--write-manifest needs --feature")
    store = _open_store(args, root) if args.feature else None
    skip = [store.cache_dir] if store is not None and store.cache_dir else []
    t0 = time.perf_counter()
    found = scan(root, extensions=args.ext, jsonl=args.jsonl, follow_symlinks=args.follow_symlinks,
                 files_from=args.files_from, skip_dirs=skip, threads=args.threads, progress=None)
    seconds = time.perf_counter() - t0
    if len(found) == 0:
        searched = (f"the field {args.jsonl!r} of the .jsonl files" if args.jsonl
                    else f"the files listed in {args.files_from}" if args.files_from
                    else "files with extensions " + ", ".join(args.ext or DEFAULT_EXTENSIONS))
        raise NoImagesFoundError(f"no images found under {found.root}: searched {searched}. Check DATA_ROOT, "
                                 "or pass --ext / --jsonl FIELD for other sources"
                                 + (f" ({len(found.errors)} paths could not be read, e.g. {found.errors[0][0]}: "
                                    f"{found.errors[0][1]})" if found.errors else ""))
    doc: dict[str, Any] = {
        "data_root": found.root, "sources": len(found), "bytes": found.total_bytes, "seconds": round(seconds, 3),
        "by_extension": {k: {"count": c, "bytes": b} for k, (c, b) in found.by_extension().items()},
        "sets": len(found.sets), "errors": [list(e) for e in found.errors],
    }
    lines = [f"{found.root}: {len(found):,} sources, {_human_bytes(found.total_bytes)} (scanned in {seconds:.2f} s)"]
    for ext, (count, nbytes) in found.by_extension().items():
        lines.append(f"  {ext or '(none)':8} {count:>10,}  {_human_bytes(nbytes):>10}")
    if found.sets:
        lines.append(f"  {len(found.sets):,} frame sets from .jsonl lists")
    if store is not None:
        status = store.status(found.paths, threads=args.threads, progress=None)
        doc["feature"] = status.to_dict()
        lines.append(f"feature {store.feature} ({store.layout} layout, fingerprint {store.fingerprint or 'any'}):")
        lines.append("  " + "  ".join(f"{s} {n:,}" for s, n in status.counts.items()))
        if args.write_manifest:
            doc["manifest"] = store.write_manifest(status, found.paths)
            lines.append(f"manifest written: {doc['manifest']}")
    if found.errors:
        lines.append(f"{len(found.errors):,} paths could not be scanned" + (" (first 10):" if len(found.errors) > 10 else ":"))
        lines.extend(f"  {p}: {why}" for p, why in found.errors[:10])
    _emit(args, doc, "\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featstore",
        description="Precompute frozen-encoder features once, store them beside the data, serve them zero-copy.",
        epilog="Run `featstore COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"featstore {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="find the sources under a data root and count entry states",
                       description="Find the sources (images by extension, or paths from .jsonl fields) under "
                                   "DATA_ROOT: counts and bytes per extension and, with --feature, how many entries "
                                   "are valid, missing, stale, ... Writes nothing unless --write-manifest.")
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=False)
    p.add_argument("--write-manifest", action="store_true",
                   help="write the feature's manifest (counts and an index of valid entries)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=cmd_scan)
    return parser


def _version() -> str:
    from featstore import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args, parser))
    except DataRootError as exc:
        print(f"featstore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FeatstoreError, OSError) as exc:
        print(f"featstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"featstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
