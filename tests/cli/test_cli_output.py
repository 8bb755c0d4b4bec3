"""What the commands print and return when their output or their input is not the usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from featstore import FeatureStore
from featstore.cli import main
from featstore.examples import make_image_tree


def test_a_closed_pipe_is_not_an_error(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 4, size=16)
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.zeros(2)})  # the feature exists
    # `featstore status ... | head`: the reader is gone before the report is written.
    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            "from featstore.cli import main\n"
            f"sys.exit(main(['status', {root!r}, '--feature', 'vggt']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr


def test_scan_exits_1_when_a_listed_path_is_missing(tmp_path, capsys):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=16)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([*rels, "no/such.png"]))
    assert main(["scan", root, "--files-from", str(listed), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"] == 3 and any("no/such.png" in e[0] for e in doc["errors"])
    assert main(["scan", root, "--files-from", str(listed)]) == 1
    assert "1 path could not be scanned" in capsys.readouterr().out
    os.remove(listed)


def test_explain_on_a_source_that_does_not_exist_says_so_not_precompute(tmp_path, capsys):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 2, size=16)
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.zeros(2)})  # the feature exists
    assert main(["explain", "--data-root", root, "--feature", "vggt", "scene000/no_such.jpg"]) == 1
    out = capsys.readouterr().out
    assert "there is no source" in out and "featstore precompute" not in out
