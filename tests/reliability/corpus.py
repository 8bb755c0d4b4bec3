"""Makes the corpus of hostile entry files in ``rust/core/tests/corpus/``.

Run ``python tests/reliability/corpus.py`` to (re)write it. Each file is a valid entry written
by featstore's own writer, then damaged one way. The name says what every reader must conclude:
``valid-*`` parses and passes its checksum, ``damaged-*`` parses but fails its checksum (the data
changed after writing), ``corrupt-*`` is refused as a corrupt entry. The Rust fuzz test
(``rust/core/tests/header_fuzz.rs``) and ``test_hostile_entries.py`` replay them on every run;
the ``regression-`` part of a name marks inputs that once got past the parser.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable

import torch

from featstore import _core
from featstore._torch import to_raw

CORPUS_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "rust", "core",
                                          "tests", "corpus"))

META = {"feature": "vggt", "fingerprint": "0123456789abcdef", "source": "scene/img.jpg", "source.size": "1234",
        "source.mtime_ns": "1700000000000000000", "racy": "0"}


def written(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes featstore's writer produces for these tensors."""
    raw, keep = to_raw(tensors) if tensors else ([], [])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "e.safetensors")
        _core.write_entry(path, raw, dict(META if metadata is None else metadata))
        del keep
        with open(path, "rb") as f:
            return f.read()


def split(entry: bytes) -> tuple[dict, bytes]:
    """(header JSON, data section) of an entry."""
    (n,) = struct.unpack("<Q", entry[:8])
    return json.loads(entry[8:8 + n]), entry[8 + n:]


def join(header: dict | str | bytes, data: bytes, *, skew: int = 0) -> bytes:
    """An entry from a header (an object, or raw text) and data, the header padded with spaces so
    the data starts ``skew`` bytes past a multiple of 64 (featstore's writer: 0)."""
    text = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * ((skew - 8 - len(text)) % 64)
    return struct.pack("<Q", len(text)) + text + data


def edit(entry: bytes, change: Callable[[dict], None]) -> bytes:
    """The entry with its header changed in place (``change`` mutates the parsed JSON)."""
    header, data = split(entry)
    change(header)
    return join(header, data)


def tensor(name: str, dtype: str, shape: list[int], offsets: list[int]) -> dict:
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


