"""Command-line answers that come before any work, and exit codes that say something failed."""

import os
import subprocess
import sys

import torch
from conftest import cli

from featstore.examples import make_image_tree

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where toy_encoders.py is


def run_cli(*args, env=None):
    """The CLI in a subprocess (a traceback would show on its stderr)."""
    e = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


def test_an_unavailable_device_is_a_usage_error_before_scanning(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    device = f"cuda:{torch.cuda.device_count() + 7}"
    r = run_cli("precompute", root, "--encoder", "toy_encoders:make_toy", env={"DEVICE": device})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"device {device} ($DEVICE) is not available" in r.stderr
    r = run_cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--device", device, "--num-workers", "0")
    assert r.returncode == 2 and f"device {device} (--device)" in r.stderr


def test_a_reversed_index_range_is_a_usage_error_naming_both(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 6, size=16)
    code, out, err = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--start-idx", "4",
                         "--end-idx", "1")
    assert code == 2 and "--start-idx 4" in err and "--end-idx 1" in err
    assert not any(f.endswith(".safetensors") for _, _, files in os.walk(root) for f in files)


def test_status_exits_1_when_sources_could_not_be_checked(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, size=16)
    code, _, err = cli("status", root, "--feature", "toy")
    assert code == 1 and "feature 'toy' has no manifest and no entries" in err  # nothing cached yet
    assert cli("precompute", root, "--encoder", "toy_encoders:make_toy")[0] == 0
    code, _, _ = cli("status", root, "--feature", "toy")
    assert code == 0
    os.symlink("a.jpg", os.path.join(root, "b.jpg"))
    os.symlink("b.jpg", os.path.join(root, "a.jpg"))  # a loop: neither can be checked
    code, out, err = cli("status", root, "--feature", "toy")
    assert code == 1 and "could not be checked" in out
