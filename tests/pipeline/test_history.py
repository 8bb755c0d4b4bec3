"""History precompute (docs/design.md "History entries", docs/causal-streaming.md): one causal pass
per longest list, an entry for every prefix a sample names, exactly the model's computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from featstore import FeatureStore
from featstore.encoders import VGGTEncoder, capabilities
from featstore.encoders.base import digest_of
from featstore.errors import FeatstoreError
from featstore.examples import make_image_tree
from featstore.history import get_history, history_entry_files, history_state, judge_history_entry
from featstore.models.vggt import preprocess_image_uint8
from featstore.pipeline import histories, precompute

FRAMES = 5
SIDE = 28  # 2 x 2 patches of the tiny VGGT: each frame pass takes milliseconds


class SmallFrames(VGGTEncoder):
    """The tiny random VGGT on 28-pixel frames (VGGT's "crop" to 518 would cost seconds per test)."""

    def preprocess(self, path: str) -> torch.Tensor:
        return preprocess_image_uint8(path, self.mode, target_size=SIDE)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        return digest_of(super().fingerprint(), SIDE)


def encoder(**options) -> SmallFrames:
    return SmallFrames(random_weights_seed=0, device="cpu", **{"history": True, **options})


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def episode(tmp_path) -> tuple[str, list[str]]:
    """One episode of FRAMES frames whose every step is a sample: lines list frames 0..k."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, FRAMES, scenes=1, size=32, png_every=0)
    write_samples(root, [rels[:k] for k in range(1, FRAMES + 1)])
    return root, rels


def write_samples(root: str, lists: list[list[str]], name: str = "episodes.jsonl") -> None:
    with open(os.path.join(root, name), "w") as f:
        for frames in lists:
            f.write(json.dumps({"images": frames}) + "\n")


def run(root: str, enc: SmallFrames | None = None, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return precompute(root, encoder=enc or encoder(), jsonl="images", device="cpu", **kw)


def frames_of(root: str, rels: list[str]) -> torch.Tensor:
    """``[T, 3, H, W]`` float in [0, 1], as the encoder sees them."""
    return torch.stack([preprocess_image_uint8(os.path.join(root, r), target_size=SIDE) for r in rels]).float() / 255


def causal_last(enc: SmallFrames, images: torch.Tensor) -> torch.Tensor:
    """The last frame's selected patch tokens of one causal call on the whole list."""
    agg = enc.model.aggregator
    with torch.inference_mode():
        view, start = agg.forward_layers(images[None], enc.layers, causal=True)
    return view[enc.layers[0]][0, -1, start:]


def test_an_episode_with_every_step_a_sample_costs_T_frame_passes(episode):
    root, rels = episode
    enc = encoder()
    s = run(root, enc)
    assert s["unit"] == "samples" and s["selected"] == FRAMES and s["lists"] == 1
    assert s["written"] == FRAMES and s["failed"] == 0
    assert s["frame_passes"] == FRAMES == enc.frame_passes  # not FRAMES * (FRAMES + 1) / 2
    store = FeatureStore(root, "vggt")
    assert len(history_entry_files(store)) == FRAMES
    assert {history_state(store, rels[:k]) for k in range(1, FRAMES + 1)} == {"valid"}
    assert store.get(rels[0]) is None  # never mixed with per-image entries
    manifest = json.load(open(store.manifest_path))
    assert manifest["history"] == {"window": None, "order": "forward"} and manifest["jsonl"] == "images"


def test_each_entry_is_the_last_frame_of_a_causal_call_on_its_prefix(episode):
    root, rels = episode
    enc = encoder()
    run(root, enc)
    store = FeatureStore(root, "vggt")
    images = frames_of(root, rels)
    for k in range(1, FRAMES + 1):
        got = get_history(store, rels[:k])["features"]
        want = causal_last(enc, images[:k])
        assert got.shape == want.shape == (4, 128)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_one_frame_history_is_the_per_image_feature(episode):
    root, rels = episode
    write_samples(root, [[rels[3]]], "alone.jsonl")  # a second list: frame 3 alone
    run(root)
    store = FeatureStore(root, "vggt")
    per_image = SmallFrames(random_weights_seed=0, device="cpu")
    per_image.to("cpu")
    for rel in (rels[0], rels[3]):
        alone = per_image.encode(frames_of(root, [rel]))["features"][0]
        torch.testing.assert_close(get_history(store, [rel])["features"], alone, rtol=1e-4, atol=1e-5)


def test_a_rerun_computes_nothing(episode):
    root, _ = episode
    run(root)
    enc = encoder()
    again = run(root, enc)
    assert again["planned"] == 0 and again["skipped"] == FRAMES and again["planned_lists"] == 0
    assert again["written"] == 0 and again["frame_passes"] == 0 and enc.model is None  # no weights loaded


def test_an_edited_frame_stales_exactly_the_histories_holding_it(episode):
    root, rels = episode
    run(root)
    store = FeatureStore(root, "vggt")
    before = {judge_history_entry(store, p).members: p for p in history_entry_files(store)}
    edited = 2
    with open(os.path.join(root, rels[edited]), "ab") as f:
        f.write(b"edit")
    verdicts = {m: judge_history_entry(store, p).state for m, p in before.items()}
    assert verdicts == {tuple(rels[:k]): "stale" if k > edited else "valid" for k in range(1, FRAMES + 1)}
    enc = encoder()
    again = run(root, enc)
    assert again["planned"] == again["written"] == FRAMES - edited  # the samples holding the frame
    assert again["frame_passes"] == FRAMES  # their earlier frames are fed again as context
    assert {history_state(store, rels[:k]) for k in range(1, FRAMES + 1)} == {"valid"}
    for k in range(1, edited + 1):  # the others were not rewritten
        assert history_entry_files(store).count(before[tuple(rels[:k])]) == 1


def test_deleted_prefix_entries_alone_are_recomputed(episode):
    root, rels = episode
    run(root)
    store = FeatureStore(root, "vggt")
    paths = {judge_history_entry(store, p).members: p for p in history_entry_files(store)}
    kept = {p: os.stat(p).st_mtime_ns for m, p in paths.items() if len(m) not in (2, 4)}
    for k in (2, 4):  # a run killed before writing them
        os.remove(paths[tuple(rels[:k])])
    enc = encoder()
    again = run(root, enc)
    assert again["planned"] == again["written"] == 2
    assert again["frame_passes"] == 4  # streamed up to the longest missing prefix, not the whole list
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept
    assert {history_state(store, rels[:k]) for k in range(1, FRAMES + 1)} == {"valid"}


def test_prefixes_are_grouped_under_the_longest_list_they_prefix():
    items = histories([["a", "b", "c"], ["a"], ["a", "b"], ["x", "y"], ["a", "b"], ["a", "b", "c", "d"],
                       ["a", "c"]])
    assert [(i.paths, i.lengths) for i in items] == [
        (("x", "y"), (2,)), (("a", "b", "c", "d"), (1, 2, 3, 4)), (("a", "c"), (2,))]


def test_two_episodes_stream_apart_and_unnamed_prefixes_get_no_entry(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 7, scenes=1, size=32, png_every=0)
    a, b = rels[:4], rels[4:]
    write_samples(root, [a[:2], a, b])  # a[:1] and a[:3], b[:1], b[:2] are nobody's samples
    enc = encoder()
    s = run(root, enc, batch_size=4)
    assert s["written"] == 3 and s["frame_passes"] == 7 and s["lists"] == 2
    store = FeatureStore(root, "vggt")
    assert len(history_entry_files(store)) == 3
    assert history_state(store, a[:3]) == "missing" and history_state(store, b) == "valid"


def test_window_and_reverse_change_the_fingerprint_and_the_features(episode):
    root, rels = episode
    plain = encoder()
    others = [encoder(window=(1, 1)), encoder(reverse=True), encoder(window=(1, 2)),
              SmallFrames(random_weights_seed=0, device="cpu")]
    fingerprints = {plain.fingerprint(), *(e.fingerprint() for e in others)}
    assert len(fingerprints) == 5
    plain.to("cpu")
    images = frames_of(root, rels)[None]
    forward = plain.encode_history(images)["features"][0]
    windowed = encoder(window=(1, 1)).encode_history(images)["features"][0]
    assert torch.equal(windowed[:2], forward[:2]) and not torch.allclose(windowed[-1], forward[-1])


def test_reverse_feeds_each_prefix_last_to_first(episode):
    root, rels = episode
    enc = encoder(reverse=True)
    s = run(root, enc)
    assert s["written"] == FRAMES and s["frame_passes"] == FRAMES * (FRAMES + 1) // 2  # no prefix shares a pass
    store = FeatureStore(root, "vggt")
    assert store.fingerprint == enc.fingerprint()
    assert json.load(open(store.manifest_path))["history"] == {"window": None, "order": "reverse"}
    images = frames_of(root, rels)
    for k in range(1, FRAMES + 1):
        want = causal_last(enc, images[:k].flip(0))  # the list's first frame, fed last
        torch.testing.assert_close(get_history(store, rels[:k])["features"], want, rtol=1e-4, atol=1e-5)


def test_history_excludes_frame_sets_and_window_needs_history():
    with pytest.raises(ValueError, match="exclude each other"):
        VGGTEncoder(random_weights_seed=0, history=True, frames_per_set=2)
    with pytest.raises(ValueError, match="history=True"):
        VGGTEncoder(random_weights_seed=0, window=(8, 48))
    with pytest.raises(ValueError, match="history=True"):
        VGGTEncoder(random_weights_seed=0).encode_history(torch.zeros(1, 2, 3, 28, 28))
    assert capabilities(VGGTEncoder(random_weights_seed=0, history=True)).history
    assert not capabilities(VGGTEncoder(random_weights_seed=0)).history


def test_history_mode_without_jsonl_lists_names_the_fix(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, scenes=1, size=32)
    with pytest.raises(FeatstoreError, match="jsonl"):
        precompute(root, encoder=encoder(), device="cpu", num_workers=0, progress=False)


def test_cli_history_flags(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, scenes=1, size=32)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "featstore.cli", "precompute", root, "--random-weights",
                               "--device", "cpu", *args], capture_output=True, text=True, timeout=300)

    out = cli("--history")
    assert out.returncode == 2 and "--jsonl FIELD" in out.stderr
    out = cli("--history-window", "8", "48")
    assert out.returncode == 2 and "add --history" in out.stderr
    out = cli("--history", "--jsonl", "images", "--frames-per-set", "2")
    assert out.returncode == 2 and "exclude each other" in out.stderr


