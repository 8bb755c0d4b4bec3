"""What the commands print and return when their output or their input is not the usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
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


def test_a_root_that_is_a_file_or_missing_is_named_as_such(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert main(["status", str(afile)]) == 2
    assert f"data root {afile} is not a directory" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_explain_from_outside_the_root_names_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    assert main(["explain", "scene00/x.jpg", "--feature", "vggt"]) == 2
    err = capsys.readouterr().err
    assert "--data-root DIR" in err and "scene00" in err


def test_a_mistyped_flag_gets_the_commands_usage_and_the_closest_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["precompute", str(tmp_path), "--batchsize", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: featstore precompute")
    assert "--batchsize: did you mean --batch-size?" in err
