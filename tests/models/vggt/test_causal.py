"""Causal aggregation and key/value streaming, as JanusVLN-style models run VGGT (docs/causal-streaming.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from featstore.models.vggt import Aggregator, KVCache, LayerSelectView, stream_history, window_frame_mask

CAUSAL_FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "vggt" / "causal_stream_tiny.safetensors"

# Frames of 2 x 3 patches (11 tokens): non-square, so a swapped RoPE axis would show.
HEIGHT, WIDTH = 28, 42


def _aggregator(**overrides) -> Aggregator:
    """A tiny aggregator with non-trivial LayerScales, biases and distinct special-token slots."""
    torch.manual_seed(0)
    args = {"img_size": 56, "embed_dim": 32, "depth": 6, "num_heads": 2, "patch_embed": "conv"}
    args.update(overrides)
    aggregator = Aggregator(**args).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in aggregator.named_parameters():
            if name.endswith(("gamma", "bias")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif name in ("camera_token", "register_token"):
                # Slot 0 (first frame) and slot 1 (the others) must differ for a wrong slot to show.
                param.copy_(torch.randn(param.shape, generator=generator))
    return aggregator


def _images(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, frames, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def _max_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def _stream(aggregator: Aggregator, images: torch.Tensor, cache: KVCache) -> list[list[torch.Tensor]]:
    """Frame by frame through ``cache``: per frame, the list of layer outputs ``[B, 1, N, 2C]``."""
    outputs = []
    with torch.no_grad():
        for frame in range(images.shape[1]):
            layers, start = aggregator(images[:, frame : frame + 1], kv_cache=cache)
            assert start == aggregator.patch_start_idx
            outputs.append(list(layers))
    return outputs


def _frame(layers: Sequence[torch.Tensor], frame: int) -> list[torch.Tensor]:
    return [layer[:, frame : frame + 1] for layer in layers]


# --- the causal call ------------------------------------------------------------------------------


def test_causal_call_does_not_see_later_frames() -> None:
    aggregator = _aggregator()
    images = _images(1, 4)
    changed = images.clone()
    changed[:, 2] = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, _ = aggregator(images, causal=True)
        after, _ = aggregator(changed, causal=True)
    for frame in (0, 1):
        for got, want in zip(_frame(after, frame), _frame(before, frame), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for frame in (2, 3):  # frame 3 sees frame 2
        assert _max_diff(_frame(after, frame), _frame(before, frame)) > 1e-2


def test_causal_call_sees_earlier_frames() -> None:
    aggregator = _aggregator()
    images = _images(1, 4)
    changed = images.clone()
    changed[:, 0] = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, _ = aggregator(images, causal=True)
        after, _ = aggregator(changed, causal=True)
    for frame in (1, 2, 3):
        # Frame blocks see only their frame: layer 0's frame half is unchanged, the global half is not.
        assert torch.equal(after[0][:, frame, :, :32], before[0][:, frame, :, :32])
        assert float((after[0][:, frame, :, 32:] - before[0][:, frame, :, 32:]).abs().max()) > 1e-3
        assert float((after[-1][:, frame] - before[-1][:, frame]).abs().max()) > 1e-2


def test_causal_call_differs_from_bidirectional_but_not_for_one_frame() -> None:
    aggregator = _aggregator()
    images = _images(2, 3)
    with torch.no_grad():
        causal, _ = aggregator(images, causal=True)
        full, _ = aggregator(images)
        single_causal, _ = aggregator(images[:, :1], causal=True)
        single, _ = aggregator(images[:, :1])
    assert _max_diff(_frame(causal, 0), _frame(full, 0)) > 1e-2
    for got, want in zip(single_causal, single, strict=True):
        assert torch.equal(got, want)


def test_frame_mask_is_checked() -> None:
    aggregator = _aggregator()
    images = _images(1, 3)
    with pytest.raises(ValueError, match=r"bool \[S, S\] = \[3, 3\]"):
        aggregator(images, frame_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="diagonal"):
        aggregator(images, frame_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="either causal=True or a frame_mask"):
        aggregator(images, causal=True, frame_mask=torch.ones(3, 3, dtype=torch.bool))


def test_causal_call_and_stream_in_train_mode_match_eval_and_backpropagate() -> None:
    aggregator = _aggregator()
    images = _images(1, 3)
    with torch.no_grad():
        want, _ = aggregator(images, causal=True)
    aggregator.train()
    got, _ = aggregator(images, causal=True)  # blocks run under activation checkpointing
    torch.testing.assert_close(got[-1], want[-1], rtol=0, atol=1e-6)
    got[-1].sum().backward()
    assert aggregator.global_blocks[0].attn.qkv.weight.grad is not None
    aggregator.zero_grad()
    cache = aggregator.new_kv_cache()
    streamed = [aggregator(images[:, frame : frame + 1], kv_cache=cache)[0][-1] for frame in range(3)]
    torch.testing.assert_close(streamed[-1].detach(), want[-1][:, 2:], rtol=0, atol=1e-5)
    streamed[-1].sum().backward()  # reaches frame 0's weights through the cached keys
    assert float(aggregator.global_blocks[0].attn.qkv.weight.grad.abs().sum()) > 0


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [{}, {"aa_order": ("global", "frame"), "aa_block_size": 2}],
    ids=["frame-global", "global-frame-blocks-of-2"],
)
def test_stream_equals_causal_call_frame_by_frame(config: dict) -> None:
    aggregator = _aggregator(**config)
    images = _images(1, 5)
    streamed = _stream(aggregator, images, aggregator.new_kv_cache())
    with torch.no_grad():
        whole, _ = aggregator(images, causal=True)
    worst = 0.0
    for frame, got in enumerate(streamed):
        assert len(got) == aggregator.depth
        assert got[0].shape == (1, 1, 11, 64)
        with torch.no_grad():
            prefix, _ = aggregator(images[:, : frame + 1], causal=True)
        for want in (_frame(prefix, frame), _frame(whole, frame)):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            worst = max(worst, _max_diff(got, want))
    print(f"stream vs causal call, float32: max |diff| {worst:.2e}")


def test_one_frame_stream_equals_the_single_image_output() -> None:
    aggregator = _aggregator()
    images = _images(2, 1)
    (streamed,) = _stream(aggregator, images, aggregator.new_kv_cache())
    with torch.no_grad():
        single, _ = aggregator(images)
    for got, want in zip(streamed, single, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_cache_holds_raw_projections_of_every_frame() -> None:
    aggregator = _aggregator()
    images = _images(2, 3)
    cache = aggregator.new_kv_cache()
    projected: list[torch.Tensor] = []
    hook = aggregator.global_blocks[2].attn.qkv.register_forward_hook(lambda m, i, o: projected.append(o))
    try:
        _stream(aggregator, images, cache)
    finally:
        hook.remove()
    keys, values = cache.past(2)
    assert len(keys) == len(values) == 3 == len(cache) == cache.frames_seen
    assert cache.frames == (0, 1, 2) and cache.num_layers == 6
    for frame, qkv in enumerate(projected):
        # [B, N, 3C] -> q, k, v as [B, heads, N, head_dim], with neither q/k norm nor RoPE applied.
        _, k, v = qkv.reshape(2, 11, 3, 2, 16).permute(2, 0, 3, 1, 4)
        assert torch.equal(keys[frame], k) and torch.equal(values[frame], v)
        assert keys[frame].is_contiguous()


def test_batched_streams_equal_single_streams() -> None:
    aggregator = _aggregator()
    images = _images(3, 4)
    batched = _stream(aggregator, images, aggregator.new_kv_cache())
    worst = 0.0
    for row in range(3):
        single = _stream(aggregator, images[row : row + 1], aggregator.new_kv_cache())
        for got, want in zip(batched, single, strict=True):
            rows = [layer[row : row + 1] for layer in got]
            for g, w in zip(rows, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            worst = max(worst, _max_diff(rows, want))
    with torch.no_grad():
        causal, _ = aggregator(images, causal=True)
        causal_row, _ = aggregator(images[1:2], causal=True)
    for g, w in zip(causal, causal_row, strict=True):
        torch.testing.assert_close(g[1:2], w, rtol=0, atol=1e-5)
    print(f"B=3 stream vs B=1 streams: max |diff| {worst:.2e}")


def test_a_cache_serves_one_batch_of_one_image_size() -> None:
    aggregator = _aggregator()
    cache = aggregator.new_kv_cache()
    with torch.no_grad():
        aggregator(_images(2, 1), kv_cache=cache)
        with pytest.raises(ValueError, match="streams 2 sequence"):
            aggregator(_images(1, 1), kv_cache=cache)
        with pytest.raises(ValueError, match="same image size"):
            aggregator(torch.rand(2, 1, 3, 28, 28), kv_cache=cache)
        with pytest.raises(ValueError, match="one frame per call"):
            aggregator(_images(2, 2), kv_cache=cache)
        assert cache.frames_seen == 1  # the refused calls left it alone
        cache.clear()
        assert cache.frames_seen == 0 and len(cache) == 0 and cache.batch_size is None
        aggregator(_images(1, 1), kv_cache=cache)  # a new stream, of another batch size
    assert cache.batch_size == 1


def test_stream_with_layer_selection_and_early_exit() -> None:
    aggregator = _aggregator(selected_layer_idx=[1, 3])
    images = _images(1, 3)
    cache = aggregator.new_kv_cache()
    with torch.no_grad():
        whole, _ = aggregator(images, causal=True)
        for frame in range(3):
            view, _ = aggregator(images[:, frame : frame + 1], kv_cache=cache)
            assert isinstance(view, LayerSelectView) and view.layers == (1, 3)
            for layer in (1, 3):
                torch.testing.assert_close(view[layer], whole[layer][:, frame : frame + 1], rtol=0, atol=1e-5)
            with pytest.raises(KeyError):
                view[4]
    # Global blocks 4 and 5 never ran: the cache holds blocks 0..3 only.
    assert cache.num_layers == 4
    assert cache.past(4) == ([], [])
    with torch.no_grad(), pytest.raises(ValueError, match="stopped after block 3"):
        aggregator.forward_layers(images[:, :1], [5], kv_cache=cache)
    assert cache.frames_seen == 3
    # A shallower frame keeps the blocks it ran: deeper ones would lack it.
    with torch.no_grad():
        aggregator.forward_layers(images[:, :1], [0], kv_cache=cache)
    assert cache.num_layers == 1 and cache.frames_seen == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_under_autocast_runs_and_stays_close(dtype: torch.dtype) -> None:
    aggregator = _aggregator()
    images = _images(2, 3)
    want = _stream(aggregator, images, aggregator.new_kv_cache())
    with torch.autocast("cpu", dtype=dtype):
        got = _stream(aggregator, images, aggregator.new_kv_cache())
        with torch.no_grad():
            causal, _ = aggregator(images, causal=True)
    scale = max(float(layer.abs().max()) for frame in want for layer in frame)
    for frame in range(3):
        assert all(torch.isfinite(layer).all() for layer in got[frame])
        assert _max_diff(got[frame], want[frame]) < 0.05 * scale
        assert _max_diff(_frame(causal, frame), want[frame]) < 0.05 * scale


# --- the window -----------------------------------------------------------------------------------


def test_window_frame_mask_keeps_the_first_and_the_last_frames() -> None:
    attended = [set(torch.nonzero(row).flatten().tolist()) for row in window_frame_mask(6, (1, 2))]
    assert attended == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 2, 3, 4}, {0, 3, 4, 5}]
    attended = [set(torch.nonzero(row).flatten().tolist()) for row in window_frame_mask(5, (0, 2))]
    assert attended == [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}]
    assert torch.equal(window_frame_mask(5, None), torch.ones(5, 5, dtype=torch.bool).tril())
    janus = window_frame_mask(60, (8, 48))
    assert set(torch.nonzero(janus[56]).flatten().tolist()) == set(range(57))
    assert set(torch.nonzero(janus[57]).flatten().tolist()) == {*range(8), *range(9, 58)}
    assert set(torch.nonzero(janus[59]).flatten().tolist()) == {*range(8), *range(11, 60)}


@pytest.mark.parametrize("window", [(1, 2), (0, 2), (2, 0)])
def test_windowed_stream_drops_exactly_the_frames_it_should(window: tuple[int, int]) -> None:
    aggregator = _aggregator()
    images = _images(2, 6)
    cache = aggregator.new_kv_cache(window=window)
    kept: list[tuple[int, ...]] = []
    streamed = []
    with torch.no_grad():
        for frame in range(6):
            layers, _ = aggregator(images[:, frame : frame + 1], kv_cache=cache)
            streamed.append(list(layers))
            kept.append(cache.frames)
        mask = window_frame_mask(6, window)
        expected, _ = aggregator(images, frame_mask=mask)
        causal, _ = aggregator(images, causal=True)
    start, recent = window
    for frame, frames in enumerate(kept):
        seen = list(range(frame + 1))
        want = seen if len(seen) <= start + recent else seen[:start] + seen[len(seen) - recent :]
        assert frames == tuple(want)
        assert cache.past(0)[0][0].shape == (2, 2, 11, 16)
    for frame in range(6):
        for got, want in zip(streamed[frame], _frame(expected, frame), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The window matters: by the last frame, evicted frames are missed.
    assert _max_diff(streamed[5], _frame(causal, 5)) > 1e-3
    assert cache.frames_seen == 6 and len(cache) == len(kept[-1])


def test_window_is_checked() -> None:
    aggregator = _aggregator()
    for bad in [(8,), (8, -1), (1.5, 2), "ab"]:
        with pytest.raises(ValueError, match="window must be"):
            aggregator.new_kv_cache(window=bad)  # type: ignore[arg-type]
    assert aggregator.new_kv_cache(window=[8, 48]).window == (8, 48)


# --- stream_history -------------------------------------------------------------------------------


def test_stream_history_gives_every_prefix_in_one_pass() -> None:
    aggregator = _aggregator()
    images = _images(2, 4)
    cache = aggregator.new_kv_cache()
    passes: list[int] = []
    hook = aggregator.patch_embed.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    try:
        view = stream_history(aggregator, images, layers=[1, -2], kv_cache=cache)
    finally:
        hook.remove()
    assert passes == [2, 2, 2, 2]  # one frame pass per frame, each of B = 2 images
    assert cache.frames_seen == 4
    assert isinstance(view, LayerSelectView) and view.layers == (1, 4)
    assert view[4].shape == (2, 4, 6, 64)  # patch tokens only
    assert cache.num_layers == 5  # early exit after layer 4
    for frame in range(4):
        with torch.no_grad():
            prefix, start = aggregator(images[:, : frame + 1], causal=True)
        for layer in (1, 4):
            torch.testing.assert_close(view[layer][:, frame], prefix[layer][:, frame, start:], rtol=0, atol=1e-5)


def test_stream_history_continues_a_cache_and_keeps_all_tokens(make_tiny_vggt) -> None:
    model = make_tiny_vggt()
    images = (_images(1, 5) * 255).to(torch.uint8)
    whole = stream_history(model, images[0], (1, 2), layers=5, tokens="all")
    cache = model.aggregator.new_kv_cache((1, 2))
    first = stream_history(model, images[:, :2], layers=5, tokens="all", kv_cache=cache)
    second = stream_history(model, images[:, 2:], layers=5, tokens="all", kv_cache=cache)
    assert whole[5].shape == (1, 5, 11, 64)
    torch.testing.assert_close(torch.cat([first[5], second[5]], dim=1), whole[5], rtol=0, atol=1e-6)
    assert cache.frames_seen == 5 and cache.frames == (0, 3, 4)
    with pytest.raises(ValueError, match="differs from the given cache"):
        stream_history(model, images, (8, 48), layers=5, kv_cache=cache)
    with pytest.raises(ValueError, match="tokens must be"):
        stream_history(model, images, layers=5, tokens="camera")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a layer selection"):
        stream_history(model, images, layers=None)


# --- the numerical fixture ------------------------------------------------------------------------

FIXTURE_CONFIG = {"img_size": 28, "embed_dim": 16, "depth": 3, "num_heads": 2, "patch_embed": "conv"}
FIXTURE_WINDOW = (1, 1)


def _fixture_aggregator() -> Aggregator:
    """The fixture's model, with weights from an integer generator (no torch RNG, so stable across versions)."""
    aggregator = Aggregator(**FIXTURE_CONFIG).eval()
    state = 12345
    with torch.no_grad():
        for name, param in sorted(aggregator.named_parameters()):
            values = []
            for _ in range(param.numel()):
                state = (1103515245 * state + 12345) % 2**31
                values.append(state / 2**30 - 1.0)  # uniform in [-1, 1)
            noise = torch.tensor(values, dtype=torch.float64).reshape(param.shape)
            if param.dim() >= 2 and name not in ("camera_token", "register_token"):
                noise = noise * 3**0.5 / param[0].numel() ** 0.5  # unit-variance outputs
            elif name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
                noise = 1.0 + 0.2 * noise
            else:
                noise = 0.5 * noise
            param.copy_(noise.to(torch.float32))
    return aggregator