class ToyHistory:
    """A cheap history encoder: a frame's features are the running mean of the frames so far.
    Raises CUDA's out-of-memory error for more than one list at once."""

    name = "toyhist"

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def fingerprint(self) -> str:
        return "toyhist-v1"

    def preprocess(self, path: str) -> torch.Tensor:
        return preprocess_image_uint8(path, target_size=SIDE)

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": batch.mean(dim=(2, 3))}

    def encode_history(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(tuple(batch.shape[:2]))
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        means = batch.mean(dim=(3, 4)).cumsum(1)
        steps = torch.arange(1, batch.shape[1] + 1, dtype=means.dtype)[None, :, None]
        return {"features": means / steps}


def test_out_of_memory_halves_the_lists_streamed_together(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 9, scenes=1, size=32, png_every=0)
    episodes = [rels[0:3], rels[3:6], rels[6:9]]
    write_samples(root, [e[:k] for e in episodes for k in (1, 2, 3)])
    enc = ToyHistory()
    s = precompute(root, encoder=enc, jsonl="images", device="cpu", batch_size=4, num_workers=0, progress=False)
    assert s["written"] == 9 and s["failed"] == 0
    assert s["frame_passes"] == 9  # counted per list streamed (this encoder keeps no count of its own)
    assert enc.batches[0] == (3, 3) and enc.batches.count((1, 3)) == 3
    store = FeatureStore(root, "toyhist")
    images = frames_of(root, episodes[1])
    want = images.mean(dim=(2, 3))[:2].mean(0)
    torch.testing.assert_close(get_history(store, episodes[1][:2])["features"], want)


def test_an_undecodable_frame_fails_only_the_samples_holding_it(episode):
    root, rels = episode
    with open(os.path.join(root, rels[2]), "wb") as f:
        f.write(b"not an image")
    enc = encoder()
    s = run(root, enc)
    assert s["written"] == 2 and s["failed"] == FRAMES - 2  # prefixes 1 and 2 do not hold frame 2
    assert s["frame_passes"] == 2 and rels[2] in s["failures"][0][1]
    store = FeatureStore(root, "vggt")
    assert [history_state(store, rels[:k]) for k in range(1, FRAMES + 1)] == ["valid"] * 2 + ["missing"] * 3
