"""Progress lines for log files, the plan handed out before the work, dry runs without weights, and
size estimates from what was written."""

import io
import os
import time

import pytest
from toy_encoders import MeanColor

from featstore.errors import CheckpointError
from featstore.examples import make_image_tree
from featstore.pipeline import precompute
from featstore.progress import LogLines, counter


def test_log_lines_come_at_a_steady_interval_and_once_at_the_end():
    out = io.StringIO()
    lines = LogLines(10, "precompute toy", every=0.05, unit="img", file=out)
    lines.update(4)
    lines.set_postfix(written=4, failed=1)
    time.sleep(0.3)  # no update meanwhile: the lines still come
    lines.update(6)
    lines.close()
    lines.close()  # once
    written = out.getvalue().splitlines()
    assert len(written) >= 3
    assert written[0].startswith("precompute toy: 4/10 img (40%)") and "ETA" in written[0]
    assert "written 4" in written[0] and "failed 1" in written[0] and "img/s" in written[0]
    assert written[-1].startswith("precompute toy: 10/10 img (100%)") and "ETA" not in written[-1]
    assert sum(line.startswith("precompute toy: 10/10") for line in written) == 1


def test_counter_is_a_bar_on_a_terminal_lines_in_a_log_and_nothing_when_silenced():
    lines = counter(5, "x", show=None, every=1.0, file=io.StringIO())
    assert isinstance(lines, LogLines)
    lines.close()
    bar = counter(5, "x", show=None, every=0)
    assert not isinstance(bar, LogLines) and bar.disable
    bar = counter(5, "x", show=False, every=1.0)
    assert not isinstance(bar, LogLines) and bar.disable


def test_the_plan_is_handed_out_before_any_entry_is_written(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 4, size=24)
    seen = []

    def on_plan(s):
        seen.append((s["planned"], [os.path.exists(os.path.join(root, f"{r}.toy.safetensors")) for r in rels]))

    s = precompute(root, encoder=MeanColor(), num_workers=0, progress=False, on_plan=on_plan)
    assert seen == [(4, [False] * 4)] and s["written"] == 4


def test_a_dry_run_of_vggt_needs_no_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("VGGT_MODEL_PATH", raising=False)
    root = str(tmp_path / "data")
    make_image_tree(root, 3, size=24)
    s = precompute(root, encoder="vggt", dry_run=True, progress=False)
    assert s["planned"] == 3 and s["weights_unchecked"] and s["fingerprint"] is None
    with pytest.raises(CheckpointError, match="--vggt-model-path"):
        precompute(root, encoder="vggt", progress=False)


def test_a_changed_configuration_is_counted_as_replaced(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 4, size=24)
    precompute(root, encoder=MeanColor(tag="a"), num_workers=0, progress=False)
    s = precompute(root, encoder=MeanColor(tag="b"), dry_run=True, progress=False)
    assert s["planned"] == 4 and s["replaced"] == 4
    assert s["replaced_fingerprint"] == "toy-a" and s["fingerprint"] == "toy-b"


def test_set_estimates_come_from_written_set_entries(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 8, size=24)
    options = {"random_weights_seed": 0, "frames_per_set": 2}
    s = precompute(root, encoder="vggt", encoder_options=options, end_idx=2, num_workers=0, progress=False)
    assert s["written"] == 2
    per_set = s["bytes_written"] / 2
    s = precompute(root, encoder="vggt", encoder_options=options, dry_run=True, progress=False)
    assert s["estimate_from"] == "entries" and s["planned"] == s["sets"] - 2
    assert abs(s["estimated_bytes"] - per_set * s["planned"]) <= s["planned"]
