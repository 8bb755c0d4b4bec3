"""Everything an entry was computed from is judged as sources are, and every rule that picks a file
records what it passed over: weights rewritten in place with the same size and a restored mtime,
a control image the rule now prefers, a ``.jsonl`` path that now resolves to another file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import age
from PIL import Image

import featstore
from featstore.encoders import PipelineEncoder, VGGTEncoder, weights_digest
from featstore.encoders.diffusion import ControlDir, JsonlField


@pytest.fixture
def digest_cache(tmp_path, monkeypatch) -> str:
    """A weight-digest cache of this test's own (``$XDG_CACHE_HOME``)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return str(tmp_path / "xdg" / "featstore" / "weight-digests.json")


def _rewrite_keeping_size_and_mtime(path: str, data: bytes) -> None:
    """What a sync tool that keeps mtimes does to a fine-tuned checkpoint of the same size."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_weights_rewritten_with_the_same_size_and_mtime_change_the_fingerprint(tmp_path, digest_cache, figures):
    fig = figures("input rules: weights, control images, .jsonl paths")
    weights = str(tmp_path / "model.pt")
    with open(weights, "wb") as f:
        f.write(b"A" * 4096)
    before = VGGTEncoder(weights).fingerprint()
    assert os.path.exists(digest_cache)  # cached: the next encoder does not read the 5 GB again
    assert VGGTEncoder(weights).fingerprint() == before
    _rewrite_keeping_size_and_mtime(weights, b"B" * 4096)
    after = VGGTEncoder(weights).fingerprint()
    assert after != before  # the ctime moved: digested again, never the cached digest of other bytes
    # A whole directory swapped for another with the same names, sizes and mtimes.
    pipe, other = tmp_path / "pipe", tmp_path / "other"
    for d, byte in ((pipe, b"1"), (other, b"2")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(byte * 1024)
        os.utime(d / "model.safetensors", (1_600_000_000, 1_600_000_000))
    first = weights_digest(pipe)
    shutil.rmtree(pipe)
    os.rename(other, pipe)
    assert weights_digest(pipe) != first
    fig.add(runs=2, cases=4)
    fig.note("weights rewritten in place (same size, mtime restored) and a weights directory swapped for another "
             "with the same names, sizes and mtimes: the digest cache (keyed by the full stamp) digested them "
             "again; the fingerprint changed")


pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from featstore.examples import pipelines as tiny_pipelines  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> str:
    family = "qwen_image_edit"
    if tiny_pipelines.unavailable(family):
        pytest.skip(tiny_pipelines.unavailable(family) or family)
    return tiny_pipelines.save_pipeline(family, str(tmp_path_factory.mktemp(family)))


def _image(path: str, color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    age(path)


def test_a_control_image_the_rule_now_prefers_stops_the_entry_being_served(pipeline_dir, tmp_path, figures):
    fig = figures("input rules: weights, control images, .jsonl paths")
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    _image(os.path.join(root, "a.jpg"), (200, 10, 10))
    _image(os.path.join(root, "b.jpg"), (10, 200, 10))
    _image(os.path.join(control, "a.png"), (0, 0, 250))  # a.jpg's control: the rule falls back to a.png
    _image(os.path.join(control, "b.jpg"), (0, 250, 0))

    def encoder() -> PipelineEncoder:
        return PipelineEncoder(pipeline_dir, "control_latent", control_fn=ControlDir(root, control),
                               image_size=(32, 32))

    assert featstore.precompute(root, encoder=encoder(), progress=False)["written"] == 2
    store = featstore.FeatureStore(root, "control_latent")
    before = store.get("a.jpg")["control_latent"].clone()
    _image(os.path.join(control, "a.jpg"), (250, 250, 0))  # now the rule picks this one for a.jpg
    store = featstore.FeatureStore(root, "control_latent")
    assert [store.state(r) for r in ("a.jpg", "b.jpg")] == ["stale", "valid"]
    assert "now exists and its rule prefers it" in store.explain("a.jpg")
    s = featstore.precompute(root, encoder=encoder(), progress=False)
    assert s["written"] == 1
    after = featstore.FeatureStore(root, "control_latent").get("a.jpg")["control_latent"]
    assert not torch.equal(before, after)  # the latent of the control image the rule picks now
    fig.add(runs=1, cases=4)
    fig.note("--control-dir: control/a.png used for a.jpg, then control/a.jpg appears: the entry stale on lookup, "
             "recomputed from the new file; each rule records the candidates it passed over as must-stay-absent")


def test_a_jsonl_path_that_now_resolves_to_another_file_stops_the_entry_being_served(pipeline_dir, tmp_path,
                                                                                       figures):
    fig = figures("input rules: weights, control images, .jsonl paths")
    root = str(tmp_path / "data")
    _image(os.path.join(root, "x.png"), (200, 10, 10))
    _image(os.path.join(root, "y.png"), (10, 10, 200))
    os.makedirs(os.path.join(root, "sub"))
    with open(os.path.join(root, "sub", "meta.jsonl"), "w") as f:  # x.png: relative to sub/ first, then the root
        f.write(json.dumps({"image": "x.png", "prompt": "a red square", "control": "y.png"}) + "\n")
    age(os.path.join(root, "sub", "meta.jsonl"))

    def encoder() -> PipelineEncoder:
        return PipelineEncoder(pipeline_dir, "prompt", captions=JsonlField(root, "prompt"),
                               control_fn=JsonlField(root, "control").path_of)

    assert featstore.precompute(root, encoder=encoder(), jsonl="image", progress=False)["written"] == 1
    store = featstore.FeatureStore(root, "prompt_embed")
    assert store.state("x.png") == "valid"
    _image(os.path.join(root, "sub", "y.png"), (0, 0, 0))  # the line's control path now names sub/y.png
    assert featstore.FeatureStore(root, "prompt_embed").state("x.png") == "stale"
    os.remove(os.path.join(root, "sub", "y.png"))
    assert featstore.FeatureStore(root, "prompt_embed").state("x.png") == "valid"
    _image(os.path.join(root, "sub", "x.png"), (0, 0, 0))  # the line's image now names sub/x.png
    store = featstore.FeatureStore(root, "prompt_embed")
    assert store.state("x.png") == "stale"  # no line assigns root/x.png its caption any more
    assert "sub/x.png" in store.explain("x.png")
    s = featstore.precompute(root, encoder=encoder(), jsonl="image", progress=False)
    assert s["written"] == 1 and s["failed"] == 0  # sub/x.png, the file the line names now
    assert featstore.FeatureStore(root, "prompt_embed").state(os.path.join("sub", "x.png")) == "valid"
    fig.add(runs=1, cases=6)
    fig.note("sub/meta.jsonl lists x.png (resolved to the root's x.png) and a control y.png: sub/y.png and then "
             "sub/x.png appear, each making the entry stale on lookup; the entry records how each path resolved")
