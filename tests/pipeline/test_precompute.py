"""featstore.pipeline: planning, resume, sharding, locks, bad images, OOM, kill safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from toy_encoders import Huge, MeanColor, OOMAboveTwo, TinyConv

import featstore
from featstore import FeatureStore
from featstore.errors import CheckpointError, FeatstoreError, LockHeldError, NoImagesFoundError
from featstore.examples import make_image_tree
from featstore.lock import feature_lock
from featstore.manifest import indexed_sources
from featstore.pipeline import precompute, select

# tests/, where toy_encoders.py lives: pytest puts it on this process's path (for tests/conftest.py); the
# subprocesses below put it on theirs.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(root, encoder=None, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return precompute(root, encoder=encoder or MeanColor(), **kw)


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    return root, make_image_tree(root, 20, size=40)


def test_writes_one_valid_entry_per_image_then_does_nothing(data):
    root, rels = data
    s = run(root, batch_size=8)
    assert s["written"] == len(rels) and s["failed"] == 0 and s["planned"] == len(rels)
    store = FeatureStore(root, "toy")
    assert store.fingerprint == "toy-v1"  # adopted from the manifest
    assert all(store.state(r) == "valid" for r in rels)
    assert store.get(rels[0])["features"].shape == (48,)
    again = run(root)
    assert again["planned"] == 0 and again["written"] == 0 and again["skipped"] == len(rels)
    manifest = json.load(open(os.path.join(root, "toy_cache_manifest.json")))
    assert manifest["total_images"] == len(rels) and manifest["processed_images"] == len(rels)
    assert manifest["fingerprint"] == "toy-v1" and not manifest["failures"]


def test_touch_recomputes_nothing_edit_recomputes_exactly_one(data):
    root, rels = data
    run(root)
    st = os.stat(os.path.join(root, rels[0]))
    os.utime(os.path.join(root, rels[0]), ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert run(root)["planned"] == 0
    with Image.open(os.path.join(root, rels[1])) as im:
        im.rotate(90).save(os.path.join(root, rels[1]))
    s = run(root)
    assert s["planned"] == 1 and s["written"] == 1


def test_results_match_encoding_one_image_at_a_time(data):
    root, rels = data
    run(root, batch_size=7)
    enc = MeanColor()
    store = FeatureStore(root, "toy")
    for rel in rels[:5]:
        direct = enc.encode(enc.preprocess(os.path.join(root, rel))[None].float() / 255)["features"][0]
        assert torch.allclose(store.get(rel)["features"], direct)


def test_undecodable_image_is_recorded_and_the_run_goes_on(data):
    root, rels = data
    with open(os.path.join(root, "scene000", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    s = run(root)
    assert s["written"] == len(rels) and s["failed"] == 1
    assert s["failures"][0][0] == "scene000/broken.jpg"
    manifest = json.load(open(os.path.join(root, "toy_cache_manifest.json")))
    assert "scene000/broken.jpg" in manifest["failures"]


def test_out_of_memory_halves_the_batch_and_retries(data):
    root, rels = data
    enc = OOMAboveTwo()
    s = run(root, enc, batch_size=8)
    assert s["written"] == len(rels) and s["failed"] == 0
    assert max(enc.sizes[-3:]) <= 2 and 8 in enc.sizes


def test_workers_decode_in_other_processes(data):
    root, rels = data
    s = run(root, num_workers=2, batch_size=4)
    assert s["written"] == len(rels)


def test_plain_module_and_module_callable_encoders(data, monkeypatch):
    root, rels = data
    s = run(root, TinyConv(), feature="conv")
    assert s["written"] == len(rels)
    assert FeatureStore(root, "conv").get(rels[0])["features"].shape == (8,)
    monkeypatch.syspath_prepend(TESTS)
    s = run(root, "toy_encoders:make_toy", feature="toy2")
    assert s["written"] == len(rels)


def test_dry_run_plans_and_writes_nothing(data):
    root, rels = data
    before = sorted(os.listdir(root))
    s = run(root, dry_run=True)
    assert s["planned"] == len(rels) and s["dry_run"] and s["free_bytes"] > 0
    assert sorted(os.listdir(root)) == before


def test_refuses_when_the_estimate_exceeds_free_space(data):
    root, _ = data
    with pytest.raises(FeatstoreError, match="not enough space"):
        run(root, Huge())
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(root) for f in fs)


def test_second_run_of_a_feature_is_refused_by_the_lock(data):
    root, _ = data
    store = FeatureStore(root, "toy", fingerprint="toy-v1")
    with feature_lock(store, "precompute"):
        with pytest.raises(LockHeldError, match="another precompute"):
            run(root)
    assert run(root)["written"] > 0  # released with its holder


def test_ranges_lists_and_shards(data, tmp_path):
    root, rels = data
    assert select(rels, start_idx=2, end_idx=6) == rels[2:6]
    assert select(rels, shard=(1, 3)) == rels[1::3]
    assert select(rels, rank=(1, 2)) == rels[1::2]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(rels[:3]))
    assert run(root, files_from=lst)["written"] == 3
    assert run(root, start_idx=3, end_idx=5)["written"] == 2


def test_two_shards_give_the_same_entries_as_one_run(data, tmp_path):
    root, rels = data
    a = run(root, shard="0/2", batch_size=3)
    b = run(root, shard="1/2", batch_size=5)
    assert a["written"] + b["written"] == len(rels)
    one_root = str(tmp_path / "one")
    make_image_tree(one_root, 20, size=40)
    run(one_root)
    s2, s1 = FeatureStore(root, "toy"), FeatureStore(one_root, "toy")
    for rel in rels:
        assert torch.equal(s2.get(rel)["features"], s1.get(rel)["features"])
    assert sorted(indexed_sources(FeatureStore(root, "toy"))) == sorted(rels)
    assert not [f for f in os.listdir(root) if ".rank" in f]  # journals compacted


def test_missing_weights_fail_in_the_first_second(data):
    root, _ = data
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="not found"):
        precompute(root, encoder_options={"model_path": "/nonexistent/VGGT-1B"}, progress=False)
    assert time.perf_counter() - t0 < 1.0


def test_no_images_found_names_root_and_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesFoundError, match="jpg, jpeg, png") as info:
        run(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)


def test_tiny_vggt_encoder_end_to_end(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=48)
    s = precompute(root, encoder_options={"random_weights_seed": 0, "layers": (-2,)}, batch_size=2, num_workers=0,
                   progress=False)
    assert s["written"] == 3 and "single-frame" in s["note"]
    feats = featstore.FeatureStore(root, "vggt").get(rels[0])["features"]
    assert feats.shape == (37 * 37, 128) and feats.dtype == torch.float32


def test_kill_midway_leaves_complete_entries_and_a_rerun_finishes(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 24, size=32)
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); from featstore.pipeline import precompute; "
            f"precompute({root!r}, encoder='toy_encoders:make_slow', batch_size=2, num_workers=0, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TOY_DELAY": "0.15"})
    deadline = time.time() + 60
    while time.time() < deadline:
        done = [r for r in rels if os.path.exists(os.path.join(root, r + ".toy.safetensors"))]
        if len(done) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(done) < len(rels)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".toy.safetensors"):
                featstore._core.verify_entry(os.path.join(dirpath, f))  # complete and checksummed
    s = run(root, MeanColor())
    assert s["written"] + s["skipped"] == len(rels) and s["skipped"] >= len(done) - 1
    store = FeatureStore(root, "toy")
    assert all(store.state(r) == "valid" for r in rels)


def _free_port() -> int:
    """A port nobody listens on now: two test runs at once must not share a rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_ranks_split_the_work_and_rank0_merges(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 10, size=32)
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "from featstore.pipeline import precompute\n"
        f"s = precompute({root!r}, encoder='toy_encoders:make_toy', num_workers=0, progress=False)\n"
        "print('RESULT', os.environ['RANK'], json.dumps({'written': s['written'], 'rank': s['rank']}))\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in out.stdout.splitlines()
               if line.startswith("RESULT")}
    assert {r["rank"] for r in results.values()} == {"0/2", "1/2"}
    assert sum(r["written"] for r in results.values()) == len(rels)
    assert sorted(indexed_sources(FeatureStore(root, "toy"))) == sorted(rels)
    assert json.load(open(os.path.join(root, "toy_cache_manifest.json")))["processed_images"] == len(rels)
    assert not [f for f in os.listdir(root) if ".rank" in f]


