"""Shared fixtures: generated image trees and running code as an unprivileged user."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from featstore.examples import make_image_tree


@pytest.fixture
def tree(tmp_path) -> tuple[str, list[str]]:
    """A small image tree: (root, sorted relative paths)."""
    root = str(tmp_path / "data")
    return root, make_image_tree(root, 12, size=32)


@pytest.fixture
def public_tmp() -> Iterator[str]:
    """A directory every user may traverse (pytest's own tmp dirs are private to root)."""
    d = tempfile.mkdtemp(prefix="featstore-test-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _child(fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    try:
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)  # nobody: permission bits apply again
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # report everything to the parent
        queue.put(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_unprivileged(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)`` in a forked child that, when we are root, drops to user nobody, so
    permission bits are enforced as they are for a real user. Returns what ``fn`` returns."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    status, value = queue.get(timeout=120)
    proc.join(30)
    if status == "err":
        raise AssertionError(f"unprivileged child failed: {value}")
    return value


def age(path: str, seconds: int = 100) -> None:
    """Moves a file's mtime into the past (out of the racy window, when seconds > 2)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def snapshot(root: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def cli(*args: str) -> tuple[int, str, str]:
    """Runs the featstore CLI in this process; returns (exit code, stdout, stderr)."""
    from featstore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()
