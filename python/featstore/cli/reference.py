"""The command-line reference of the docs site, generated from the parsers themselves so that it
cannot drift from ``--help``: each command's section is exactly what ``featstore COMMAND --help``
prints (at a fixed width). The docs build calls :func:`markdown` from ``docs/hooks/cli_reference.py``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from featstore.cli import build_parser

#: The width the reference is laid out at (argparse reads ``$COLUMNS``).
WIDTH = 100


@contextmanager
def _columns(width: int) -> Iterator[None]:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def commands(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every command, in ``featstore --help`` order."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help or "" for action in sub._choices_actions}
    return [(name, helps.get(name, ""), command) for name, command in sub.choices.items()]


def help_text(parser: argparse.ArgumentParser, width: int = WIDTH) -> str:
    """What ``--help`` prints for ``parser`` at ``width`` columns."""
    with _columns(width):
        return parser.format_help()


def markdown(width: int = WIDTH) -> str:
    """The reference: a table of the commands, then each command's ``--help``."""
    parser = build_parser()
    listed = commands(parser)
    lines = ["| command | what it does |", "|---|---|"]
    lines += [f"| [`featstore {name}`](#featstore-{name}) | {summary} |" for name, summary, _ in listed]
    lines += ["", "## featstore", "", "```text", help_text(parser, width).rstrip(), "```"]
    for name, _, command in listed:
        lines += ["", f"## featstore {name}", "", "```text", help_text(command, width).rstrip(), "```"]
    return "\n".join(lines) + "\n"