def test_frames_per_set_from_directories_and_jsonl_lists(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 10, scenes=2, size=40)  # 5 images per scene directory
    s = precompute(root, encoder_options={"random_weights_seed": 0, "frames_per_set": 2}, batch_size=4,
                   num_workers=0, progress=False)
    assert s["frames_per_set"] == 2 and s["written"] == 6  # per scene: 2 + 2 + 1 frames
    assert "get_set" in s["note"]
    store = FeatureStore(root, "vggt")
    scene0 = [r for r in rels if r.startswith("scene000/")]
    feats = store.get_set(scene0[:2])
    assert feats is not None and feats["features"].shape == (2, 37 * 37, 128)
    assert store.get_set(scene0[1:3]) is None and store.get(scene0[0]) is None  # never mixed
    again = precompute(root, encoder_options={"random_weights_seed": 0, "frames_per_set": 2}, num_workers=0,
                       progress=False)
    assert again["planned"] == 0
    with open(os.path.join(root, scene0[2]), "ab") as f:
        f.write(b"edit")
    third = precompute(root, encoder_options={"random_weights_seed": 0, "frames_per_set": 2}, num_workers=0,
                       progress=False)
    assert third["planned"] == 1 and third["written"] == 1  # only the set holding the edited frame

    with open(os.path.join(root, "episodes.jsonl"), "w") as f:
        f.write(json.dumps({"images": [scene0[4], scene0[0], scene0[3]]}) + "\n")
    s = precompute(root, encoder_options={"random_weights_seed": 0, "frames_per_set": 3}, jsonl="images",
                   num_workers=0, progress=False)
    assert s["written"] == 1
    fresh = FeatureStore(root, "vggt")  # the 3-frame run's fingerprint, from the manifest
    assert fresh.get_set([scene0[4], scene0[0], scene0[3]])["features"].shape[0] == 3
    assert store.get_set([scene0[4], scene0[0], scene0[3]]) is None  # other fingerprint: never served


