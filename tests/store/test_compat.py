"""The old per-type cache manager's surface, backed by featstore entries."""

import pytest
import torch

import featstore
from featstore import EmbeddingCacheManager


def test_manager_roundtrip_stats_and_clear(tmp_path):
    m = EmbeddingCacheManager(tmp_path / "cache")
    h = featstore.file_hash(__file__)
    latent = torch.randn(4, 32, 32)
    assert not m.cache_exists("pixel_latent", h) and m.load_cache("pixel_latent", h) is None
    m.save_cache("pixel_latent", h, latent)
    m.save_cache("prompt_embed", h, {"embeds": torch.ones(7, 16), "mask": torch.ones(7, dtype=torch.bool)})
    assert m.cache_exists("pixel_latent", h)
    assert torch.equal(m.load_cache("pixel_latent", h), latent)
    both = m.load_cache("prompt_embed", h)
    assert set(both) == {"embeds", "mask"}
    stats = m.get_cache_stats()
    assert stats["pixel_latent"]["count"] == 1 and stats["prompt_embed"]["count"] == 1
    m.clear_cache("pixel_latent")
    assert not m.cache_exists("pixel_latent", h) and m.cache_exists("prompt_embed", h)
    m.clear_cache()
    assert m.get_cache_stats() == {}


def test_manager_reads_old_pt_files_safely(tmp_path):
    m = EmbeddingCacheManager(tmp_path)
    (tmp_path / "control_latent").mkdir()
    torch.save(torch.arange(5), tmp_path / "control_latent" / "abc.pt")
    assert m.cache_exists("control_latent", "abc")
    assert torch.equal(m.load_cache("control_latent", "abc"), torch.arange(5))


def test_manager_refuses_names_that_escape_the_cache(tmp_path):
    m = EmbeddingCacheManager(tmp_path)
    with pytest.raises(ValueError, match="names a file"):
        m.save_cache("../etc", "x", torch.zeros(1))
    with pytest.raises(ValueError):
        m.load_cache("pixel_latent", "a/b")


def test_corrupt_manager_entry_is_a_miss_with_warning(tmp_path):
    m = EmbeddingCacheManager(tmp_path)
    path = m.save_cache("pixel_latent", "k", torch.ones(100))
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.warns(UserWarning, match="corrupt|truncated"):
        assert m.load_cache("pixel_latent", "k") is None
