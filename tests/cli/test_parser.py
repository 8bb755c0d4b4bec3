"""The command table: every command is registered with --help and --json, the old scripts' flags
still parse, and building the parser (``featstore --help``) does not import torch."""

import subprocess
import sys

import pytest

from featstore import __version__
from featstore.cli import build_parser, main

COMMANDS = ["scan", "precompute", "demo", "status", "explain", "verify", "gc", "pack", "migrate", "bench"]


def test_every_command_is_registered_in_order():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_json(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: featstore {command}") and "--json" in out


def test_old_script_flags_are_aliases():
    old = build_parser().parse_args(
        ["precompute", "--data_root", "/d", "--vggt_model_path", "/w", "--model_path", "/m", "--cache_dir", "/c",
         "--batch_size", "4", "--skip_existing", "--start_idx", "1", "--end_idx", "9"])
    new = build_parser().parse_args(
        ["precompute", "--data-root", "/d", "--vggt-model-path", "/w", "--model-path", "/m", "--cache-dir", "/c",
         "--batch-size", "4", "--skip-existing", "--start-idx", "1", "--end-idx", "9"])
    assert vars(old) == vars(new)
    assert (new.data_root_flag, new.vggt_model_path, new.model_path, new.cache_dir, new.batch_size,
            new.skip_existing, new.start_idx, new.end_idx) == ("/d", "/w", "/m", "/c", 4, True, 1, 9)


def test_help_and_version_start_without_torch():
    code = ("import sys; from featstore.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'building the parser imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "featstore.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"featstore {__version__}"