def test_a_new_encoder_never_serves_the_old_encoders_entries(data):
    root, rels = data
    run(root, MeanColor(tag="A"))
    run(root, MeanColor(tag="B"), end_idx=1)  # the new encoder recomputed only one image
    store = FeatureStore(root, "toy")
    assert store.fingerprint == "toy-B"
    assert store.state(rels[0]) == "valid"
    assert {store.state(r) for r in rels[1:]} == {"foreign"}
    with pytest.warns(UserWarning, match="foreign"):
        assert store.get(rels[1]) is None


def test_an_image_edited_during_the_run_gets_no_entry_and_the_run_goes_on(data):
    from toy_encoders import EditsDuringEncode

    root, rels = data
    s = run(root, EditsDuringEncode(), batch_size=4)
    assert s["written"] == 0 and s["failed"] == len(rels)
    assert "changed after it was read" in s["failures"][0][1]
    store = FeatureStore(root, "toy")
    assert {store.state(r) for r in rels} == {"missing"}
    assert run(root)["written"] == len(rels)  # the next run encodes the new versions


def test_module_with_batchnorm_has_a_fingerprint():
    from featstore.encoders import ModuleEncoder

    fp = ModuleEncoder(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))).fingerprint()
    assert len(fp) == 32


def test_plain_and_shard_runs_exclude_each_other(data):
    from featstore.lock import feature_lock

    root, _ = data
    store = FeatureStore(root, "toy", fingerprint="toy-v1")
    with feature_lock(store, "precompute.shard0-of-2"):
        with pytest.raises(LockHeldError, match="shard0-of-2"):
            run(root)
        assert run(root, shard="1/2")["written"] > 0  # shards of one split run side by side
    with feature_lock(store, "precompute"):
        with pytest.raises(LockHeldError, match="over all sources"):
            run(root, shard="0/2")


