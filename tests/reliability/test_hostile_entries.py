"""Hostile entries through the Python read paths: the fuzz corpus and hypothesis mutations.

Whatever bytes sit where an entry should be, every reader answers with tensors that are really
in the file, a clean miss, or a :class:`FeatstoreError` (``CorruptEntryError``, or
``BatchReadError``/``StaleEntryError`` for a batch): never another exception, never a crash.
The Rust side fuzzes the parser itself a million times (``rust/core/tests/header_fuzz.rs``).
"""

from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featstore import FeatureStore, _core
from featstore.compat import EmbeddingCacheManager
from featstore.errors import CorruptEntryError, FeatstoreError
from featstore.examples import make_image_tree
from featstore.explain import explain
from featstore.vocabulary import STATES

from .corpus import CORPUS_DIR as CORPUS

EXAMPLES = int(os.environ.get("FEATSTORE_HYPOTHESIS_EXAMPLES", "1000"))


def place(data: bytes, path: str) -> None:
    """Puts ``data`` at ``path`` the way featstore writes (a new file renamed over the old), so
    tensors a test still holds from the old file stay valid."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".fuzz.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Reads every byte of every tensor (a bad mapping would fault here)."""
    for t in tensors.values():
        t.view(-1).clone()


def read_every_way(store: FeatureStore, rel: str, path: str) -> dict[str, object]:
    """Reads the entry at ``path`` (the entry of ``rel``) through every Python read path. Returns
    each path's outcome: tensor names and shapes, None for a miss, or the FeatstoreError class
    name. Any other exception propagates and fails the test."""
    out: dict[str, object] = {}

    def attempt(name, fn):
        try:
            out[name] = fn()
        except FeatstoreError as exc:
            out[name] = type(exc).__name__

    def layout(tensors):
        return None if tensors is None else {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}

    def entry():
        capsules, _, _ = _core.read_entry(path)
        tensors = {n: torch.from_dlpack(c) for n, c in capsules}
        touch(tensors)
        return layout(tensors)

    def get():
        got = store.get(rel)
        if got is not None:
            touch(got)
        return layout(got)

    attempt("read_header", lambda: [t[:3] for t in _core.read_header(path)[1]])
    attempt("read_entry", entry)
    attempt("read_entry_pread", lambda: len(_core.read_entry(path, pread=True)[0]))
    attempt("verify_entry", lambda: bool(_core.verify_entry(path)))
    attempt("state", lambda: store.state(rel))
    attempt("explain", lambda: explain(store, rel).state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # misses warn once per kind
        attempt("get", get)
        attempt("read_batch", lambda: tuple(store.read_batch([rel], "features").shape))
    assert out["state"] in STATES and out["explain"] == out["state"]
    if out["read_header"] == "CorruptEntryError":
        # What the parser refuses is never served.
        assert out["read_entry"] == out["verify_entry"] == "CorruptEntryError" and out["get"] is None
    if isinstance(out["get"], dict):
        assert out["get"] == out["read_entry"]  # exactly the tensors the file holds
    return out


@pytest.fixture
def entries(tmp_path):
    """A store with one valid entry per image and the entries' original bytes. The sources carry
    a fixed old mtime: out of the racy window, and the same header text (so the same damage)
    in every run."""
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=16)
    store = FeatureStore(root, "vggt", fingerprint="fp")
    for i, rel in enumerate(rels):
        os.utime(os.path.join(root, rel), ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
        store.put(rel, {"features": torch.arange(48, dtype=torch.float32) + i,
                        "ids": torch.arange(4, dtype=torch.int64), "mask": torch.ones(5, dtype=torch.bool)})
    originals = {rel: open(store.entry_path(rel), "rb").read() for rel in rels}
    return root, rels, originals


def test_corpus_replays_through_every_python_read_path(entries, tmp_path, figures):
    fig = figures("hostile entries: corpus replay (Python readers)")
    root, rels, _ = entries
    files = sorted(f for f in os.listdir(CORPUS) if f.endswith(".bin"))
    assert len(files) >= 30
    manager = EmbeddingCacheManager(str(tmp_path / "cache"))
    reads = 0
    for i, name in enumerate(files):
        with open(os.path.join(CORPUS, name), "rb") as f:
            data = f.read()
        rel = rels[i % len(rels)]
        path = FeatureStore(root, "vggt").entry_path(rel)
        place(data, path)
        out = read_every_way(FeatureStore(root, "vggt", fingerprint="fp"), rel, path)
        reads += len(out)
        if name.startswith("corrupt-"):
            assert out["read_header"] == "CorruptEntryError", (name, out)
            assert out["get"] is None and out["state"] == "corrupt", (name, out)
        else:
            assert isinstance(out["read_header"], list), (name, out)
            assert (out["verify_entry"] is True) == name.startswith("valid-"), (name, out)
        # The drop-in manager of the old scripts reads the same files: a value or None, with a warning.
        place(data, os.path.join(manager.cache_dir, "pixel_latent", "h0.safetensors"))
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            loaded = manager.load_cache("pixel_latent", "h0")
        assert loaded is None or name.startswith(("valid-", "damaged-")), (name, loaded)
        reads += 1
    fig.add(runs=len(files), cases=reads)
    fig.note(f"{len(files)} files from rust/core/tests/corpus, each through read_header, read_entry (mapped and "
             "pread), verify_entry, state, explain, get, read_batch and EmbeddingCacheManager.load_cache")


# Structure-aware damage: the fields a header is made of, the numbers at their edges, the bytes.
EDGE = st.sampled_from([0, 1, 3, 4, 8, 63, 64, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1])
DTYPES = st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                          "F8_E4M3", "F8_E5M2", "F128", "f32", ""])
JSON = st.recursive(st.none() | st.booleans() | EDGE | st.floats(allow_nan=False) | st.text(max_size=8) | DTYPES,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
TENSORS = st.sampled_from(["features", "ids", "mask"])
SAME_BYTES = {"features": [("U8", [192]), ("F16", [96]), ("I32", [6, 8]), ("F64", [24]), ("F8_E4M3", [192]),
                           ("BOOL", [192]), ("F32", [0, 48]), ("F32", [48, 1, 1])],
              "ids": [("F64", [4]), ("U8", [32]), ("I32", [8])], "mask": [("U8", [5]), ("I8", [5, 1])]}

DAMAGE = st.one_of(
    st.tuples(st.just("field"), TENSORS, st.sampled_from(["dtype", "shape", "data_offsets"]), JSON),
    st.tuples(st.just("offsets"), TENSORS, EDGE, EDGE),
    st.tuples(st.just("shift"), TENSORS, st.integers(-70, 70)),
    st.tuples(st.just("reinterpret"), TENSORS, st.integers(0, 7)),  # same bytes, another dtype/shape
    st.tuples(st.just("metadata"), st.sampled_from(["fingerprint", "source", "source.size", "source.mtime_ns",
                                                   "source.blake3", "racy", "inputs", "data.blake3", "x"]), JSON),
    st.tuples(st.just("drop"), st.sampled_from(["features", "ids", "mask", "__metadata__"])),
    st.tuples(st.just("prefix"), EDGE),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)),
)


