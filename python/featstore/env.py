"""Every environment variable featstore reads, read here and nowhere else.

The old scripts' variables keep working (``DATA_ROOT``, ``VGGT_MODEL_PATH``, ``BATCH_SIZE``,
``DEVICE``, ``SKIP_EXISTING``, ``USE_VGGT_CACHE``, ``VGGT_CACHE_DIR``); torchrun's ``RANK`` and
``WORLD_SIZE`` say which rank this process is, ``LOCAL_RANK`` which GPU of its node it uses;
``FEATSTORE_LOG_EVERY`` spaces precompute's progress lines in log files. A value that cannot mean what it is for is an
error naming the variable, never a silent default.
"""

from __future__ import annotations

import os

#: The variables ``featstore precompute`` reads, for its ``--help``.
PRECOMPUTE_VARIABLES = ("DATA_ROOT", "VGGT_MODEL_PATH", "BATCH_SIZE", "DEVICE", "SKIP_EXISTING", "VGGT_CACHE_DIR",
                        "FEATSTORE_LOG_EVERY")

#: The switches that turn the training cache off, most specific first.
USE_CACHE_VARIABLES = ("FEATSTORE_USE_CACHE", "USE_VGGT_CACHE")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _text(name: str) -> str | None:
    """The variable's value, None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def flag(name: str, default: bool) -> bool:
    """A yes/no variable (``SKIP_EXISTING``, ``USE_VGGT_CACHE``); unset or empty means
    ``default``, and a value that is neither says so instead of meaning no."""
    value = _text(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is neither true nor false (use 1/0, true/false, yes/no)")


def data_root() -> str | None:
    """``$DATA_ROOT``: the dataset directory when none is given."""
    return _text("DATA_ROOT")


def vggt_cache_dir() -> str | None:
    """``$VGGT_CACHE_DIR``: the old scripts' cache directory (the dir layout) for ``vggt``."""
    return _text("VGGT_CACHE_DIR")


def vggt_model_path() -> str | None:
    """``$VGGT_MODEL_PATH``: the VGGT checkpoint when none is given."""
    return _text("VGGT_MODEL_PATH")


def batch_size(default: int) -> int:
    """``$BATCH_SIZE``, else ``default``."""
    value = _text("BATCH_SIZE")
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"BATCH_SIZE={os.environ['BATCH_SIZE']!r} is not a whole number") from None


def log_every(default: float) -> float:
    """``$FEATSTORE_LOG_EVERY``: seconds between the progress lines precompute writes when stderr
    is not a terminal (a log file); 0 turns them off. Else ``default``."""
    value = _text("FEATSTORE_LOG_EVERY")
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"FEATSTORE_LOG_EVERY={os.environ['FEATSTORE_LOG_EVERY']!r} is not a number of seconds "
                         "(e.g. 30; 0 turns the progress lines off)")
    return seconds


def device() -> str | None:
    """``$DEVICE`` (``cuda:0``, ``cpu``), None when unset."""
    return _text("DEVICE")


def skip_existing(default: bool = True) -> bool:
    """``$SKIP_EXISTING``: whether precompute leaves valid entries alone."""
    return flag("SKIP_EXISTING", default)


def use_cache(default: bool = True) -> bool:
    """Whether the training cache is on: ``$FEATSTORE_USE_CACHE``, else ``$USE_VGGT_CACHE``, else
    ``default``."""
    for name in USE_CACHE_VARIABLES:
        if _text(name) is not None:
            return flag(name, default)
    return default


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, else ``(0, 1)``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int | None:
    """``$LOCAL_RANK`` (this process's GPU on its node under torchrun), None when unset."""
    value = _text("LOCAL_RANK")
    return int(value) if value and value.isdigit() else None


def user_cache_home() -> str:
    """``$XDG_CACHE_HOME``, else ``~/.cache``: where featstore keeps its weight-digest cache."""
    return _text("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) to ``(I, N)``."""
    if spec is None or isinstance(spec, tuple):
        return spec
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r} is not of the form I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: I must be in 0..N-1")
    return i, n