def test_workers_hand_small_chunks_over_pickled_and_large_ones_in_shared_memory(data, monkeypatch):
    """A chunk of small decoded images travels inside the pickled chunk (no shared-memory
    segment and file descriptor per chunk, which cost more than decoding them); a large chunk,
    and a dtype numpy lacks, stay tensors. Either way every entry holds the same features as
    one computed without workers."""
    from featstore.pipeline import decoding

    small = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    rows = [(i, small[i], None, None) for i in range(4)]
    stacked, _ = decoding._packed(rows)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (4, 3, 8, 8)
    monkeypatch.setattr(decoding, "SMALL_CHUNK_BYTES", 16)
    assert isinstance(decoding._packed(rows)[0], torch.Tensor)
    monkeypatch.undo()
    bf16 = [(i, small[i].to(torch.bfloat16), None, None) for i in range(4)]
    assert isinstance(decoding._packed(bf16)[0], torch.Tensor)
    items = list(decoding.each_item([(stacked, [(i, None, None, None) for i in range(4)])]))
    assert [i for i, *_ in items] == [0, 1, 2, 3] and all(isinstance(x, torch.Tensor) for _, x, _, _ in items)

    root, rels = data
    run(root, num_workers=2, batch_size=4)
    pooled = FeatureStore(root, "toy")
    by_workers = {r: pooled.get(r)["features"].clone() for r in rels}
    run(root, num_workers=0, batch_size=4, overwrite=True)
    alone = FeatureStore(root, "toy")
    assert all(torch.equal(alone.get(r)["features"], by_workers[r]) for r in rels)


def test_a_run_lets_go_of_its_work_lists_before_the_merge_and_the_summary_still_counts(data, monkeypatch):
    from featstore import _core
    from featstore.pipeline import run as run_module

    root, rels = data
    seen = {}
    real = run_module.finish_manifest

    def finish(plan):
        seen["lists"] = (len(plan.items), len(plan.states), len(plan.todo))
        return real(plan)

    monkeypatch.setattr(run_module, "finish_manifest", finish)
    s = run(root)
    assert seen["lists"] == (0, 0, 0)  # their memory went to the merge
    assert s["written"] == s["planned"] == len(rels) and s["selected"] == len(rels)
    assert FeatureStore(root, "toy").state(rels[0]) == "valid"
    assert _core.release_freed_memory() in (True, False)  # on any C library, never an error


def test_a_rerun_asks_for_unindexed_records_only_when_a_verdict_came_from_outside_the_index(data):
    import gc

    from featstore.bulk import collector_paused

    root, rels = data
    for rel in rels:  # out of the racy window: the index's stamps alone vouch for the entries
        os.utime(os.path.join(root, rel), (time.time() - 3600,) * 2)
    run(root)
    store = FeatureStore(root, "toy")
    assert set(store.states(rels)) == {"valid"} and not store._core.judged_outside_the_index()
    path = os.path.join(root, rels[0])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched: judged by its digest
    store = FeatureStore(root, "toy")
    assert set(store.states(rels)) == {"valid"} and store._core.judged_outside_the_index()
    assert [r.source for r in store.index_records([rels[0]], unindexed_only=True)]  # its new stamp
    run(root)  # journals it: the next process trusts the index again
    store = FeatureStore(root, "toy")
    assert set(store.states(rels)) == {"valid"} and not store._core.judged_outside_the_index()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
