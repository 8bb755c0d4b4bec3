"""Precompute with ``layout="packed"``: per-image entries written straight into packs, indexed once
each pack is sealed, served and judged like any entry; nothing half-written is ever served."""

import json
import os

import pytest
import torch
from conftest import age, cli
from PIL import Image
from toy_encoders import MeanColor

from featstore import FeatureStore, _core
from featstore.examples import make_image_tree
from featstore.pipeline import precompute


def run(root, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return precompute(root, encoder=MeanColor(), layout="packed", **kw)


def expected(root, rel):
    enc = MeanColor()
    return enc.encode(enc.preprocess(os.path.join(root, rel))[None].float() / 255)["features"][0]


def entry_files(root):
    return [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]


def packs(base, feature="toy"):
    d = os.path.join(base, ".featstore", feature, "packs")
    return sorted(f for f in os.listdir(d) if f.endswith(".fspack")) if os.path.isdir(d) else []


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 20, size=40)
    for r in rels:
        age(os.path.join(root, r))
    return root, rels


def test_entries_go_straight_into_packs_and_a_rerun_does_nothing(data):
    root, rels = data
    s = run(root, batch_size=4, pack_size=2000)
    assert s["written"] == len(rels) and s["failed"] == 0
    assert entry_files(root) == [] and len(packs(root)) > 1
    store = FeatureStore(root, "toy")
    for r in rels:
        assert torch.allclose(store.get(r)["features"], expected(root, r))
        assert store.check(r).packed is not None
    again = run(root)
    assert (again["written"], again["skipped"]) == (0, len(rels))
    rc, out, _ = cli("status", root, "--feature", "toy", "--json")
    assert json.loads(out)["counts"]["valid"] == len(rels)


def test_an_edit_is_recomputed_into_a_new_pack_and_served(data):
    root, rels = data
    run(root)
    first = packs(root)
    path = os.path.join(root, rels[3])
    Image.new("RGB", (40, 40), (250, 10, 10)).save(path)
    age(path)
    assert FeatureStore(root, "toy").state(rels[3]) == "stale"
    s = run(root)
    assert s["written"] == 1
    assert len(packs(root)) == len(first) + 1
    store = FeatureStore(root, "toy")
    assert torch.allclose(store.get(rels[3])["features"], expected(root, rels[3]))
    assert all(store.state(r) == "valid" for r in rels)


def test_packed_entries_in_a_cache_directory(data, tmp_path):
    root, rels = data
    cache = str(tmp_path / "cache")
    rc, out, _ = cli("precompute", "--data-root", root, "--encoder", "toy_encoders:MeanColor", "--layout", "packed",
                     "--cache-dir", cache, "--pack-size", "1MiB", "--num-workers", "0", "--json")
    assert rc == 0, out
    assert packs(cache) and entry_files(cache) == [] and entry_files(root) == []
    store = FeatureStore(root, "toy", cache_dir=cache)
    assert all(torch.allclose(store.get(r)["features"], expected(root, r)) for r in rels)


def test_an_unsealed_pack_serves_nothing_and_gc_removes_what_a_killed_run_left(data):
    root, rels = data
    store = FeatureStore(root, "toy", fingerprint="toy-v1")
    stream = _core.PackStream(1 << 30)
    rows = store.write_rows(rels[:3], {"features": torch.ones(3, 4)}, stream=stream)
    assert all(isinstance(n, int) for n in rows)
    assert [FeatureStore(root, "toy", fingerprint="toy-v1").state(r) for r in rels[:3]] == ["missing"] * 3
    records = store._core.seal_pack_stream(stream, True)
    assert len(records) == 3
    reader = FeatureStore(root, "toy", fingerprint="toy-v1")
    assert all(torch.equal(reader.get(r)["features"], torch.ones(4)) for r in rels[:3])
    # A run killed with a pack open leaves its temporary file and no entry.
    killed = _core.PackStream(1 << 30)
    store.write_rows(rels[3:5], {"features": torch.ones(2, 4)}, stream=killed)
    packs_dir = os.path.join(root, ".featstore", "toy", "packs")
    [leftover] = [f for f in os.listdir(packs_dir) if f.endswith(".tmp")]
    assert [FeatureStore(root, "toy", fingerprint="toy-v1").state(r) for r in rels[3:5]] == ["missing"] * 2
    path = os.path.join(packs_dir, leftover)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9))
    rc, out, _ = cli("gc", root, "--feature", "toy", "--fingerprint", "toy-v1", "--json")
    assert rc == 0, out
    assert path in [i["path"] for i in json.loads(out)["removed"]]
    after = FeatureStore(root, "toy", fingerprint="toy-v1")
    assert len(packs(root)) == 1 and all(after.state(r) == "valid" for r in rels[:3])


def test_pack_size_needs_the_packed_layout(data, capsys):
    root, _ = data
    from featstore.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["precompute", "--data-root", root, "--encoder", "toy_encoders:MeanColor", "--pack-size", "1MiB"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="applies to layout='packed'"):
        precompute(root, encoder=MeanColor(), pack_size=1000, progress=False)


def test_a_packed_run_replaces_an_entry_file_of_other_bytes(data):
    root, rels = data
    precompute(root, encoder=MeanColor(), num_workers=0, progress=False)  # files of their own
    path = os.path.join(root, rels[2])
    Image.new("RGB", (40, 40), (10, 250, 10)).save(path)
    age(path)
    s = run(root)
    assert s["written"] == 1
    store = FeatureStore(root, "toy")
    assert torch.allclose(store.get(rels[2])["features"], expected(root, rels[2]))
    assert store.check(rels[2]).packed is not None
    assert len(entry_files(root)) == len(rels) - 1  # the stale file went, the valid ones stay
    assert run(root)["written"] == 0
