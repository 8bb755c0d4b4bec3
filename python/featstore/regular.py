"""Opening files that featstore reads (images, captions, ``.jsonl`` listings, weights) only when
they are regular files, without ever blocking.

A FIFO where an image was would block a plain ``open`` until some writer appears, and a symlink
to ``/dev/zero`` would never end a read: nothing featstore reads may hang a training loop or a
precompute (docs/design.md, "Nothing hangs"). The Rust core does the same for every digest.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from featstore.errors import NotARegularFileError


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_regular(path: str | os.PathLike[str], mode: int, what: str = "") -> NotARegularFileError:
    """The error for ``path`` being something other than a regular file."""
    label = f"{what} " if what else ""
    return NotARegularFileError(f"{label}{os.fspath(path)} is not a regular file ({file_kind(mode)}): featstore "
                                "reads only regular files; put the file itself there, or leave it out")


def open_regular(path: str | os.PathLike[str], what: str = "") -> BinaryIO:
    """``open(path, "rb")`` for a regular file; anything else is refused at once.

    Raises
    ------
    NotARegularFileError
        ``path`` (after symlinks) is a FIFO, socket, device or directory; ``what`` ("caption",
        "image") leads the message.
    FileNotFoundError, PermissionError
        As ``open`` raises them.
    """
    # O_NONBLOCK: a FIFO opens at once instead of waiting for a writer; regular files ignore it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | os.PathLike[str], what: str = "") -> str:
    """A regular file's text (UTF-8), refused at once when it is not a regular file."""
    with open_regular(path, what) as f:
        return f.read().decode("utf-8")


def require_regular(path: str | os.PathLike[str], what: str = "") -> None:
    """Raises :class:`NotARegularFileError` when ``path`` exists and is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own open says so
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode, what)