def cases() -> dict[str, bytes]:
    """{file name: bytes} of the whole corpus."""
    g = torch.Generator().manual_seed(0)
    features = written({"features": torch.randn(48, generator=g)})
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    every = written({f"t_{str(dt).split('.')[1]}": torch.ones(2, 3, dtype=dt) for dt in dtypes})
    zero = written({"empty": torch.zeros(0, 5), "none": torch.zeros(0, dtype=torch.int64),
                    "ids": torch.arange(3, dtype=torch.uint8)})
    header, data = split(features)
    out: dict[str, bytes] = {
        "valid-features-f32.bin": features,
        "valid-every-dtype.bin": every,
        "valid-zero-sized.bin": zero,
        "valid-scalar.bin": written({"scalar": torch.tensor(2.5)}),
        "valid-metadata-only.bin": written({}),
        "valid-unicode-names.bin": written({"é✓ a b": torch.ones(2)}, {"caption": "a \"quoted\" é✓"}),
    }
    flipped = bytearray(features)
    flipped[-5] ^= 0x10
    out["damaged-data-bitflip.bin"] = bytes(flipped)
    out["damaged-checksum-rewritten.bin"] = edit(features, lambda h: h["__metadata__"].update(
        {"data.blake3": "0" * 64}))
    out["damaged-checksum-missing.bin"] = edit(features, lambda h: h["__metadata__"].pop("data.blake3"))

    def set_field(name: str, field: str, value: object) -> Callable[[dict], None]:
        return lambda h: h[name].__setitem__(field, value)

    n = len(data)
    out.update({
        "corrupt-empty.bin": b"",
        "corrupt-seven-bytes.bin": features[:7],
        "corrupt-header-len-zero.bin": struct.pack("<Q", 0) + features[8:],
        "corrupt-header-len-u64-max.bin": struct.pack("<Q", 2**64 - 1) + features[8:],
        "corrupt-header-len-over-limit.bin": struct.pack("<Q", (16 << 20) + 1) + features[8:],
        "corrupt-header-len-past-eof.bin": struct.pack("<Q", len(features)) + features[8:],
        "corrupt-truncated-in-header.bin": features[:40],
        "corrupt-truncated-in-data.bin": features[:-1],
        "corrupt-trailing-bytes.bin": features + b"\0" * 8,
        "corrupt-json-garbage.bin": join(bytes(range(256)) * 2, data),
        "corrupt-json-not-an-object.bin": join("[1, 2, 3]", data),
        "corrupt-json-deep-nesting.bin": join("[" * 10_000 + "]" * 10_000, data),
        "corrupt-json-invalid-utf8.bin": join(json.dumps(header).encode().replace(b"features", b"feat\xffres"), data),
        "corrupt-json-truncated.bin": join(json.dumps(header)[:-2], data),
        "corrupt-json-nul-inside.bin": join(json.dumps(header)[:-1] + "\0}", data),
        "corrupt-metadata-not-an-object.bin": edit(features, lambda h: h.__setitem__("__metadata__", ["a"])),
        "corrupt-metadata-value-number.bin": edit(features, lambda h: h["__metadata__"].__setitem__("racy", 1)),
        "corrupt-metadata-key-is-a-tensor.bin": edit(features, lambda h: h["__metadata__"].__setitem__(
            "t", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})),
        "corrupt-description-not-an-object.bin": edit(features, lambda h: h.__setitem__("features", [0, n])),
        "corrupt-dtype-unknown.bin": edit(features, set_field("features", "dtype", "F128")),
        "corrupt-dtype-lowercase.bin": edit(features, set_field("features", "dtype", "f32")),
        "corrupt-dtype-missing.bin": edit(features, lambda h: h["features"].pop("dtype")),
        "corrupt-dtype-number.bin": edit(features, set_field("features", "dtype", 4)),
        "corrupt-shape-negative.bin": edit(features, set_field("features", "shape", [-48])),
        "corrupt-shape-float.bin": edit(features, set_field("features", "shape", [48.0])),
        "corrupt-shape-missing.bin": edit(features, lambda h: h["features"].pop("shape")),
        "corrupt-shape-mismatch.bin": edit(features, set_field("features", "shape", [49])),
        "corrupt-shape-product-overflows-u64.bin": edit(features, set_field("features", "shape", [2**32, 2**32, 2])),
        "corrupt-shape-number-overflows-u64.bin": join(json.dumps(header).replace("[48]", "[18446744073709551616]"),
                                                        data),
        "corrupt-regression-shape-dim-exceeds-i64.bin": join(
            {**tensor("t", "F32", [0, 2**64 - 1], [0, 0]), "__metadata__": META}, b""),
        "corrupt-regression-shape-strides-overflow-i64.bin": join(
            {**tensor("t", "F32", [0, 2**40, 2**40], [0, 0]), "__metadata__": META}, b""),
        "corrupt-offsets-reversed.bin": edit(features, set_field("features", "data_offsets", [n, 0])),
        "corrupt-offsets-past-end.bin": edit(features, set_field("features", "data_offsets", [4, n + 4])),
        "corrupt-offsets-three-numbers.bin": edit(features, set_field("features", "data_offsets", [0, n, n])),
        "corrupt-offsets-negative.bin": edit(features, set_field("features", "data_offsets", [-4, n - 4])),
        "corrupt-offsets-u64-max.bin": edit(features, set_field("features", "data_offsets", [2**64 - 1, 2**64 - 1])),
        "corrupt-offsets-overlap.bin": join({**tensor("a", "F32", [2], [0, 8]), **tensor("b", "F32", [2], [4, 12]),
                                             "__metadata__": META}, bytes(12)),
        "corrupt-offsets-hole.bin": join({**tensor("a", "F32", [1], [0, 4]), **tensor("b", "F32", [1], [8, 12]),
                                          "__metadata__": META}, bytes(12)),
        "corrupt-regression-misaligned-tensor.bin": join(
            {**tensor("a", "U8", [3], [0, 3]), **tensor("b", "F32", [4], [3, 19]), "__metadata__": META}, bytes(19)),
        "corrupt-regression-misaligned-data-start.bin": join(
            {**tensor("a", "F64", [2], [0, 16]), "__metadata__": META}, bytes(16), skew=4),
    })
    return out


def main() -> None:
    os.makedirs(CORPUS_DIR, exist_ok=True)
    for old in os.listdir(CORPUS_DIR):
        if old.endswith(".bin"):
            os.remove(os.path.join(CORPUS_DIR, old))
    made = cases()
    for name, data in made.items():
        with open(os.path.join(CORPUS_DIR, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(made)} files to {os.path.normpath(CORPUS_DIR)}", file=sys.stderr)


if __name__ == "__main__":
    main()
