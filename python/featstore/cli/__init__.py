"""The ``featstore`` command line.

Every command has ``--help`` and ``--json``; exit codes: 0 success, 1 when some items failed or
nothing was found to work on, 2 on a usage error (including a data root that does not exist).
Flags of the scripts featstore replaces keep working as aliases (``--data_root``, ``--cache_dir``).

Each command group is a module that registers its parsers and handlers; ``COMMANDS`` lists them
in the order ``featstore --help`` shows them, so a new command touches its module (and, for a new
group, one line here).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from featstore import __version__
from featstore.cli import bench, demo, inspect, maintain, precompute, scan
from featstore.errors import DataRootError, FeatstoreError

if TYPE_CHECKING:
    from featstore.cli.common import Subcommands

__all__ = ["COMMANDS", "build_parser", "main"]

#: The command groups' ``register`` functions, each adding its commands' parsers and handlers.
COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    scan.register,
    precompute.register,
    demo.register,
    inspect.register,  # status, explain
    maintain.register,  # verify, gc, pack, migrate
    bench.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``featstore`` parser with every command of ``COMMANDS``; each command's parser sets
    ``func``, its handler."""
    parser = argparse.ArgumentParser(
        prog="featstore",
        description="Precompute frozen-encoder features once, store them beside the data, serve them zero-copy.",
        epilog="Run `featstore COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """A usage error for arguments no parser took, from the command's own parser (its usage, not
    the top level's), with the closest flag it has (``--batchsize``: did you mean --batch-size)."""
    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = subparsers.choices.get(args.command) if subparsers is not None and args.command else None
    owner = command if command is not None else parser
    flags = [f for f in owner._option_string_actions if f.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            wanted = extra.split("=", 1)[0]
            # The hyphenated spellings first; the old scripts' underscored aliases only as a fallback.
            close = (difflib.get_close_matches(wanted, [f for f in flags if "_" not in f], n=1, cutoff=0.6)
                     or difflib.get_close_matches(wanted, flags, n=1, cutoff=0.6))
            if close:
                hints.append(f"{extra}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    owner.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``featstore`` command line on ``argv`` (default: ``sys.argv[1:]``); returns the
    exit code: 0 success, 1 failed items or nothing found, 2 usage error, 130 interrupted."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognized(parser, args, extras)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args, parser))
    except BrokenPipeError:
        # The reader went away (`featstore status ... | head`): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
