"""A frame set's entry is never served for frames renamed onto its members' names."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from featstore import FeatureStore
from featstore.sets import judge_set_entry, set_entry_files

WHEN = 1_600_000_000


def test_renumbered_members_with_equal_size_and_mtime_miss(tmp_path):
    root = str(tmp_path)
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(os.path.join(root, f"{i:03d}.bmp"))
        os.utime(os.path.join(root, f"{i:03d}.bmp"), (WHEN, WHEN))
    store = FeatureStore(root, "toy", fingerprint="fp")
    members = ["000.bmp", "001.bmp"]
    store.put_set(members, {"features": torch.ones(2, 3)})
    assert store.get_set(members) is not None
    os.remove(os.path.join(root, "000.bmp"))
    for i in (1, 2, 3):
        os.rename(os.path.join(root, f"{i:03d}.bmp"), os.path.join(root, f"{i - 1:03d}.bmp"))
    fresh = FeatureStore(root, "toy", fingerprint="fp")
    assert fresh.get_set(members) is None
    assert store.get_set(members) is None
    # gc and verify judge entry files from the members they record: this one is stale.
    (entry,) = set_entry_files(fresh)
    assert judge_set_entry(fresh, entry).state == "stale"
