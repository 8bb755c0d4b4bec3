"""``featstore status`` finds a feature's sidecar entries (the orphan candidates) in the walk that
finds the sources: orphans are counted as before, and no second walk of the tree happens."""

from __future__ import annotations

import json
import os

import pytest
from conftest import cli
from toy_encoders import MeanColor

from featstore import _core
from featstore.examples import make_image_tree
from featstore.pipeline import precompute
from featstore.scan import scan


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


def test_status_checks_each_source_with_the_stamp_its_walk_took(tmp_path, monkeypatch, capsys):
    """The walk stats every source; the checks take those stamps rather than stat each source
    again (`find` stats each file once, so does status). Same counts as checks that stat."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=16)
    precompute(root, encoder=MeanColor(), num_workers=0, progress=False)
    with open(os.path.join(root, rels[1]), "ab") as f:
        f.write(b"edited")  # stale
    passed: list[object] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def check_many(self, rels, threads=None, progress=None, stamps=None):
            passed.append(stamps)
            return self.inner.check_many(rels, threads, progress, stamps)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    import featstore.store as store_module

    real_init = store_module.FeatureStore.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._core = Counting(self._core)

    monkeypatch.setattr(store_module.FeatureStore, "__init__", init)
    code, out, _ = cli("status", root, "--feature", "toy", "--json")
    doc = json.loads(out)
    assert (doc["counts"]["valid"], doc["counts"]["stale"]) == (5, 1), doc
    assert len(passed) == 1 and isinstance(passed[0], bytes) and len(passed[0]) == 32 * len(rels)
    # The same verdicts as checks that stat each source themselves.
    store = store_module.FeatureStore(root, "toy")
    found = scan(root, named_suffix=".toy.safetensors", stamps=True)
    assert scan(root).stamps is None  # only when asked: planning a precompute does not hold them
    assert store.states(found.paths, stamps=found.stamps) == store.states(found.paths)
    with pytest.raises(ValueError, match="32 bytes per source"):
        store._core.check_many(found.paths, None, None, b"\0" * 31)
