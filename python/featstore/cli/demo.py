"""``featstore demo``: the whole job on a generated example (featstore.demo)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from featstore.cli.common import add_json, at_least
from featstore.demo import run_demo

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    """Adds ``demo``."""
    p = sub.add_parser(
        "demo", help="run the whole job on a generated example",
        description="Write a small image tree, precompute VGGT features with a tiny VGGT with random weights (the "
                    "pipeline is real, the features mean nothing), rerun, edit an image, show the entry states and "
                    "time lookups against the SHA256 cache scheme featstore replaces.")
    p.add_argument("directory", nargs="?", default=None, help="where to work (default: a new temporary directory)")
    p.add_argument("--images", type=at_least(2), default=24, help="how many images (default 24)")
    add_json(p, "print the summary as JSON")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the demo, narrating it, or silently with a JSON summary under --json."""
    quiet = args.json
    summary = run_demo(args.directory, images=args.images, say=(lambda *_: None) if quiet else print,
                       progress=None if not quiet else False)
    if quiet:
        print(json.dumps(summary, indent=2, default=str))
    return 0
