"""Values past what the reader, the libraries or the machine take: refused up front, named, and
never looping. A history longer than a header could list, pipeline options out of range, a
thread count of ten thousand, negative indices and ages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import age
from toy_encoders import CausalMean

from featstore import FeatureStore, _core, ops
from featstore._torch import to_raw
from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.examples import make_image_tree
from featstore.history import history_entry_path
from featstore.pipeline import precompute


def _tree(tmp_path, count: int = 4) -> tuple[str, list[str]]:
    root = str(tmp_path / "data")
    rels = make_image_tree(root, count, scenes=1, size=16)
    for r in rels:
        age(os.path.join(root, r))
    return root, rels


def test_the_writer_refuses_a_header_the_reader_would_refuse(tmp_path, figures):
    fig = figures("limits: header size, option ranges, threads, negative values")
    path = str(tmp_path / "big.safetensors")
    raw, keep = to_raw({"features": torch.ones(2)})
    with pytest.raises(FeatstoreError, match=f"over the {_core.MAX_HEADER_LEN}-byte limit every reader enforces"):
        _core.write_entry(path, raw, {"members": "x" * _core.MAX_HEADER_LEN}, False)
    del keep
    assert not os.path.exists(path) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    fig.add(runs=1, cases=2)


def test_a_history_longer_than_a_header_could_list_is_written_and_served(tmp_path, monkeypatch, figures):
    fig = figures("limits: header size, option ranges, threads, negative values")
    root, rels = _tree(tmp_path)
    with open(os.path.join(root, "episodes.jsonl"), "w") as f:
        f.write('{"images": ' + str(rels).replace("'", '"') + "}\n")
    # The limit lowered so that 4 frames' records would cross it: entries record their prefix's
    # chains, not their frames, so no history is too long for one (earlier versions listed every
    # frame in the header and had to refuse 60,000 frames with long paths).
    monkeypatch.setattr(_core, "MAX_HEADER_LEN", 64 * 1024 + 700)
    s = precompute(root, encoder=CausalMean(), jsonl="images", num_workers=0, progress=False)
    assert s["failed"] == 0 and s["written"] == 1, s
    store = FeatureStore(root, "toy")
    assert store.history_state(rels) == "valid" and store.get_history(rels) is not None
    entry = history_entry_path(store, rels)
    assert len(_core.read_header(entry)[0]["stamps"]) == 64 and "members" not in _core.read_header(entry)[0]
    again = precompute(root, encoder=CausalMean(), jsonl="images", num_workers=0, progress=False)
    assert again["written"] == 0 and again["failed"] == 0, again
    fig.add(runs=2, cases=4)
    fig.note("a history longer than a header could list (the limit lowered): written once, served, not rewritten; "
             "entries hold chains, not frame lists")


def test_pipeline_options_out_of_range_are_refused_before_anything_loads(tmp_path, capsys, figures):
    fig = figures("limits: header size, option ranges, threads, negative values")
    root, _ = _tree(tmp_path)
    nowhere = str(tmp_path / "no-pipeline")  # nothing is read: the values are checked first
    for flags in (["--max-sequence-length", "0"], ["--max-length", "-3"], ["--image-size", "0", "64"]):
        with pytest.raises(SystemExit) as exc:
            main(["precompute", root, "--pipeline", nowhere, "--part", "prompt", *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "must be at least 1" in err and flags[0] in err, err
    from featstore.encoders import PipelineEncoder

    for kwargs in ({"max_sequence_length": 0}, {"max_length": 0}, {"image_size": (0, 32)}):
        with pytest.raises(ValueError, match="must be"):
            PipelineEncoder(nowhere, "prompt", **kwargs)
    fig.add(runs=1, cases=6)


def test_a_huge_thread_count_is_capped_not_spawned(tmp_path, figures):
    fig = figures("limits: header size, option ranges, threads, negative values")
    root, rels = _tree(tmp_path, 3)
    store = FeatureStore(root, "toy")
    for i, r in enumerate(rels):
        store.put(r, {"features": torch.full((4,), float(i))})
    # In a child with a deadline: 10,000 threads took minutes before they were capped.
    code = ("from featstore import FeatureStore\n"
            f"s = FeatureStore({root!r}, 'toy')\n"
            f"print(s.read_batch({rels!r}, 'features', threads=10000)[:, 0].tolist())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.0, 1.0, 2.0]"
    fig.add(runs=1, cases=1)


def test_negative_indices_and_ages_are_refused(tmp_path, capsys, figures):
    fig = figures("limits: header size, option ranges, threads, negative values")
    root, rels = _tree(tmp_path)
    FeatureStore(root, "toy").put(rels[0], {"features": torch.ones(2)})
    for argv in (["precompute", root, "--random-weights", "--start-idx", "-2"],
                 ["precompute", root, "--random-weights", "--end-idx", "-1"],
                 ["gc", root, "--feature", "toy", "--min-tmp-age", "-5"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert "must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min_tmp_age_s"):
        ops.plan_gc(FeatureStore(root, "toy"), rels, min_tmp_age_s=-5)
    with pytest.raises(ValueError, match="--start-idx -2 is negative"):
        precompute(root, encoder=CausalMean(), start_idx=-2, num_workers=0, progress=False)
    fig.add(runs=1, cases=5)
    fig.note("--max-sequence-length 0, --max-length -3, --image-size 0 64, read_batch(threads=10000), --start-idx "
             "-2, --end-idx -1, gc --min-tmp-age -5: usage errors (or a capped pool) before anything loads")
