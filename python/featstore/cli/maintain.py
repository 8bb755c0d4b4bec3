"""``featstore verify``, ``gc``, ``pack`` and ``migrate``: the commands that may change a cache
(verify --quarantine moves bad entries aside, gc removes, pack moves entries into packs, migrate
converts). The logic is in featstore.ops."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from featstore import env, ops
from featstore.cli.common import (
    ParagraphFormatter,
    add_data_root,
    add_feature,
    add_json,
    add_sources,
    data_root,
    emit,
    find_sources,
    only_feature,
    open_store,
    seconds,
    size,
)
from featstore.packs import DEFAULT_TARGET_SIZE

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    """Adds ``verify``, ``gc``, ``pack`` and ``migrate``."""
    p = sub.add_parser(
        "verify", help="read every entry in full and report the bad ones", formatter_class=ParagraphFormatter,
        description="Open every entry: validate its header and shapes, check its data against data.blake3, "
                    "compare its fingerprint, source stamp (and digest) and inputs, whatever the manifest index "
                    "says. Legacy sidecars are unpickled safely (weights_only). Reports each bad entry (corrupt, "
                    "stale, foreign, orphan) with its reason; exit code 1 when there is one.\n"
                    "--quarantine moves bad entries into <data root or cache dir>/.featstore/<feature>/quarantine/, "
                    "keeping their relative names; nothing is deleted.",
        epilog="example:\n  featstore verify /data --feature vggt --quarantine")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, note=" (default: the feature, when the root has one manifest)")
    p.add_argument("--quarantine", action="store_true", help="move bad entries aside (never deletes)")
    add_json(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "gc", help="remove orphaned, stale and foreign entries and leftover temporary files",
        formatter_class=ParagraphFormatter,
        description="Remove this feature's orphaned entries (source gone), stale entries (an input changed), "
                    "foreign entries (another fingerprint; keep some with --keep-fingerprint), frame-set and history "
                    "entries whose frames are gone or changed, and temporary files "
                    "left by interrupted writes. Only files named like this feature's entries whose header says "
                    "they are featstore entries, and featstore's own .<name>.<random>.tmp files, are ever removed: "
                    "never a source, never a legacy file (see migrate), never a corrupt entry (see verify "
                    "--quarantine).\n--dry-run lists what would go and sums the bytes.",
        epilog="example:\n  featstore gc /data --feature vggt --dry-run\n  featstore gc /data --feature vggt "
               "--keep-fingerprint 3f2a9c...")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, note=" (default: the feature, when the root has one manifest)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="list what would be removed and the bytes; remove nothing")
    p.add_argument("--keep-fingerprint", nargs="+", action="extend", metavar="FP",
                   help="keep foreign entries with these fingerprints")
    p.add_argument("--min-tmp-age", type=seconds, default=ops.DEFAULT_MIN_TMP_AGE_S, metavar="SECONDS",
                   help="leave temporary files younger than this: a write may be in progress "
                        f"(default: {ops.DEFAULT_MIN_TMP_AGE_S:.0f})")
    p.add_argument("--force", action="store_true",
                   help="gc even a root the cache seems not made for: not the data root its manifest records, "
                        "or one where every entry would be an orphan")
    add_json(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "pack", help="move valid entries into a few large packs (for millions of entries)",
        formatter_class=ParagraphFormatter,
        description="Move this feature's valid entries out of their own files into packs under <data root or "
                    "cache dir>/.featstore/<feature>/packs/: immutable files of about --target-size each, every "
                    "entry a complete entry at its own offset, so that ten million entries live in a few thousand "
                    "files. Lookups, get, read_batch, CachedDataset, status, verify, gc and explain work the same "
                    "on packed entries (read from the mapped pack, zero-copy), with every check kept.\n"
                    "Only valid entries whose data matches its checksum are packed. The packs and the index that "
                    "locates their entries are made durable before any entry file is removed, and a file is "
                    "removed only while it is the one copied: a run killed at any point loses nothing. An entry "
                    "written later (a precompute after an edit) goes to its own file again and is preferred; run "
                    "pack again to move it. Refused while a precompute of the feature runs.",
        epilog="example:\n  featstore pack /data --feature vggt\n  featstore pack /data --feature vggt --cache-dir "
               "/cache --target-size 512MiB --json")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, note=" (default: the feature, when the root has one manifest)")
    p.add_argument("--target-size", type=size, default=DEFAULT_TARGET_SIZE, metavar="SIZE",
                   help="seal a pack once it holds this much, e.g. 512MiB or 2GiB (default: 2GiB)")
    add_json(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "migrate", help="convert old .vggt_cache.pt sidecars and SHA256-named caches into entries",
        formatter_class=ParagraphFormatter,
        description="Convert legacy caches into featstore entries: <image>.vggt_cache.pt sidecars, and SHA256-named "
                    "cache directories (--legacy-dir DIR holding <sha256(path + image bytes)[:16]>.pt, with or "
                    "without a manifest.json). The hash-to-path map is rebuilt by computing the old key of every "
                    "source in parallel, for the path as the old loader passed it: <DATA_ROOT>/<relative path>, "
                    "and <PREFIX>/<relative path> for each --old-root PREFIX when the data moved.\n"
                    "Refuses legacy sidecars older than their image and any pickle that is not plain tensors (it "
                    "is never unpickled with code execution); reports files that match no source.\n"
                    "Shows its plan and writes only with --yes; never deletes the old cache unless --delete-old.",
        epilog="example:\n  featstore migrate /data --legacy-dir /old/vggt_cache --old-root /mnt/nfs/data\n"
               "  featstore migrate /data --legacy-dir /old/vggt_cache --old-root /mnt/nfs/data --yes")
    add_data_root(p)
    add_sources(p)
    add_feature(p, required=False, default="vggt")
    p.add_argument("--legacy-dir", "--legacy_dir", dest="legacy_dir", action="append", metavar="DIR",
                   help="a SHA256-named legacy cache directory (repeatable; default: $VGGT_CACHE_DIR when set)")
    p.add_argument("--old-root", "--old_root", dest="old_root", action="append", metavar="PREFIX",
                   help="the data root as the old loader saw it, when the data moved (repeatable)")
    p.add_argument("--yes", action="store_true", help="convert (without it, only the plan is shown)")
    p.add_argument("--delete-old", action="store_true", help="delete each legacy file once its entry is written")
    add_json(p)
    p.set_defaults(func=cmd_migrate)


def cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Reads every entry, quarantining bad ones with --quarantine; exit code 1 when one is bad
    or could not be checked."""
    root = data_root(args, parser)
    args.feature = only_feature(args, root, "verify")
    store = open_store(args, root)
    found = find_sources(args, store)
    report = ops.verify(store, found.paths, quarantine_bad=args.quarantine, threads=args.threads, progress=None)
    report.errors[:0] = found.errors
    emit(args, report.to_dict(), report.text())
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Plans the removals and, unless --dry-run, makes them; exit code 1 on an error."""
    root = data_root(args, parser)
    args.feature = only_feature(args, root, "gc")
    store = open_store(args, root)
    found = find_sources(args, store, allow_empty=args.force)
    report = ops.plan_gc(store, found.paths, keep_fingerprints=args.keep_fingerprint or (),
                         min_tmp_age_s=args.min_tmp_age, force=args.force, threads=args.threads, progress=None)
    if not args.dry_run:
        ops.execute_gc(store, report, progress=None)
    report.errors[:0] = found.errors
    emit(args, report.to_dict(), report.text())
    return 1 if report.errors else 0


def cmd_pack(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Moves valid entries into packs; exit code 1 when a source could not be listed or an entry
    that is valid could not be packed."""
    root = data_root(args, parser)
    args.feature = only_feature(args, root, "pack")
    store = open_store(args, root)
    found = find_sources(args, store)
    report = ops.pack(store, found.paths, target_size=args.target_size, progress=None)
    emit(args, report.to_dict(), report.text())
    return 1 if found.errors or report.skipped else 0


def cmd_migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Plans the conversion and, with --yes, makes it; exit code 1 when a file was refused, matched
    no source or failed, or there was nothing to migrate."""
    if args.delete_old and not args.yes:
        parser.error("--delete-old needs --yes (without it migrate only shows its plan)")
    store = open_store(args, data_root(args, parser))
    legacy_dirs = args.legacy_dir
    if legacy_dirs is None:
        env_cache_dir = env.vggt_cache_dir()
        legacy_dirs = [env_cache_dir] if env_cache_dir and os.path.isdir(env_cache_dir) else []
    found = find_sources(args, store)
    report = ops.plan_migrate(store, found.paths, legacy_dirs=legacy_dirs, old_roots=args.old_root or (),
                              threads=args.threads, progress=None)
    if args.yes:
        ops.execute_migrate(store, report, delete_old=args.delete_old, progress=None)
    emit(args, report.to_dict(), report.text())
    return 0 if report.ok else 1
