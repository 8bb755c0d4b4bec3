"""``featstore status`` finds a feature's sidecar entries (the orphan candidates) in the walk that
finds the sources: orphans are counted as before, and no second walk of the tree happens."""

from __future__ import annotations

import json
import os

from conftest import cli
from toy_encoders import MeanColor

from featstore import _core
from featstore.examples import make_image_tree
from featstore.pipeline import precompute


def test_status_counts_orphans_from_the_one_walk(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=16)
    precompute(root, encoder=MeanColor(), num_workers=0, progress=False)
    os.unlink(os.path.join(root, rels[0]))  # its entry is now an orphan
    walks: list[str] = []
    real = _core.scan
    monkeypatch.setattr(_core, "scan", lambda root, **kw: walks.append(root) or real(root, **kw))
    code, out, _ = cli("status", root, "--feature", "toy", "--json")
    doc = json.loads(out)
    assert doc["counts"]["orphan"] == 1 and doc["counts"]["valid"] == 5, doc
    assert walks == [os.path.abspath(root)]  # one walk: sources and entry names together
