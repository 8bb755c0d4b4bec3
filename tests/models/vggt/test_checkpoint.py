"""load_vggt: round trips in every supported format, and clear CheckpointErrors for bad files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from featstore.errors import CheckpointError
from featstore.models.vggt import VGGT, LayerSelectView, load_vggt


@pytest.fixture
def saved(make_tiny_vggt: Callable, tiny_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    model = make_tiny_vggt()
    state = model.state_dict()
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    st = tmp_path / "model.safetensors"
    save_file(state, str(st))
    return {"model": model, "state": state, "pt": pt, "safetensors": st, "config": tiny_config}


def _assert_same_state(model: VGGT, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip(saved: dict, fmt: str, tiny_images: torch.Tensor) -> None:
    model = load_vggt(saved[fmt], config=saved["config"])
    assert not model.training
    _assert_same_state(model, saved["state"])
    assert model.aggregator._resnet_mean.device.type == "cpu"
    with torch.no_grad():
        expected = saved["model"](tiny_images)
        actual = model(tiny_images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.equal(actual[key], expected[key]), key


def test_pth_suffix_and_directory(saved: dict, tmp_path: Path) -> None:
    pth = tmp_path / "weights" / "vggt.pth"
    pth.parent.mkdir()
    os.replace(saved["pt"], pth)
    _assert_same_state(load_vggt(pth, config=saved["config"]), saved["state"])
    _assert_same_state(load_vggt(pth.parent, config=saved["config"]), saved["state"])
    # A directory with model.safetensors prefers it.
    _assert_same_state(load_vggt(tmp_path, config=saved["config"]), saved["state"])


def test_sharded_safetensors(saved: dict, tmp_path: Path) -> None:
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = list(saved["state"])
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: saved["state"][k] for k in part}, str(shard_dir / name))
        weight_map.update(dict.fromkeys(part, name))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_state(load_vggt(shard_dir, config=saved["config"]), saved["state"])


def test_legacy_serialization_still_loads(saved: dict, tmp_path: Path) -> None:
    # Files from torch.save(..., _use_new_zipfile_serialization=False) cannot be memory-mapped.
    legacy = tmp_path / "legacy.pt"
    torch.save(saved["state"], legacy, _use_new_zipfile_serialization=False)
    _assert_same_state(load_vggt(legacy, config=saved["config"]), saved["state"])


def test_wrapped_and_ddp_state_dicts(saved: dict, tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in saved["state"].items()}}, wrapped)
    _assert_same_state(load_vggt(wrapped, config=saved["config"]), saved["state"])


def test_dtype_heads_and_selection(saved: dict, tiny_images: torch.Tensor) -> None:
    model = load_vggt(
        saved["safetensors"],
        config=saved["config"],
        dtype=torch.bfloat16,
        enable_camera=False,
        enable_point=False,
        enable_depth=False,
        enable_track=False,
        selected_layer_idx=[2],
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.camera_head is None and model.track_head is None
    with torch.no_grad():
        view = model(tiny_images.bfloat16())["aggregated_tokens"]
    assert isinstance(view, LayerSelectView) and view.layers == (2,)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_pt_weights_stay_mapped_from_the_file(saved: dict) -> None:
    model = load_vggt(saved["pt"], config=saved["config"])
    # The parameters are the file's pages (mmap + assign), not a second copy on the heap.
    ranges = _mapped_ranges(saved["pt"])
    for name, param in model.named_parameters():
        assert any(start <= param.data_ptr() < end for start, end in ranges), name


# --- errors --------------------------------------------------------------------------------------------


def _raises(path: Path, pattern: str, **kwargs: Any) -> CheckpointError:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_vggt(path, **kwargs)
    assert str(path) in str(info.value)
    # Never torch's advice to load with weights_only=False: that runs code from the file.
    assert "weights_only=False" not in str(info.value)
    return info.value


def test_missing_path_says_what_to_do(tmp_path: Path) -> None:
    error = _raises(tmp_path / "nope.pt", "not found")
    assert "VGGT_MODEL_PATH" in str(error) and "--vggt-model-path" in str(error)


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    _raises(tmp_path, "no VGGT checkpoint in directory")


def test_directory_with_several_candidates(saved: dict, tmp_path: Path) -> None:
    directory = tmp_path / "several"
    directory.mkdir()
    for name in ("a.pt", "b.pt"):
        torch.save(saved["state"], directory / name)
    _raises(directory, "several checkpoint files")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    _raises(path, "unknown file type")


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_garbage_file(tmp_path: Path, name: str, tiny_config: dict) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    _raises(path, "cannot read VGGT checkpoint", config=tiny_config)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncated_file(saved: dict, fmt: str) -> None:
    path = saved[fmt]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "cannot read", config=saved["config"])


def test_empty_file(tmp_path: Path, tiny_config: dict) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    _raises(path, "cannot read", config=tiny_config)


def test_pickled_objects_are_refused(tmp_path: Path, tiny_config: dict) -> None:
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.nn.Linear(2, 2)}, path)
    _raises(path, "never code from a file", config=tiny_config)


def test_not_a_state_dict(tmp_path: Path, tiny_config: dict) -> None:
    path = tmp_path / "model.pt"
    torch.save([torch.zeros(1)], path)
    _raises(path, "not a state dict", config=tiny_config)


def test_missing_keys_are_listed(saved: dict) -> None:
    state = dict(saved["state"])
    del state["camera_head.empty_pose_tokens"]
    del state["aggregator.camera_token"]
    torch.save(state, saved["pt"])
    error = _raises(saved["pt"], "2 keys missing", config=saved["config"])
    assert "aggregator.camera_token" in str(error) and "camera_head.empty_pose_tokens" in str(error)


def test_unexpected_keys_are_listed(saved: dict) -> None:
    state = dict(saved["state"])
    state["aggregator.extra_token"] = torch.zeros(3)
    save_file(state, str(saved["safetensors"]))
    _raises(saved["safetensors"], "1 unexpected keys: aggregator.extra_token", config=saved["config"])


def test_shape_mismatch_is_listed(saved: dict) -> None:
    state = dict(saved["state"])
    state["aggregator.camera_token"] = torch.zeros(1, 2, 1, 48)
    torch.save(state, saved["pt"])
    _raises(
        saved["pt"],
        r"shape mismatches: aggregator.camera_token \(checkpoint \[1, 2, 1, 48\], model \[1, 2, 1, 32\]\)",
        config=saved["config"],
    )


def test_wrong_size_for_the_default_model(saved: dict) -> None:
    error = _raises(saved["pt"], "does not fit VGGT-1B")
    assert "config=" in str(error)


def test_disabled_heads_skip_their_keys(saved: dict) -> None:
    model = load_vggt(saved["pt"], config=saved["config"], enable_track=False, enable_point=False)
    assert model.track_head is None and model.point_head is None
    assert not any(k.startswith(("track_head.", "point_head.")) for k in model.state_dict())


@pytest.mark.slow
def test_load_published_vggt1b() -> None:
    """Loads the real checkpoint named by VGGT_MODEL_PATH (5 GB; opt-in with -m slow)."""
    path = os.environ.get("VGGT_MODEL_PATH")
    if not path:
        pytest.skip("set VGGT_MODEL_PATH to the VGGT-1B checkpoint to run this test")
    model = load_vggt(path, enable_track=True)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000_000
    with torch.no_grad():
        predictions = model(torch.rand(1, 2, 3, 294, 518))
    assert predictions["depth"].shape == (1, 2, 294, 518, 1)
    assert torch.isfinite(predictions["pose_enc"]).all()