def _fixture_outputs(aggregator: Aggregator, images: torch.Tensor) -> dict[str, torch.Tensor]:
    frames = images.to(torch.float32) / 255
    plain = _stream(aggregator, frames, aggregator.new_kv_cache())
    windowed = _stream(aggregator, frames, aggregator.new_kv_cache(FIXTURE_WINDOW))
    outputs = {
        f"outputs.stream.{layer}": torch.cat([frame[layer] for frame in plain], dim=1)
        for layer in range(aggregator.depth)
    }
    outputs["outputs.window.last"] = torch.cat([frame[-1] for frame in windowed], dim=1)
    return outputs


def write_causal_fixture(path: Path = CAUSAL_FIXTURE) -> None:
    """(Re)write the fixture: run this file as a script, only after the equality tests pass."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (1, 4, 3, HEIGHT, WIDTH), generator=generator, dtype=torch.uint8)
    tensors = {"inputs.images": images, **_fixture_outputs(_fixture_aggregator(), images)}
    metadata = {
        "config": json.dumps(FIXTURE_CONFIG),
        "window": json.dumps(FIXTURE_WINDOW),
        "weights": "tests/models/vggt/test_causal.py:_fixture_aggregator (integer LCG, seed 12345)",
        "inputs": "uint8 images; the model sees images / 255",
        "outputs": "stream.{layer}: every layer, frame by frame, no window; window.last: last layer, "
        "window (start, recent) from the metadata; each [B, S, N, 2C]",
        "torch": torch.__version__,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_stream_matches_the_causal_fixture() -> None:
    from safetensors import safe_open

    if not CAUSAL_FIXTURE.exists():
        pytest.fail(f"{CAUSAL_FIXTURE} is missing; run `python {__file__}` to write it")
    with safe_open(str(CAUSAL_FIXTURE), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"]) == FIXTURE_CONFIG
        assert tuple(json.loads(handle.metadata()["window"])) == FIXTURE_WINDOW
        expected = {key: handle.get_tensor(key) for key in handle.keys()}
    aggregator = _fixture_aggregator()
    images = expected.pop("inputs.images")
    got = _fixture_outputs(aggregator, images)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # The causal call gives the same numbers as the plain stream.
    with torch.no_grad():
        causal, _ = aggregator(images.to(torch.float32) / 255, causal=True)
    for layer in range(aggregator.depth):
        torch.testing.assert_close(causal[layer], expected[f"outputs.stream.{layer}"], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    write_causal_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else CAUSAL_FIXTURE)
