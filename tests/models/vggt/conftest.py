"""Shared fixtures of the VGGT tests: the reference files (tests/fixtures/vggt, copied from
shared/reference) and tiny model configurations."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "vggt"
FIXTURE = REFERENCE_DIR / "vggt_tiny_conv.safetensors"
KEYS_FILE = REFERENCE_DIR / "vggt1b_state_dict_keys.txt"

# A VGGT small enough to run in milliseconds on a CPU but with every part present: 6 layers so
# that early exit is visible, DPT heads reading layers (1, 2, 4, 5), a 2-block camera trunk.
TINY_VGGT_CONFIG: dict[str, Any] = {
    "img_size": 56,
    "patch_size": 14,
    "embed_dim": 32,
    "aggregator_kwargs": {"depth": 6, "num_heads": 2, "patch_embed": "conv"},
    "camera_head_kwargs": {"num_heads": 2, "trunk_depth": 2},
    "depth_head_kwargs": {
        "features": 16,
        "out_channels": [8, 16, 32, 32],
        "intermediate_layer_idx": [1, 2, 4, 5],
    },
    "point_head_kwargs": {
        "features": 16,
        "out_channels": [8, 16, 32, 32],
        "intermediate_layer_idx": [1, 2, 4, 5],
    },
    "track_head_kwargs": {
        "features": 16,
        "hidden_size": 32,
        "depth": 1,
        "intermediate_layer_idx": [1, 2, 4, 5],
    },
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run the tiny models single-threaded.

    Their ops take microseconds, so handing work to a second OpenMP thread costs more than it
    saves, and on a busy machine each hand-off can wait a scheduler tick (a 40 ms forward took 3 s).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"reference file {path} is missing from the repository's test fixtures")
    return path


@pytest.fixture(scope="session")
def keys_file() -> Path:
    """The VGGT-1B ``key<TAB>shape`` list."""
    return _require(KEYS_FILE)


@pytest.fixture(scope="session")
def reference_case() -> dict[str, Any]:
    """The tiny conv fixture: ``config`` (dict) and ``tensors`` (name -> Tensor)."""
    from safetensors import safe_open

    with safe_open(str(_require(FIXTURE)), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return {"config": config, "tensors": tensors}


@pytest.fixture(scope="session")
def reference_weights(reference_case: dict[str, Any]) -> Callable[[str], dict[str, torch.Tensor]]:
    """``reference_weights(part)``: the fixture's state dict of one part (``aggregator``, ``camera_head``,
    ``depth_head``)."""

    def weights(part: str) -> dict[str, torch.Tensor]:
        prefix = f"weights.{part}."
        return {k[len(prefix) :]: v for k, v in reference_case["tensors"].items() if k.startswith(prefix)}

    return weights


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """Constructor arguments of a tiny VGGT (a fresh copy per test)."""
    return copy.deepcopy(TINY_VGGT_CONFIG)


@pytest.fixture
def make_tiny_vggt() -> Callable[..., Any]:
    """``make_tiny_vggt(**overrides)``: a tiny VGGT in eval mode with seeded, non-trivial weights."""
    from featstore.models.vggt import VGGT

    def make(**overrides: Any) -> Any:
        torch.manual_seed(0)
        config = copy.deepcopy(TINY_VGGT_CONFIG)
        config.update(overrides)
        model = VGGT(**config).eval()
        randomize(model)
        return model

    return make


@pytest.fixture
def tiny_images() -> torch.Tensor:
    """Non-square images ``[1, 3, 3, 28, 42]`` in [0, 1] for the tiny VGGT."""
    return torch.rand(1, 3, 3, 28, 42, generator=torch.Generator().manual_seed(1))


def randomize(module: torch.nn.Module) -> None:
    """Give LayerScale, bias and zero-initialized parameters non-trivial values so every path matters."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("gamma", "bias")) or "empty_pose" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
