"""The entry format: safetensors compatibility, alignment, zero-copy reads and every malformed file."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

import featstore
from featstore import _core
from featstore._torch import to_raw
from featstore.errors import CorruptEntryError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def write(path, tensors, metadata=None):
    raw, keep = to_raw(tensors)
    return _core.write_entry(str(path), raw, metadata or {})


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = (3, i + 1)
        if dt.is_floating_point:
            out[f"t{i}"] = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            out[f"t{i}"] = torch.randint(0, 2, shape, generator=g).bool()
        else:
            out[f"t{i}"] = torch.randint(0, 100, shape, generator=g).to(dt)
    out["empty"] = torch.zeros(0, 5)
    out["scalar"] = torch.tensor(3.5)
    return out


def test_roundtrip_every_dtype_and_safe_open_reads_it(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "e.safetensors"
    write(path, tensors, {"note": "hi"})
    capsules, meta, _ = _core.read_entry(str(path))
    got = {n: torch.from_dlpack(c) for n, c in capsules}
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert meta["note"] == "hi" and meta["featstore.format"] == "featstore-entry-v1"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata()["data.blake3"] == meta["data.blake3"]
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def test_data_is_aligned(tmp_path):
    path = tmp_path / "e.safetensors"
    write(path, sample_tensors())
    meta, tensors, data_start = _core.read_header(str(path))
    assert data_start % 64 == 0
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    for name, dtype, _shape, start, _end in tensors:
        assert start % sizes[dtype] == 0, (name, dtype, start)


def test_tensors_are_views_of_a_private_mapping(tmp_path):
    path = tmp_path / "e.safetensors"
    write(path, {"features": torch.arange(1 << 20, dtype=torch.float32)})
    before = path.read_bytes()
    capsules, _, (addr, length) = _core.read_entry(str(path))
    t = torch.from_dlpack(capsules[0][1])
    assert addr <= t.data_ptr() and t.data_ptr() + t.numel() * 4 <= addr + length
    t.add_(1)  # copy-on-write: the file never changes
    assert path.read_bytes() == before
    assert t[0].item() == 1.0


def test_mapping_outlives_the_file_and_the_entry_object(tmp_path):
    path = tmp_path / "e.safetensors"
    write(path, {"x": torch.arange(10, dtype=torch.int64)})
    capsules, _, _ = _core.read_entry(str(path))
    t = torch.from_dlpack(capsules[0][1])
    del capsules
    os.remove(path)  # a rewrite renames over the name; the old inode lives while mapped
    assert t.tolist() == list(range(10))


def test_pread_mode_reads_the_same_tensors(tmp_path):
    path = tmp_path / "e.safetensors"
    tensors = sample_tensors()
    write(path, tensors)
    capsules, _, _ = _core.read_entry(str(path), pread=True)
    for name, c in capsules:
        t = torch.from_dlpack(c)
        assert t.data_ptr() % t.element_size() == 0  # the owned buffer is aligned like the file
        assert torch.equal(t, tensors[name])


def test_checksum_catches_damaged_data(tmp_path):
    path = tmp_path / "e.safetensors"
    write(path, {"x": torch.ones(1000)})
    _core.verify_entry(str(path))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptEntryError, match="checksum"):
        _core.verify_entry(str(path))


def test_writer_rejects_inconsistent_input(tmp_path):
    with pytest.raises(featstore.FeatstoreError, match="does not fit"):
        _core.write_entry(str(tmp_path / "x"), [("a", "F32", [4], 0, 8)], {})
    with pytest.raises(featstore.FeatstoreError, match="reserved or repeated"):
        _core.write_entry(str(tmp_path / "x"), [("__metadata__", "U8", [0], 0, 0)], {})
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- malformed files
def raw_entry(header: dict, data: bytes = b"", declared_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared_len is None else declared_len) + h + data


MALFORMED = {
    "empty file": b"",
    "shorter than the length prefix": b"\x01\x02",
    "header length larger than the file": raw_entry({}, declared_len=10_000),
    "header length over the cap": struct.pack("<Q", 1 << 40) + b"{}",
    "malformed JSON": struct.pack("<Q", 5) + b"{nope",
    "header not an object": raw_entry([1, 2]),  # type: ignore[arg-type]
    "unknown dtype": raw_entry({"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets out of range": raw_entry({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    "offsets reversed": raw_entry({"x": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4),
    "overlapping tensors": raw_entry({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "shape does not match bytes": raw_entry({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "hole before a tensor": raw_entry({"x": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8),
    "trailing bytes": raw_entry({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 8),
    "negative shape": raw_entry({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
    "metadata not strings": raw_entry({"__metadata__": {"a": 1}}),
    "shape overflow": raw_entry({"x": {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_entries_raise_corrupt_entry_error(tmp_path, name):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[name])
    for pread in (False, True):
        with pytest.raises(CorruptEntryError) as info:
            _core.read_entry(str(path), pread=pread)
        assert str(path) in str(info.value)
    with pytest.raises(CorruptEntryError):
        _core.read_header(str(path))


def test_truncated_entry_mid_data(tmp_path):
    path = tmp_path / "e.safetensors"
    write(path, {"x": torch.ones(1 << 16)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptEntryError, match="out of range|truncated"):
        _core.read_entry(str(path))
