"""Arguments of a precompute run that must be refused (or bounded) before any work starts: an
unavailable device, a reversed index range, a huge batch size."""

import os

import pytest
import torch
from toy_encoders import MeanColor

from featstore.examples import make_image_tree
from featstore.pipeline import precompute, select
from featstore.pipeline.decoding import decode_loader
from featstore.pipeline.items import WorkItem


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    return root, make_image_tree(root, 4, size=16)


def _missing_gpu() -> str:
    return f"cuda:{torch.cuda.device_count() + 7}"


def test_an_unavailable_device_is_refused_before_scanning(tmp_path, monkeypatch):
    device = _missing_gpu()
    with pytest.raises(ValueError, match=f"{device}.*--device") as exc:  # the root does not even exist
        precompute(str(tmp_path / "nowhere"), encoder=MeanColor(), device=device, num_workers=0, progress=False)
    assert "(--device)" in str(exc.value) and "cpu" in str(exc.value)
    monkeypatch.setenv("DEVICE", device)
    with pytest.raises(ValueError, match=r"\$DEVICE"):
        precompute(str(tmp_path / "nowhere"), encoder=MeanColor(), num_workers=0, progress=False)
    with pytest.raises(ValueError, match="device 'gpu0' .* is not a torch device"):
        precompute(str(tmp_path / "nowhere"), encoder=MeanColor(), device="gpu0", num_workers=0, progress=False)


def test_a_reversed_index_range_is_refused_naming_both(data):
    root, _ = data
    with pytest.raises(ValueError, match="--start-idx 4.*--end-idx 1"):
        precompute(root, encoder=MeanColor(), start_idx=4, end_idx=1, num_workers=0, progress=False)
    # A negative index would silently count from the end of a list the user never sees.
    for start, end in ((-2, None), (None, -1), (-1, -3)):
        with pytest.raises(ValueError, match="is negative"):
            select(list(range(10)), start_idx=start, end_idx=end)
        with pytest.raises(ValueError, match="is negative"):
            precompute(root, encoder=MeanColor(), start_idx=start, end_idx=end, num_workers=0, progress=False)
    assert select(list(range(10)), start_idx=4, end_idx=4) == []  # empty, not reversed
    assert select(list(range(10)), start_idx=20, end_idx=30) == []


def test_decoding_never_prefetches_more_than_the_items(data):
    root, rels = data
    items = [WorkItem.image(r) for r in rels]
    loader = decode_loader(MeanColor(), root, items, batch_size=10**9, num_workers=2, pin_memory=False)
    assert loader.prefetch_factor * loader.num_workers <= len(items) + loader.num_workers
    s = precompute(root, encoder=MeanColor(), batch_size=10**9, num_workers=1, progress=False)
    assert s["written"] == len(rels) and os.path.exists(os.path.join(root, "toy_cache_manifest.json"))


def test_each_torchrun_rank_defaults_to_its_own_gpu(monkeypatch):
    from featstore.pipeline.planning import default_device

    monkeypatch.delenv("DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cuda:3"  # not every rank of a node on cuda:0
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == "cuda:0"
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cpu"  # $DEVICE still wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DEVICE")
    assert default_device() == "cpu"
