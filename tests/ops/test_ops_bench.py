"""`featstore bench`: the latency table on the user's own data (no timing thresholds here)."""

import json
import os

import pytest
import torch
from conftest import cli

from featstore import FeatureStore


@pytest.fixture
def cached(tree):
    root, rels = tree
    store = FeatureStore(root, "vggt")
    for r in rels[:6]:
        store.put(r, {"features": torch.randn(8, 16)})
    return root, rels


def test_bench_table_rows_and_ratios(cached):
    root, _ = cached
    before = sorted(os.listdir(root))
    rc, out, _ = cli("bench", root, "--samples", "4", "--repeat", "1", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["samples"] == 4 and doc["feature"] == "vggt"
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"featstore contains", "sha256(path + bytes) + exists", "exists(path + '.vggt_cache.pt')",
                         "featstore get (zero-copy)", "featstore get + copy", "sha256 key + torch.load",
                         "torch.load (path-concat)", "featstore status (walk, check every source)",
                         "find -printf (every file's stamp)"}
    assert rows["featstore contains"]["ratio"] == 1 and rows["featstore get (zero-copy)"]["ratio"] == 1
    assert rows["featstore status (walk, check every source)"]["ratio"] == 1  # the tree group's base
    assert {r["group"] for r in doc["rows"]} == {"lookup", "read", "tree"}
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in doc["rows"])
    assert sorted(os.listdir(root)) == before  # the legacy copies are gone


def test_bench_text_table(cached):
    root, _ = cached
    rc, out, _ = cli("bench", root, "--samples", "3", "--repeat", "1")
    assert rc == 0
    assert "vs featstore" in out and "lookup:" in out and "read:" in out and "tree:" in out and "1.00x" in out
    assert "sha256(path + bytes) + exists" in out


def test_bench_samples_only_valid_entries(cached):
    root, rels = cached
    with open(os.path.join(root, rels[0]), "ab") as f:  # stale: not measured
        f.write(b"edit")
    rc, out, _ = cli("bench", root, "--samples", "50", "--repeat", "1", "--json")
    assert rc == 0 and json.loads(out)["samples"] == 5


def test_bench_needs_valid_entries_and_sane_options(tree):
    root, _ = tree
    rc, _, err = cli("bench", root, "--samples", "5")
    assert rc == 1 and "no source" in err and "precompute" in err
    with pytest.raises(SystemExit) as exc:
        cli("bench", root, "--samples", "0")
    assert exc.value.code == 2


def test_off_a_terminal_progress_is_never_a_bar_of_carriage_returns(cached, tmp_path):
    import subprocess
    import sys

    root, _ = cached
    log = tmp_path / "bench.log"
    with open(log, "w") as err:  # stderr is a file, as in a cluster job's log
        done = subprocess.run([sys.executable, "-m", "featstore.cli", "bench", root, "--samples", "4", "--repeat",
                               "2000"], stdout=subprocess.PIPE, stderr=err, text=True, timeout=600)
    assert done.returncode == 0
    assert "\r" not in log.read_text()
