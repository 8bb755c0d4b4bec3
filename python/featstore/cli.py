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

from featstore import env
from featstore.errors import DataRootError, FeatstoreError, NoImagesFoundError


def _at_least(low: int) -> Any:
    """An argparse type: a whole number of at least ``low`` (argparse names the flag on error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root", nargs="?", metavar="DATA_ROOT",
                   help="the dataset directory (default: $DATA_ROOT)")
    p.add_argument("--data-root", "--data_root", dest="data_root_flag", metavar="DIR", help=argparse.SUPPRESS)


def _add_feature(p: argparse.ArgumentParser, required: bool, default: str | None = None) -> None:
    g = p.add_argument_group("feature")
    note = "" if required else f" (default: {default})" if default else " (counts entry states)"
    g.add_argument("--feature", required=required, metavar="F", default=default,
                   help="feature name, e.g. vggt, pixel_latent" + note)
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
    g.add_argument("--threads", type=_at_least(1), default=None, help="worker threads (default: one per core)")


def _data_root(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    root = args.data_root or args.data_root_flag or env.data_root()
    if not root:
        parser.error("give DATA_ROOT (or set $DATA_ROOT)")
    return str(root)


def _cache_dir(args: argparse.Namespace, feature: str | None) -> str | None:
    """--cache-dir, else $VGGT_CACHE_DIR for vggt (the old scripts' variable) unless --layout
    sidecar; an error when --layout dir has neither."""
    cache_dir = args.cache_dir
    if cache_dir is None and feature == "vggt" and args.layout != "sidecar":
        cache_dir = env.vggt_cache_dir()
    if args.layout == "dir" and cache_dir is None:
        raise DataRootError("--layout dir needs --cache-dir DIR (where the entries go)")
    return cache_dir


def _open_store(args: argparse.Namespace, root: str) -> Any:
    from featstore.store import FeatureStore

    cache_dir = _cache_dir(args, args.feature)
    return FeatureStore(root, args.feature, layout=args.layout or "sidecar", cache_dir=cache_dir,
                        fingerprint=args.fingerprint)


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text)


def _no_sources(args: argparse.Namespace, found: Any) -> NoImagesFoundError:
    from featstore.scan import nothing_found

    return nothing_found(found, extensions=args.ext, jsonl=args.jsonl, files_from=args.files_from)


def _find_sources(args: argparse.Namespace, store: Any, *, allow_empty: bool = False, root: str = "") -> Any:
    """Scans the store's data root (or ``root`` without a store) for the sources the options
    select (a ``ScanResult``)."""
    from featstore.scan import scan

    cache_dir = store.cache_dir if store is not None else None
    where: str = store.data_root if store is not None else root
    found = scan(where, extensions=args.ext, jsonl=args.jsonl,
                 follow_symlinks=args.follow_symlinks, files_from=args.files_from,
                 skip_dirs=[cache_dir] if cache_dir else [], threads=args.threads, progress=None)
    if len(found) == 0 and not allow_empty:
        raise _no_sources(args, found)
    return found


def cmd_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore.fmt import error_lines, human_bytes

    root = _data_root(args, parser)
    if args.write_manifest and not args.feature:
        parser.error("--write-manifest needs --feature")
    store = _open_store(args, root) if args.feature else None
    t0 = time.perf_counter()
    found = _find_sources(args, store, root=root)
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
        status = store.status(found.paths, threads=args.threads, progress=None)
        doc["feature"] = status.to_dict()
        lines.append(f"feature {store.feature} ({store.layout} layout, fingerprint {store.fingerprint or 'any'}):")
        lines.append("  " + "  ".join(f"{s} {n:,}" for s, n in status.counts.items()))
        if args.write_manifest:
            doc["manifest"] = store.write_manifest(status, found.paths)
            lines.append(f"manifest written: {doc['manifest']}")
    if found.errors:
        lines.extend(error_lines(found.errors, "paths could not be scanned"))
    _emit(args, doc, "\n".join(lines))
    return 0


def cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import ops

    store = _open_store(args, _data_root(args, parser))
    merged = ops.merge_leftover_journals(store)
    if merged:
        print(f"featstore status: merged {merged} journal(s) left by an earlier run into {store.manifest_path}",
              file=sys.stderr)
        store = _open_store(args, store.data_root)  # seeded from the merged index
    found = _find_sources(args, store)
    report = ops.status(store, found.paths, threads=args.threads, progress=None)
    report.status.errors[:0] = found.errors
    _emit(args, report.to_dict(), report.text())
    return 0


def _explain_root(args: argparse.Namespace, paths: list[str]) -> tuple[str, str]:
    """The data root for ``explain`` and where it came from: --data-root or $DATA_ROOT, else the
    data root recorded in the cache directory's manifest, else the nearest directory above the
    first path holding the feature's manifest, else that path's directory."""
    root = args.data_root_flag or env.data_root()
    if root:
        return root, ""
    cache_dir = _cache_dir(args, args.feature)
    if cache_dir is not None:
        manifest = os.path.join(cache_dir, args.feature, "manifest.json")
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


def cmd_explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import explain

    root, why = _explain_root(args, args.paths)
    store = _open_store(args, root)
    if why:
        print(f"featstore explain: data root {store.data_root} ({why})", file=sys.stderr)
    found = []
    for p in args.paths:
        # Relative to the data root, as in the API; else, when it exists there, to the working
        # directory (a deleted source is still named relative to the root).
        if not os.path.isabs(p) and not os.path.lexists(os.path.join(store.data_root, p)) and os.path.lexists(p):
            p = os.path.abspath(p)
        found.append(explain.explain(store, p))
    _emit(args, {"data_root": store.data_root, "explanations": [e.to_dict() for e in found]},
          "\n".join(e.text() for e in found))
    return 0 if all(e.hit for e in found) else 1


def cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import ops

    store = _open_store(args, _data_root(args, parser))
    found = _find_sources(args, store)
    report = ops.verify(store, found.paths, quarantine_bad=args.quarantine, threads=args.threads, progress=None)
    report.errors[:0] = found.errors
    _emit(args, report.to_dict(), report.text())
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import ops

    store = _open_store(args, _data_root(args, parser))
    found = _find_sources(args, store, allow_empty=args.force)
    report = ops.plan_gc(store, found.paths, keep_fingerprints=args.keep_fingerprint or (),
                         min_tmp_age_s=args.min_tmp_age, force=args.force, threads=args.threads, progress=None)
    if not args.dry_run:
        ops.execute_gc(store, report, progress=None)
    report.errors[:0] = found.errors
    _emit(args, report.to_dict(), report.text())
    return 1 if report.errors else 0


def cmd_migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import ops

    if args.delete_old and not args.yes:
        parser.error("--delete-old needs --yes (without it migrate only shows its plan)")
    store = _open_store(args, _data_root(args, parser))
    legacy_dirs = args.legacy_dir
    if legacy_dirs is None:
        env_cache_dir = env.vggt_cache_dir()
        legacy_dirs = [env_cache_dir] if env_cache_dir and os.path.isdir(env_cache_dir) else []
    found = _find_sources(args, store)
    report = ops.plan_migrate(store, found.paths, legacy_dirs=legacy_dirs, old_roots=args.old_root or (),
                              threads=args.threads, progress=None)
    if args.yes:
        ops.execute_migrate(store, report, delete_old=args.delete_old, progress=None)
    _emit(args, report.to_dict(), report.text())
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore import ops

    store = _open_store(args, _data_root(args, parser))
    found = _find_sources(args, store)
    report = ops.bench(store, found.paths, samples=args.samples, repeat=args.repeat, threads=args.threads,
                       progress=None)
    _emit(args, report.to_dict(), report.text())
    return 0


class _ParagraphFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog as its own paragraph; keeps indented lines
    (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(indent + line if line.startswith("  ") or not line.strip()
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _add_ops_commands(sub: Any) -> None:
    """status, explain, verify, gc, migrate, bench: operating a cache (logic in featstore.ops)."""
    from featstore.ops import DEFAULT_MIN_TMP_AGE_S  # ops does not import torch

    raw = _ParagraphFormatter

    p = sub.add_parser(
        "status", help="count entries per state (fast: no entry opened)", formatter_class=raw,
        description="Count the entries of a feature per state: valid, missing, stale (an input changed), foreign "
                    "(another encoder fingerprint), orphan (the source is gone), legacy (old .vggt_cache.pt).\n"
                    "Costs two stats per source; sources in the feature's manifest index open no entry. Finding "
                    "corrupt entries needs `featstore verify`, which reads them all. Writes nothing.",
        epilog="example:\n  featstore status /data --feature vggt\n  featstore status /data --feature pixel_latent "
               "--cache-dir /cache --json")
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=True)
    _add_json(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "explain", help="say why a source's lookup hits or misses", formatter_class=raw,
        description="Say why a lookup of each PATH hits or misses: the entry state, the entry file, and for a stale "
                    "entry the recorded and current stamp of the input that changed and whether its bytes differ; "
                    "for a foreign entry both fingerprints; for a corrupt one the parse error.\n"
                    "PATH is relative to the data root, or absolute, or relative to the working directory when it "
                    "exists there. Without --data-root the root is found from the feature's manifest.\n"
                    "Exit code 0 when every lookup hits, 1 when one misses.",
        epilog="example:\n  featstore explain scene001/img_0001.jpg --data-root /data --feature vggt")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a source image (or several)")
    p.add_argument("--data-root", "--data_root", dest="data_root_flag", metavar="DIR",
                   help="the dataset directory (default: $DATA_ROOT, else found from the manifest)")
    _add_feature(p, required=True)
    _add_json(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "verify", help="read every entry in full and report the bad ones", formatter_class=raw,
        description="Open every entry: validate its header and shapes, check its data against data.blake3, "
                    "compare its fingerprint, source stamp (and digest) and inputs, whatever the manifest index "
                    "says. Legacy sidecars are unpickled safely (weights_only). Reports each bad entry (corrupt, "
                    "stale, foreign, orphan) with its reason; exit code 1 when there is one.\n"
                    "--quarantine moves bad entries into <data root or cache dir>/.featstore/<feature>/quarantine/, "
                    "keeping their relative names; nothing is deleted.",
        epilog="example:\n  featstore verify /data --feature vggt --quarantine")
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=True)
    p.add_argument("--quarantine", action="store_true", help="move bad entries aside (never deletes)")
    _add_json(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "gc", help="remove orphaned, stale and foreign entries and leftover temporary files", formatter_class=raw,
        description="Remove this feature's orphaned entries (source gone), stale entries (an input changed), "
                    "foreign entries (another fingerprint; keep some with --keep-fingerprint) and temporary files "
                    "left by interrupted writes. Only files named like this feature's entries whose header says "
                    "they are featstore entries, and featstore's own .<name>.<random>.tmp files, are ever removed: "
                    "never a source, never a legacy file (see migrate), never a corrupt entry (see verify "
                    "--quarantine).\n--dry-run lists what would go and sums the bytes.",
        epilog="example:\n  featstore gc /data --feature vggt --dry-run\n  featstore gc /data --feature vggt "
               "--keep-fingerprint 3f2a9c...")
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=True)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="list what would be removed and the bytes; remove nothing")
    p.add_argument("--keep-fingerprint", nargs="+", action="extend", metavar="FP",
                   help="keep foreign entries with these fingerprints")
    p.add_argument("--min-tmp-age", type=float, default=DEFAULT_MIN_TMP_AGE_S, metavar="SECONDS",
                   help="leave temporary files younger than this: a write may be in progress "
                        f"(default: {DEFAULT_MIN_TMP_AGE_S:.0f})")
    p.add_argument("--force", action="store_true",
                   help="gc even a root the cache seems not made for: not the data root its manifest records, "
                        "or one where every entry would be an orphan")
    _add_json(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "migrate", help="convert old .vggt_cache.pt sidecars and SHA256-named caches into entries",
        formatter_class=raw,
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
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=False, default="vggt")
    p.add_argument("--legacy-dir", "--legacy_dir", dest="legacy_dir", action="append", metavar="DIR",
                   help="a SHA256-named legacy cache directory (repeatable; default: $VGGT_CACHE_DIR when set)")
    p.add_argument("--old-root", "--old_root", dest="old_root", action="append", metavar="PREFIX",
                   help="the data root as the old loader saw it, when the data moved (repeatable)")
    p.add_argument("--yes", action="store_true", help="convert (without it, only the plan is shown)")
    p.add_argument("--delete-old", action="store_true", help="delete each legacy file once its entry is written")
    _add_json(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "bench", help="measure lookup and read latency against the schemes featstore replaces",
        formatter_class=raw,
        description="Measure, on your own data, the per-item lookup and read latency of featstore against the "
                    "legacy SHA256 cache (sha256(path + image bytes) then exists / torch.load) and the "
                    "path-concatenation check (exists(image + '.vggt_cache.pt')), on up to --samples sources with "
                    "valid entries. Prints a table with ratios. Legacy reads use torch.save copies of the sampled "
                    "entries, written beside the cache for the run and removed after.",
        epilog="example:\n  featstore bench /data --feature vggt --samples 500")
    _add_data_root(p)
    _add_sources(p)
    _add_feature(p, required=False, default="vggt")
    p.add_argument("--samples", type=_at_least(1), default=200, help="sources to measure (default: 200)")
    p.add_argument("--repeat", type=_at_least(1), default=3, help="timed passes; the fastest is reported (default: 3)")
    _add_json(p)
    p.set_defaults(func=cmd_bench)


_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


def cmd_precompute(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore.fmt import human_bytes
    from featstore.pipeline import parse_shard, precompute

    root = _data_root(args, parser)
    try:  # checked before anything loads: a typo should not cost a model load
        parse_shard(args.shard)
    except ValueError as exc:
        parser.error(str(exc))
    cache_dir = _cache_dir(args, args.feature or args.encoder)
    options: dict[str, Any] = {}
    if args.encoder == "vggt":
        import torch

        options = {"model_path": args.vggt_model_path, "layers": tuple(args.layers), "tokens": args.tokens,
                   "mode": args.mode, "frames_per_set": args.frames_per_set}
        if args.dtype:
            options["dtype"] = getattr(torch, _DTYPES[args.dtype])
        if args.random_weights:
            options["random_weights_seed"] = 0
    elif args.frames_per_set != 1:
        parser.error("--frames-per-set applies to the vggt encoder")
    try:
        s = precompute(root, encoder=args.encoder, feature=args.feature, layout=args.layout or "sidecar",
                       cache_dir=cache_dir, device=args.device, batch_size=args.batch_size,
                       num_workers=args.num_workers, skip_existing=args.skip_existing, overwrite=args.overwrite,
                       start_idx=args.start_idx, end_idx=args.end_idx, shard=args.shard, files_from=args.files_from,
                       extensions=args.ext, jsonl=args.jsonl, dry_run=args.dry_run, force=args.force,
                       durable=not args.no_durable, progress=None if not args.json else False,
                       encoder_options=options, model_path=args.model_path)
    except KeyboardInterrupt as exc:
        done = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        print(f"featstore precompute: interrupted after {done.get('written', 0)} entries; every entry on disk is "
              "complete, and a rerun continues where this one stopped", file=sys.stderr)
        return 130
    enc = s["encoder"]
    what = (f"{enc.get('name')} ({'TINY VGGT WITH RANDOM WEIGHTS: meaningless features, for trying featstore'})"
            if enc.get("random_weights") else
            f"{enc.get('name')} ({enc.get('model_path')}, layers {enc.get('layers')}, {enc.get('tokens')} tokens, "
            f"{enc.get('dtype')}, {enc.get('mode')})" if enc.get("name") == "vggt" else enc.get("name"))
    lines = [f"featstore precompute: feature {s['feature']} with {what} on {s['device']}"]
    est = s["estimated_bytes"]
    lines.append(f"plan: {s['selected']:,} of {s['sources']:,} sources selected, {s['skipped']:,} already valid, "
                 f"{s['planned']:,} to compute" + (f", about {human_bytes(est)}" if est is not None else "")
                 + f" ({human_bytes(s['free_bytes'])} free); planned in {1000 * s['plan_seconds']:.0f} ms")
    if enc.get("name") == "vggt":
        lines.append(f"note: {s['note']}")
    if args.dry_run:
        lines.append("dry run: nothing loaded, nothing written")
    elif s["planned"] == 0:
        lines.append("nothing to do: every selected entry is valid")
    else:
        stages = s.get("stage_seconds", {})
        total = sum(stages.values()) or 1.0
        lines.append(f"done: {s['written']:,} written ({human_bytes(s['bytes_written'])}), {s['failed']:,} failed in "
                     f"{s['seconds']:.1f} s ({s['images_per_second']} images/s); main-process time: "
                     + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items()))
        for rel, why in s["failures"][:10]:
            lines.append(f"  failed {rel}: {why}")
    if s.get("manifest"):
        lines.append(f"manifest: {s['manifest']}")
    _emit(args, s, "\n".join(lines))
    return 1 if s.get("failed") else 0


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from featstore.demo import run_demo

    quiet = args.json
    summary = run_demo(args.directory, images=args.images, say=(lambda *_: None) if quiet else print,
                       progress=None if not quiet else False)
    if quiet:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _add_precompute_commands(sub: Any) -> None:
    p = sub.add_parser(
        "precompute", help="compute and store an encoder's features for every image",
        description="Compute the features of every image under DATA_ROOT that has no valid entry (missing, stale, "
                    "foreign, corrupt) and store them: decoding in worker processes, batches of equal shape on the "
                    "device, a background writer, a journal a rerun continues from. Run it again at any time: "
                    "it computes only what changed.",
        epilog="examples:\n"
               "  featstore precompute /data/train --vggt-model-path /models/VGGT-1B\n"
               "  featstore precompute /data/train --dry-run\n"
               "  torchrun --nproc_per_node 8 -m featstore.cli precompute /data/train   # one rank per GPU\n"
               "  featstore precompute /data/train --shard 0/4   # ... and 1/4, 2/4, 3/4 anywhere\n"
               "  featstore precompute /data/train --encoder mypkg.enc:make --feature dino\n"
               "environment: " + ", ".join(env.PRECOMPUTE_VARIABLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_root(p)
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default="vggt", help="vggt (default) or module.path:callable returning an encoder "
                   "or an nn.Module")
    g.add_argument("--vggt-model-path", "--vggt_model_path", dest="vggt_model_path", default=None, metavar="PATH",
                   help="VGGT-1B weights: model.pt/.safetensors or its directory (default: $VGGT_MODEL_PATH)")
    g.add_argument("--model-path", "--model_path", dest="model_path", default=None, metavar="PATH",
                   help="the model the features are for (recorded in the manifest, as the old scripts did)")
    g.add_argument("--layers", type=int, nargs="+", default=[-2], metavar="L",
                   help="VGGT aggregator layers to store (default -2: layer 22, read by JanusVLN-style models)")
    g.add_argument("--tokens", choices=("patch", "all"), default="patch", help="patch tokens only (default) or all")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="stored dtype (default: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU)")
    g.add_argument("--mode", choices=("crop", "pad"), default="crop", help="VGGT preprocessing (default crop)")
    g.add_argument("--frames-per-set", "--frames_per_set", dest="frames_per_set", type=_at_least(1), default=1,
                   metavar="N",
                   help="frames encoded together (default 1: every image alone, valid for single-frame use only)")
    g.add_argument("--random-weights", action="store_true",
                   help="a tiny VGGT with random weights instead of a checkpoint (trying featstore; features "
                        "mean nothing)")
    f = p.add_argument_group("where")
    f.add_argument("--feature", default=None, metavar="F", help="feature name (default: the encoder's, e.g. vggt)")
    f.add_argument("--layout", choices=("sidecar", "dir"), default=None,
                   help="sidecar: beside each image (default); dir: under --cache-dir")
    f.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None, metavar="DIR",
                   help="cache directory, for read-only datasets (default for vggt: $VGGT_CACHE_DIR)")
    _add_sources(p)
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="default $DEVICE, else cuda:0 when available, else cpu")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_at_least(1), default=None, metavar="N",
                   help="images per batch (default $BATCH_SIZE or 16; halved on CUDA out-of-memory)")
    r.add_argument("--num-workers", dest="num_workers", type=_at_least(0), default=None, metavar="N",
                   help="decoding processes (default: per core on CPU, cores - 1 with a GPU)")
    r.add_argument("--skip-existing", "--skip_existing", dest="skip_existing", action=argparse.BooleanOptionalAction,
                   default=None, help="skip images whose entry is valid (default: on, or $SKIP_EXISTING)")
    r.add_argument("--overwrite", action="store_true", help="recompute every selected image")
    r.add_argument("--start-idx", "--start_idx", dest="start_idx", type=int, default=None, metavar="I",
                   help="first index of the sorted source list")
    r.add_argument("--end-idx", "--end_idx", dest="end_idx", type=int, default=None, metavar="J",
                   help="end index (exclusive) of the sorted source list")
    r.add_argument("--shard", default=None, metavar="I/N", help="every N-th source starting at I")
    r.add_argument("--dry-run", action="store_true", help="print the plan (counts, bytes, free space) and stop")
    r.add_argument("--force", action="store_true", help="start even if the estimate exceeds the free space")
    r.add_argument("--no-durable", action="store_true", help="do not fsync entries (faster, less safe on power loss)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser(
        "demo", help="run the whole job on a generated example",
        description="Write a small image tree, precompute VGGT features with a tiny VGGT with random weights (the "
                    "pipeline is real, the features mean nothing), rerun, edit an image, show the entry states and "
                    "time lookups against the SHA256 cache scheme featstore replaces.")
    p.add_argument("directory", nargs="?", default=None, help="where to work (default: a new temporary directory)")
    p.add_argument("--images", type=_at_least(2), default=24, help="how many images (default 24)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_demo)


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
    _add_precompute_commands(sub)
    _add_ops_commands(sub)
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
    except (ValueError, TypeError) as exc:  # a bad argument value found past argparse
        print(f"featstore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
