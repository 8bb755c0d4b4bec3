"""Hostile pickles: legacy ``.pt`` caches crafted to run code when unpickled are refused by every
reader, and none of them runs.

Each payload creates a marker file when unpickled the ordinary way; a control run in a forked
child proves it (else the test would prove nothing). Then each is put where featstore meets old
caches: a ``<image>.vggt_cache.pt`` sidecar (``FeatureStore.get``, ``load_legacy_sidecar``,
``featstore migrate --yes``, ``featstore verify``) and an ``EmbeddingCacheManager`` ``.pt``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import warnings

import pytest
import torch
from conftest import cli

from featstore import FeatureStore
from featstore.compat import EmbeddingCacheManager, load_legacy_sidecar
from featstore.errors import CorruptEntryError
from featstore.examples import make_image_tree

from .conftest import fork


class _Reduce:
    """Pickles as ``fn(*args)``: what a malicious ``__reduce__`` does."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def payloads(marker: str) -> dict[str, bytes]:
    """Pickles that create ``marker`` when loaded with ``pickle.load`` or ``torch.load(weights_only=False)``."""
    cmd = f"touch {marker}"
    m = marker.encode()
    return {
        "os.system via __reduce__": pickle.dumps({"features": _Reduce(os.system, cmd)}, protocol=2),
        "builtins.exec": pickle.dumps({"features": _Reduce(exec, f"open({marker!r}, 'w').close()")}, protocol=4),
        "builtins.eval": pickle.dumps(_Reduce(eval, f"__import__('os').system({cmd!r})"), protocol=3),
        "functools.partial(os.system)": pickle.dumps(_Reduce(functools.partial(os.system, cmd))),
        # Hand-written opcodes, as an attacker would (no class needed to make them):
        "GLOBAL subprocess.Popen (protocol 0)": b"csubprocess\nPopen\n((lp0\nS'touch'\naS'" + m + b"'\natR.",
        "INST posix.system (protocol 0)": b"(S'" + cmd.encode() + b"'\niposix\nsystem\n.",
        "STACK_GLOBAL os.system (protocol 4)": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)])
                                                + cmd.encode() + b"\x85R."),
        # torch.save's zip format, the reducer beside real tensors:
        "torch.save zip, os.system beside a tensor": _torch_saved(
            {"features": torch.ones(3), "path": _Reduce(os.system, cmd)}),
        "torch.save zip, builtins.exec as the tensor": _torch_saved(
            {"features": _Reduce(exec, f"open({marker!r}, 'w').close()")}),
    }


def _load_all_the_ordinary_way(directory: str) -> None:
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        try:
            if data.startswith(b"PK"):  # torch.save's zip format
                torch.load(io.BytesIO(data), weights_only=False)
            else:
                pickle.loads(data)
        except Exception:  # a payload may fail after it ran; only the marker matters
            pass


def test_crafted_legacy_pickles_are_refused_everywhere_and_never_run(tmp_path, figures):
    fig = figures("hostile pickles: legacy .pt that run code")
    # Control: every payload really runs code when unpickled the ordinary way.
    control = tmp_path / "control"
    control.mkdir()
    made = {}
    for i, name in enumerate(payloads("unused")):
        made[name] = str(tmp_path / f"control-marker-{i}")
        (control / f"{i}.pt").write_bytes(payloads(made[name])[name])
    child = fork(_load_all_the_ordinary_way, str(control))
    child.join(60)
    assert [n for n, marker in made.items() if not os.path.exists(marker)] == [], "a payload is not live"

    marker = str(tmp_path / "marker")
    root = str(tmp_path / "data")
    evil = payloads(marker)
    rels = make_image_tree(root, len(evil), size=16)
    manager = EmbeddingCacheManager(str(tmp_path / "cache"))
    os.makedirs(os.path.join(manager.cache_dir, "pixel_latent"))
    sidecars = []
    for data, rel in zip(evil.values(), rels, strict=True):
        sidecar = os.path.join(root, rel) + ".vggt_cache.pt"
        with open(sidecar, "wb") as f:
            f.write(data)
        sidecars.append(sidecar)
        with open(os.path.join(manager.cache_dir, "pixel_latent", f"h{len(sidecars)}.pt"), "wb") as f:
            f.write(data)
    refusals = 0
    store = FeatureStore(root, "vggt")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for i, (sidecar, rel) in enumerate(zip(sidecars, rels, strict=True)):
            with pytest.raises(CorruptEntryError, match="refused"):
                load_legacy_sidecar(sidecar)
            with pytest.raises(CorruptEntryError, match="refused"):
                store.get(rel)
            assert manager.load_cache("pixel_latent", f"h{i + 1}") is None
            refusals += 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols
        rc, out, _ = cli("migrate", root, "--yes", "--json")
        migrated = json.loads(out)
        rc_verify, out, _ = cli("verify", root, "--feature", "vggt", "--json")
        doc = json.loads(out)
    assert rc == 1 and sorted(r[0] for r in migrated["refused"]) == sorted(sidecars)
    assert all("not a plain tensor pickle" in r[1] for r in migrated["refused"]) and not migrated["converted"]
    rc = rc_verify
    assert rc == 1 and sorted(p["path"] for p in doc["problems"] if p["state"] == "corrupt") == sorted(sidecars)
    refusals += 2 * len(sidecars)
    assert all(os.path.exists(s) for s in sidecars)  # refused files are reported, never deleted
    assert not os.path.exists(marker), "a payload ran"
    fig.add(runs=len(evil), cases=refusals)
    fig.note(f"{len(evil)} payloads (os.system, exec, eval, functools.partial, subprocess.Popen, posix.system via "
             "INST, STACK_GLOBAL, torch.save zips), each live in a control run; refused by load_legacy_sidecar, get, "
             "EmbeddingCacheManager, migrate --yes, verify; marker never created")
