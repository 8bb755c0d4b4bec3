"""What the commands share: their common arguments, opening the store, finding the sources,
printing text or JSON, and the help formatter."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from featstore import env
from featstore.errors import DataRootError
from featstore.history import recorded_history
from featstore.manifest import manifest_features
from featstore.ops.features import require_feature
from featstore.packs import parse_size
from featstore.scan import ScanResult, nothing_found, scan
from featstore.sets import recorded_mode
from featstore.store import FeatureStore
from featstore.vocabulary import check_feature_name, sidecar_suffix

if TYPE_CHECKING:
    #: What ``register`` of each command module adds its parsers to.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def at_least(low: int) -> Callable[[str], int]:
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


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def size(text: str) -> int:
    """An argparse type: a size in bytes, such as ``512MiB`` or ``2GiB``."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog as its own paragraph; keeps indented lines
    (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith("  ") or not line.strip()
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` under the top-level ``parser`` (a handler gets the top-level one),
    so that ``parser.error`` shows the command's usage; ``parser`` itself when it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]  # type: ignore[no-any-return]
    return parser


def add_data_root(p: argparse.ArgumentParser) -> None:
    """DATA_ROOT, positional or as --data-root / --data_root (the old scripts' flag)."""
    p.add_argument("data_root", nargs="?", metavar="DATA_ROOT",
                   help="the dataset directory (default: $DATA_ROOT)")
    p.add_argument("--data-root", "--data_root", dest="data_root_flag", metavar="DIR", help=argparse.SUPPRESS)


def add_feature(p: argparse.ArgumentParser, required: bool, default: str | None = None,
                note: str | None = None) -> None:
    """The "feature" group: which feature's entries, where they are, which fingerprint. ``note``
    says what happens without --feature (default: said from ``required`` and ``default``)."""
    g = p.add_argument_group("feature")
    if note is None:
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


def add_sources(p: argparse.ArgumentParser) -> None:
    """The "sources" group: which files under the data root a command works on."""
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
    g.add_argument("--threads", type=at_least(1), default=None, help="worker threads (default: one per core)")


def add_json(p: argparse.ArgumentParser, text: str = "print one JSON document instead of text") -> None:
    """--json, which every command has."""
    p.add_argument("--json", action="store_true", help=text)


def data_root(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """DATA_ROOT, --data-root or $DATA_ROOT; a usage error when none is given."""
    root = args.data_root or args.data_root_flag or env.data_root()
    if not root:
        parser.error("give DATA_ROOT (or set $DATA_ROOT)")
    return str(root)


def cache_dir(args: argparse.Namespace, feature: str | None) -> str | None:
    """--cache-dir, else $VGGT_CACHE_DIR for vggt (the old scripts' variable) unless --layout
    sidecar; an error when --layout dir has neither."""
    directory: str | None = args.cache_dir
    if directory is None and feature == "vggt" and args.layout != "sidecar":
        directory = env.vggt_cache_dir()
    if args.layout == "dir" and directory is None:
        raise DataRootError("--layout dir needs --cache-dir DIR (where the entries go)")
    return directory


def only_feature(args: argparse.Namespace, root: str, command: str) -> str:
    """--feature (an error naming the features there when it has no manifest and no entries: a
    typo must not look like success), else the one feature with a manifest under ``root`` (or
    --cache-dir), said on stderr; a DataRootError naming the features found (or that none was)
    otherwise."""
    if args.feature:
        check_feature_name(args.feature)  # a name that cannot be a feature is a usage error first
        directory = cache_dir(args, args.feature)
        if os.path.isdir(root):  # a missing root is the store's to report
            require_feature(os.path.abspath(root), os.path.abspath(directory) if directory else None, args.feature)
        return str(args.feature)
    if not os.path.isdir(root):  # before looking for manifests in it
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise DataRootError(f"data root {os.path.abspath(root)} {what}; pass the dataset's top directory")
    directory = args.cache_dir
    features = manifest_features(os.path.abspath(root), os.path.abspath(directory) if directory else None)
    where = directory or root
    if len(features) == 1:
        print(f"featstore {command}: --feature {features[0]} (the only feature with a manifest in {where})",
              file=sys.stderr)
        return features[0]
    if not features:
        raise DataRootError(f"no feature has a manifest in {where}: pass --feature F (e.g. --feature vggt)")
    raise DataRootError(f"{len(features)} features have a manifest in {where} ({', '.join(features)}): "
                        "pass --feature F with one of them")


def open_store(args: argparse.Namespace, root: str) -> FeatureStore:
    """The store of --feature under ``root``, with the layout, cache directory and fingerprint
    the options give."""
    return FeatureStore(root, args.feature, layout=args.layout or "sidecar", cache_dir=cache_dir(args, args.feature),
                        fingerprint=args.fingerprint)


def find_sources(args: argparse.Namespace, store: FeatureStore | None, *, allow_empty: bool = False,
                 root: str = "", entry_names: bool = False) -> ScanResult:
    """Scans the store's data root (or ``root`` without a store) for the sources the options
    select; finding none is an error unless ``allow_empty``. Without --jsonl, a feature whose
    frame sets or histories came from a ``.jsonl`` field (its manifest says so) is scanned with that
    field. ``entry_names``: a tree walk also lists the feature's sidecar entries in ``named``
    (what ``status`` counts orphans among), so nothing walks the tree a second time, and the
    sources' stamps, so that nothing stats them a second time."""
    skip = store.cache_dir if store is not None else None
    where = store.data_root if store is not None else root
    jsonl = args.jsonl
    if jsonl is None and store is not None:
        mode = recorded_mode(store) or recorded_history(store)
        jsonl = mode.jsonl if mode is not None else None
    named = (sidecar_suffix(store.feature) if entry_names and store is not None and store.layout == "sidecar"
             and jsonl is None and args.files_from is None else None)
    found = scan(where, extensions=args.ext, jsonl=jsonl, follow_symlinks=args.follow_symlinks,
                 files_from=args.files_from, skip_dirs=[skip] if skip else [], threads=args.threads, progress=None,
                 named_suffix=named, stamps=entry_names)
    if store is not None and named is None:  # a walk naming the entries already left them out
        found = found.without_entries_of(store.feature)
    if len(found) == 0 and not allow_empty:
        raise nothing_found(found, extensions=args.ext, jsonl=jsonl, files_from=args.files_from)
    return found


def emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    """Prints ``doc`` as JSON under --json, else ``text``."""
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text)