def damage(original: bytes, steps: list[tuple]) -> bytes:
    """Applies damage steps to an entry: header steps edit its JSON (re-encoded and padded as the
    writer does), byte steps edit the file."""
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8:8 + n]), original[8 + n:]
    raw = [s for s in steps if s[0] in ("prefix", "truncate", "flip", "append")]
    for kind, *args in steps:
        # A step whose target an earlier step removed does nothing.
        target = header.get(args[0]) if kind != "metadata" else header.get("__metadata__")
        if kind in ("field", "offsets", "shift", "reinterpret", "metadata") and not isinstance(target, dict):
            continue
        if kind == "field":
            target[args[1]] = args[2]
        elif kind == "offsets":
            target["data_offsets"] = [args[1], args[2]]
        elif kind == "shift":
            offsets = target.get("data_offsets")
            if isinstance(offsets, list) and all(type(x) is int for x in offsets):
                target["data_offsets"] = [x + args[1] for x in offsets]
        elif kind == "reinterpret":
            choices = SAME_BYTES[args[0]]
            target["dtype"], target["shape"] = choices[args[1] % len(choices)]
        elif kind == "metadata":
            target[args[0]] = args[1]
        elif kind == "drop":
            header.pop(args[0], None)
    text = json.dumps(header).encode()
    text += b" " * ((-8 - len(text)) % 64)
    out = bytearray(struct.pack("<Q", len(text)) + text + data)
    for kind, *args in raw:
        if kind == "prefix":
            out[:8] = struct.pack("<Q", args[0] % 2**64)
        elif kind == "truncate":
            del out[int(args[0] * len(out)):]
        elif kind == "flip" and out:
            out[min(int(args[0] * len(out)), len(out) - 1)] ^= args[1]
        elif kind == "append":
            out += args[0]
    return bytes(out)


def test_hypothesis_mutated_entries_are_served_whole_or_refused(entries, figures):
    fig = figures("hostile entries: hypothesis mutations (Python readers)")
    root, rels, originals = entries
    seen: dict[str, int] = {"examples": 0, "reads": 0, "served": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(which=st.sampled_from(rels), steps=st.lists(DAMAGE, min_size=1, max_size=3))
    def check(which: str, steps: list[tuple]) -> None:
        store = FeatureStore(root, "vggt", fingerprint="fp")
        path = store.entry_path(which)
        place(damage(originals[which], steps), path)
        out = read_every_way(store, which, path)
        seen["examples"] += 1
        seen["reads"] += len(out)
        seen["served" if isinstance(out["get"], dict) else "refused"] += 1

    try:
        check()
    finally:
        for rel, data in originals.items():
            place(data, FeatureStore(root, "vggt").entry_path(rel))
        fig.add(runs=seen["examples"], cases=seen["reads"])
        fig.note(f"{seen['examples']} damaged entries (derandomized), 8 read paths each; get served "
                 f"{seen['served']} (tensors exactly as in the file), missed {seen['refused']}")


def test_entry_with_a_dtype_torch_cannot_import_is_a_miss(entries):
    """float8 is valid safetensors, but featstore never writes it and DLPack cannot carry it."""
    root, rels, originals = entries
    store = FeatureStore(root, "vggt", fingerprint="fp")
    path = store.entry_path(rels[0])
    place(damage(originals[rels[0]], [("reinterpret", "features", 4)]), path)
    assert ("features", "F8_E4M3") in [t[:2] for t in _core.read_header(path)[1]]
    with pytest.raises(CorruptEntryError, match="F8_E4M3"):
        _core.read_entry(path)
    with pytest.warns(UserWarning, match="corrupt"):
        assert store.get(rels[0]) is None
    with pytest.raises(FeatstoreError):  # no valid entry holds a "features" torch can take
        store.read_batch([rels[0]], "features")
