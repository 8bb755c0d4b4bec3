"""The featstore CLI: scan's output, --json, --write-manifest, exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from featstore import FeatureStore
from featstore.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_scan_text_and_json(tree, capsys):
    root, rels = tree
    FeatureStore(root, "vggt").put(rels[0], {"features": torch.zeros(2)})
    assert main(["scan", root]) == 0
    out = capsys.readouterr().out
    assert f"{len(rels)} sources" in out and ".jpg" in out and ".png" in out
    assert main(["scan", root, "--feature", "vggt", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"] == len(rels) and doc["feature"]["counts"]["valid"] == 1
    assert doc["feature"]["counts"]["missing"] == len(rels) - 1


def test_scan_writes_nothing_unless_asked(tree, capsys):
    root, _ = tree
    before = sorted(os.listdir(root))
    assert main(["scan", root, "--feature", "vggt"]) == 0
    assert sorted(os.listdir(root)) == before
    assert main(["scan", root, "--feature", "vggt", "--write-manifest"]) == 0
    assert os.path.exists(os.path.join(root, "vggt_cache_manifest.json"))


def test_scan_dir_layout_and_aliases(tree, tmp_path, capsys):
    root, _ = tree
    cache = tmp_path / "cache"
    assert main(["scan", "--data_root", root, "--feature", "pixel_latent", "--cache_dir", str(cache),
                 "--write-manifest", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["feature"]["layout"] == "dir"
    assert os.path.exists(cache / "pixel_latent" / "manifest.json")


def test_data_root_from_environment(tree):
    root, rels = tree
    r = run_cli("scan", "--json", env={"DATA_ROOT": root})
    assert r.returncode == 0 and json.loads(r.stdout)["sources"] == len(rels)


def test_errors_and_exit_codes(tmp_path):
    r = run_cli("scan", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("scan", str(tmp_path / "empty"), "--jsonl", "images")
    assert r.returncode == 1 and "no images found" in r.stderr and "'images'" in r.stderr
    assert str(tmp_path / "empty") in r.stderr
    r = run_cli("scan", str(tmp_path / "empty"), "--write-manifest")
    assert r.returncode == 2 and "--feature" in r.stderr
    r = run_cli("scan", "--bogus")
    assert r.returncode == 2


@pytest.mark.parametrize("cmd", [[], ["scan"]])
def test_help_explains(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "usage: featstore" in r.stdout


def test_scan_extensions_and_files_from(tree, tmp_path, capsys):
    root, rels = tree
    assert main(["scan", root, "--ext", "PNG", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["by_extension"]) == {".png"}
    lst = tmp_path / "l.txt"
    lst.write_text(rels[0] + "\n")
    assert main(["scan", root, "--files-from", str(lst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == 1
