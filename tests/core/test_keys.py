"""Keys, digests and the legacy key, pinned against independent implementations."""

import hashlib
import os
import struct

import blake3
import pytest

import featstore
from featstore import _core


def reference_key(rel: bytes, size: int, mtime_ns: int) -> str:
    data = (b"featstore-key-v1\0" + struct.pack("<I", len(rel)) + rel
            + struct.pack("<Q", size) + struct.pack("<q", mtime_ns))
    return blake3.blake3(data).hexdigest()


@pytest.mark.parametrize("rel,size,mtime", [
    (b"scene001/img_0001.jpg", 307_200, 1_700_000_000_123_456_789),
    (b"", 0, 0),
    ("图片/ä.png".encode(), 1, -1),
    (b"\xff\xfe-not-utf8.jpg", 2**63, 2**62),
])
def test_stamp_key_matches_the_design_formula(rel, size, mtime):
    assert _core.stamp_key(rel, size, mtime) == reference_key(rel, size, mtime)


def test_pinned_vector():
    # The same vector is pinned in rust/core/src/key.rs: both sides must agree forever.
    assert _core.stamp_key(b"scene001/img_0001.jpg", 307_200, 1_700_000_000_123_456_789) == (
        "0c753eb4ba0f06b37b5a3e7defe849d58378c83cf7537e382cf55968eda3de05")


def test_stamp_key_uses_the_relative_path_and_stamp(tree):
    root, rels = tree
    st = os.stat(os.path.join(root, rels[0]))
    assert featstore.stamp_key(rels[0], root) == reference_key(rels[0].encode(), st.st_size, st.st_mtime_ns)
    assert featstore.stamp_key(os.path.join(root, rels[0]), root) == featstore.stamp_key(rels[0], root)


def test_legacy_key_is_sha256_of_path_as_given_plus_bytes(tree):
    root, rels = tree
    path = os.path.join(root, rels[0])
    with open(path, "rb") as f:
        expected = hashlib.sha256(path.encode() + f.read()).hexdigest()[:16]
    assert featstore.legacy_sha256_key(path) == expected
    # The path as the old loader passed it matters: a moved dataset needs the old root.
    keys = _core.legacy_sha256_keys([b"/old/root/" + rels[0].encode()], [path])
    with open(path, "rb") as f:
        assert keys == [hashlib.sha256(b"/old/root/" + rels[0].encode() + f.read()).hexdigest()[:16]]


def test_batch_digests_in_parallel_report_unreadable_as_none(tree):
    root, rels = tree
    paths = [os.path.join(root, r) for r in rels] + [os.path.join(root, "missing.jpg")]
    digests = _core.file_digests(paths, threads=2)
    for p, d in zip(paths[:-1], digests[:-1], strict=True):
        with open(p, "rb") as f:
            assert d == blake3.blake3(f.read()).hexdigest()
    assert digests[-1] is None


def test_file_hash_reads_no_content(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"1234")
    st = os.stat(p)
    h = featstore.file_hash(p)
    p.write_bytes(b"5678")  # same size; restore the mtime: same stamp, so the same hash
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert featstore.file_hash(p) == h and len(h) == 32
    p.write_bytes(b"12345")
    assert featstore.file_hash(p) != h
