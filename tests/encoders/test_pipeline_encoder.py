"""PipelineEncoder (issue 15): each family's cached entries equal what its own pipeline computes
when called directly (tiny random pipelines built offline, featstore.examples.pipelines), an
edited caption, control image or .jsonl line makes exactly the right entries stale, and the CLI
caches the diffusion users' four tensors."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from conftest import age, cli
from PIL import Image

import featstore
from featstore.encoders import PipelineEncoder
from featstore.encoders.diffusion import ControlDir, JsonlField, load_image_uint8
from featstore.encoders.diffusion.families import family_of, qwen_edit_prompt_image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from featstore.examples import pipelines as tiny_pipelines  # noqa: E402

CAPTIONS = ["a red cat sits on the mat", "two dogs", "a small house under a blue sky with trees and a road"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, str]:
    """family -> a saved tiny pipeline directory."""
    out = {}
    for family in tiny_pipelines.FAMILIES:
        if tiny_pipelines.unavailable(family) is None:
            out[family] = tiny_pipelines.save_pipeline(family, str(tmp_path_factory.mktemp(family)))
    return out


def _pipeline(pipelines: dict[str, str], family: str) -> str:
    if family not in pipelines:
        pytest.skip(tiny_pipelines.unavailable(family) or family)
    return pipelines[family]


def _data(root: str, control_root: str | None = None) -> list[str]:
    """Three images (of two sizes) with .txt captions, and control images of other sizes."""
    rels = []
    for i, caption in enumerate(CAPTIONS):
        rel = f"scene/img_{i}.png"
        os.makedirs(os.path.join(root, "scene"), exist_ok=True)
        Image.new("RGB", (48, 32) if i % 2 else (32, 32), (60 * i, 120, 200)).save(os.path.join(root, rel))
        with open(os.path.join(root, f"scene/img_{i}.txt"), "w") as f:
            f.write(caption + "\n")
        if control_root:
            os.makedirs(os.path.join(control_root, "scene"), exist_ok=True)
            Image.new("RGB", (40, 24 + 8 * i), (200, 30 * i, 10)).save(os.path.join(control_root, rel))
        rels.append(rel)
    for d in (root, control_root):
        for dirpath, _, files in os.walk(d or root):
            for f in files:
                age(os.path.join(dirpath, f))
    return rels


def _loaded(path: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


@torch.no_grad()  # as the pipelines' __call__ runs (autograd's kernels may differ in the last bits)
def _direct_prompt(pipe, family: str, caption: str, control: str | None) -> dict[str, torch.Tensor]:
    """What the pipeline's own encode_prompt returns for one caption (as __call__ calls it)."""
    dev = torch.device("cpu")
    if family in ("qwen_image", "qwen_image_edit"):
        kwargs = {}
        if control is not None:
            from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
            from diffusers.utils import load_image

            image = load_image(control)
            w, h, _ = calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
            kwargs["image"] = pipe.image_processor.resize(image, h, w)  # as __call__ does
        embeds, mask = pipe.encode_prompt(prompt=caption, device=dev, max_sequence_length=512, **kwargs)
        n = embeds.shape[1] if mask is None else int(mask[0].sum())
        return {"prompt_embed": embeds[0, :n], "prompt_embeds_mask": torch.ones(n, dtype=torch.int64)}
    if family == "sd15":
        return {"prompt_embed": pipe.encode_prompt(caption, dev, 1, False)[0][0]}
    if family == "sdxl":
        e, _, pooled, _ = pipe.encode_prompt(caption, device=dev, do_classifier_free_guidance=False)
        return {"prompt_embed": e[0], "pooled_prompt_embed": pooled[0]}
    if family == "flux":
        e, pooled, _ = pipe.encode_prompt(prompt=caption, prompt_2=None, device=dev)
        return {"prompt_embed": e[0], "pooled_prompt_embed": pooled[0]}
    e, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=512, device=dev)
    return {"prompt_embed": e[0]}


@pytest.mark.parametrize("family", tiny_pipelines.FAMILIES)
def test_prompt_entries_equal_the_pipelines_own_encode_prompt(pipelines, family, tmp_path):
    path = _pipeline(pipelines, family)
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    rels = _data(root, control)
    edit = family_of(_class(path)).takes_control
    enc = PipelineEncoder(path, "prompt", control_fn=ControlDir(root, control) if edit else None)
    s = featstore.precompute(root, encoder=enc, progress=False)
    assert s["written"] == len(rels) and not s["failed"]
    store = featstore.FeatureStore(root, "prompt_embed")
    pipe = _loaded(path)
    for rel, caption in zip(rels, CAPTIONS, strict=True):
        got = store.get(rel)
        want = _direct_prompt(pipe, family, caption, os.path.join(control, rel) if edit else None)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert got[name].shape == t.shape, name
            assert torch.equal(got[name], t.to(got[name].dtype)), name
    if family_of(_class(path)).masked:  # unpadded: captions of other lengths, other lengths
        assert len({store.get(r)["prompt_embed"].shape[0] for r in rels}) > 1


def _class(path: str) -> str:
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)["_class_name"]


@pytest.mark.parametrize("family", tiny_pipelines.FAMILIES)
def test_latent_entries_equal_the_pipelines_own_vae(pipelines, family, tmp_path):
    path = _pipeline(pipelines, family)
    root = str(tmp_path / "data")
    rels = _data(root)
    enc = PipelineEncoder(path, "latent", scaling="none")
    assert featstore.precompute(root, encoder=enc, progress=False)["written"] == len(rels)
    store = featstore.FeatureStore(root, "pixel_latent")
    vae = _loaded(path).vae
    video = type(vae).__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLWan")
    for rel in rels:
        x = load_image_uint8(os.path.join(root, rel), None, family_of(_class(path)).latent_multiple)
        x = x[None].float() / 255 * 2 - 1
        with torch.inference_mode():
            mean = vae.encode(x.unsqueeze(2) if video else x).latent_dist.mean
        want = mean.squeeze(2)[0] if video else mean[0]
        # Precompute encodes same-size images as one batch: a convolution over a batch of two may
        # round differently in the last bits than over one image.
        torch.testing.assert_close(store.get(rel)["pixel_latent"], want, rtol=1e-5, atol=1e-6)


def test_config_scaling_gives_the_latents_the_transformer_sees(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image")
    root = str(tmp_path / "data")
    rels = _data(root)
    featstore.precompute(root, encoder=PipelineEncoder(path, "latent"), progress=False)
    vae = _loaded(path).vae
    x = load_image_uint8(os.path.join(root, rels[0]), None, 16)[None].float() / 255 * 2 - 1
    with torch.inference_mode():
        mean = vae.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0]
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    got = featstore.FeatureStore(root, "pixel_latent").get(rels[0])["pixel_latent"]
    torch.testing.assert_close(got, ((mean - m) / s)[0])  # the pipeline's own normalization


def test_the_edit_control_image_is_prepared_as_the_pipeline_prepares_it(pipelines):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    pipe = _loaded(_pipeline(pipelines, "qwen_image_edit"))
    for size in [(40, 24), (33, 57), (1000, 10), (512, 512)]:
        image = Image.new("RGB", size, (10, 200, 30))
        w, h, _ = calculate_dimensions(1024 * 1024, size[0] / size[1])
        ours, theirs = qwen_edit_prompt_image(image), pipe.image_processor.resize(image, h, w)
        assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes()


def test_an_edited_control_image_makes_the_edit_prompt_entry_stale(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image_edit")
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    rels = _data(root, control)
    enc = PipelineEncoder(path, "prompt", control_fn=ControlDir(root, control))
    featstore.precompute(root, encoder=enc, progress=False)
    store = featstore.FeatureStore(root, "prompt_embed")
    before = store.get(rels[1])["prompt_embed"].clone()
    Image.new("RGB", (40, 40), (0, 0, 0)).save(os.path.join(control, rels[1]))
    store = featstore.FeatureStore(root, "prompt_embed")
    assert [store.state(r) for r in rels] == ["valid", "stale", "valid"]
    assert "control" in store.explain(rels[1])
    s = featstore.precompute(root, encoder=PipelineEncoder(path, "prompt", control_fn=ControlDir(root, control)),
                             progress=False)
    assert s["written"] == 1
    after = featstore.FeatureStore(root, "prompt_embed").get(rels[1])["prompt_embed"]
    assert not torch.equal(before, after)  # the control image is part of the prompt embedding


def test_an_edit_prompt_without_control_images_is_refused(pipelines):
    path = _pipeline(pipelines, "qwen_image_edit")
    with pytest.raises(ValueError, match="needs control images.*--control-dir"):
        PipelineEncoder(path, "prompt")


def test_an_unknown_pipeline_class_names_the_supported_ones(tmp_path):
    with open(tmp_path / "model_index.json", "w") as f:
        json.dump({"_class_name": "KandinskyPipeline"}, f)
    with pytest.raises(ValueError, match="KandinskyPipeline.*QwenImageEditPipeline.*FluxPipeline"):
        PipelineEncoder(str(tmp_path), "prompt")


def test_a_missing_pipeline_directory_says_what_to_pass(tmp_path):
    with pytest.raises(featstore.CheckpointError, match="model_index.json.*nothing is downloaded"):
        PipelineEncoder(str(tmp_path / "nope"), "latent")


def test_an_edited_jsonl_line_makes_only_its_entry_stale(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image")
    root = str(tmp_path / "data")
    rels = _data(root)
    jsonl = os.path.join(root, "train.jsonl")

    def write(captions: list[str]) -> None:
        with open(jsonl, "w") as f:
            for rel, caption in zip(rels, captions, strict=True):
                f.write(json.dumps({"image": rel, "prompt": caption}) + "\n")

    write(CAPTIONS)
    enc = PipelineEncoder(path, "prompt", captions=JsonlField(root, "prompt"))
    assert featstore.precompute(root, encoder=enc, jsonl="image", progress=False)["written"] == 3
    before = {r: featstore.FeatureStore(root, "prompt_embed").get(r)["prompt_embed"].clone() for r in rels}
    write([CAPTIONS[0], "two dogs running on the beach", CAPTIONS[2]])
    # Each entry depends on its own line: the edited line's entry is stale, the others hold.
    assert [featstore.FeatureStore(root, "prompt_embed").state(r) for r in rels] == ["valid", "stale", "valid"]
    enc = PipelineEncoder(path, "prompt", captions=JsonlField(root, "prompt"))
    plan = featstore.precompute(root, encoder=enc, jsonl="image", dry_run=True, progress=False)
    assert (plan["planned"], plan["to_refresh"]) == (1, 0)
    s = featstore.precompute(root, encoder=enc, jsonl="image", progress=False)
    assert (s["written"], s["refreshed"]) == (1, 0)
    store = featstore.FeatureStore(root, "prompt_embed")
    assert [store.state(r) for r in rels] == ["valid"] * 3
    want = _direct_prompt(_loaded(path), "qwen_image", "two dogs running on the beach", None)
    assert torch.equal(store.get(rels[1])["prompt_embed"], want["prompt_embed"])
    for r in (rels[0], rels[2]):  # untouched: the same tensors
        assert torch.equal(store.get(r)["prompt_embed"], before[r])
    # An image edited as well is computed, not refreshed.
    write([CAPTIONS[0], "two dogs running on the beach", CAPTIONS[2] + " at night"])
    Image.new("RGB", (32, 32), (1, 2, 3)).save(os.path.join(root, rels[0]))
    enc = PipelineEncoder(path, "prompt", captions=JsonlField(root, "prompt"))
    s = featstore.precompute(root, encoder=enc, jsonl="image", progress=False)
    assert (s["written"], s["refreshed"]) == (2, 0)  # rels[0] (its image) and rels[2] (its line) computed


def test_the_cli_caches_the_four_tensors_of_a_qwen_image_edit_dataset(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image_edit")
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    rels = _data(root, control)
    for part in ("latent", "control_latent", "prompt"):
        extra = ([] if part == "latent" else ["--control-dir", control]) + \
            (["--image-size", "32", "32"] if part != "prompt" else [])
        rc, out, err = cli("precompute", root, "--pipeline", path, "--part", part, *extra)
        assert rc == 0, err
        # Said as what it is: the pipeline's part, its captions counted as items, the bound as a bound.
        assert f"with QwenImageEditPipeline's {part} part ({path})" in out, out
        if part == "prompt":
            assert "at most" in out and "items/s overall" in out and "load" in out, out
        assert "\r" not in err  # no loading bars off a terminal
    for feature, names in [("pixel_latent", ["pixel_latent"]), ("control_latent", ["control_latent"]),
                           ("prompt_embed", ["prompt_embed", "prompt_embeds_mask"])]:
        store = featstore.FeatureStore(root, feature)
        assert store.status(rels).counts["valid"] == 3
        assert sorted(store.get(rels[0])) == names

    # The diffusion guide's training example: one CachedDataset per feature, each wrapping the one before.
    samples = [{"image": p} for p in featstore.scan(root).paths]
    ds = samples
    for feature in ("pixel_latent", "control_latent", "prompt_embed"):
        ds = featstore.CachedDataset(ds, featstore.FeatureStore(root, feature), path_fn=lambda s: s["image"],
                                     cached_key=f"{feature}_cached")
    batches = list(ds.loader(batch_size=3, num_workers=2))
    assert len(batches) == 1
    batch = batches[0]
    prompts = featstore.FeatureStore(root, "prompt_embed")
    lengths = [prompts.get(p)["prompt_embed"].shape[0] for p in batch["image"]]
    assert batch["prompt_embed"].shape[:2] == (3, max(lengths)) and len(set(lengths)) > 1
    assert batch["prompt_embeds_mask"].tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]
    assert torch.equal(batch["prompt_embed_mask"], batch["prompt_embeds_mask"].bool())
    assert "prompt_embeds_mask_mask" not in batch  # a mask is padded, not given a mask of its own
    latents = featstore.FeatureStore(root, "pixel_latent")
    for row, p in enumerate(batch["image"]):
        assert torch.equal(batch["pixel_latent"][row], latents.get(p)["pixel_latent"])
        assert torch.equal(batch["prompt_embed"][row, :lengths[row]], prompts.get(p)["prompt_embed"])
    for key in ("pixel_latent_cached", "control_latent_cached", "prompt_embed_cached"):
        assert batch[key].all()


def _usage_error(*args: str) -> str:
    """The CLI's stderr for a usage error (argparse exits 2)."""
    from featstore.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    return err.getvalue()


def test_cli_usage_errors_for_pipeline_flags(pipelines, tmp_path):
    root = str(tmp_path / "data")
    _data(root)
    assert "--part apply to a diffusion pipeline: add --pipeline DIR" in _usage_error("precompute", root, "--part",
                                                                                        "prompt")
    assert "--pipeline needs --part" in _usage_error("precompute", root, "--pipeline", str(tmp_path))
    assert "add --jsonl IMAGE_FIELD" in _usage_error("precompute", root, "--pipeline", str(tmp_path), "--part",
                                                     "prompt", "--captions", "prompt")
    assert "--layers, --mode apply to VGGT, not to a diffusion pipeline" in _usage_error(
        "precompute", root, "--pipeline", str(tmp_path), "--part", "latent", "--layers", "-1", "--mode", "pad")
    path = _pipeline(pipelines, "sd15")
    assert "reads no control images" in _usage_error("precompute", root, "--pipeline", path, "--part", "latent",
                                                     "--control-dir", str(tmp_path))


def test_a_loaded_pipeline_gives_the_same_entries_and_the_prompt_part_loads_no_transformer(pipelines, tmp_path):
    path = _pipeline(pipelines, "sdxl")
    root = str(tmp_path / "data")
    rels = _data(root)
    from_dir = PipelineEncoder(path, "prompt")
    from_dir.to("cpu")
    assert from_dir.pipe.transformer is None if hasattr(from_dir.pipe, "transformer") else True
    assert getattr(from_dir.pipe, "unet", None) is None and getattr(from_dir.pipe, "vae", None) is None
    featstore.precompute(root, encoder=from_dir, progress=False)
    loaded = PipelineEncoder(_loaded(path), "prompt", name="prompt_loaded")
    featstore.precompute(root, encoder=loaded, progress=False)
    a, b = featstore.FeatureStore(root, "prompt_embed"), featstore.FeatureStore(root, "prompt_loaded")
    for rel in rels:
        for name in ("prompt_embed", "pooled_prompt_embed"):
            assert torch.equal(a.get(rel)[name], b.get(rel)[name])


def test_max_length_pads_with_the_mask_and_never_truncates(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image")
    root = str(tmp_path / "data")
    rels = _data(root)
    featstore.precompute(root, encoder=PipelineEncoder(path, "prompt", max_length=64), progress=False)
    store = featstore.FeatureStore(root, "prompt_embed")
    pipe = _loaded(path)
    for rel, caption in zip(rels, CAPTIONS, strict=True):
        got, want = store.get(rel), _direct_prompt(pipe, "qwen_image", caption, None)
        n = want["prompt_embed"].shape[0]
        assert got["prompt_embed"].shape[0] == 64 and int(got["prompt_embeds_mask"].sum()) == n
        assert torch.equal(got["prompt_embed"][:n], want["prompt_embed"]) and not got["prompt_embed"][n:].any()
    # Too short for a caption: the run stops with the fix (a setting, not one bad image).
    with pytest.raises(ValueError, match="more than max_length=4; raise max_length .*never truncated"):
        featstore.precompute(root, encoder=PipelineEncoder(path, "prompt", max_length=4, name="short"),
                             progress=False)


def test_the_fingerprint_follows_the_components_and_the_library_version(pipelines, tmp_path, monkeypatch):
    import shutil

    import diffusers

    path = _pipeline(pipelines, "sd15")
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    base = PipelineEncoder(copy, "prompt").fingerprint()
    assert PipelineEncoder(copy, "prompt").fingerprint() == base
    assert PipelineEncoder(copy, "latent").fingerprint() != base
    with open(os.path.join(copy, "tokenizer", "special_tokens_map.json"), "a") as f:
        f.write("\n")  # a tokenizer file changed: another fingerprint
    changed = PipelineEncoder(copy, "prompt").fingerprint()
    assert changed != base
    monkeypatch.setattr(diffusers, "__version__", "0.0.1")
    assert PipelineEncoder(copy, "prompt").fingerprint() != changed


def test_the_cli_takes_captions_from_a_jsonl_field(pipelines, tmp_path):
    path = _pipeline(pipelines, "flux")
    root = str(tmp_path / "data")
    rels = _data(root)
    for rel in rels:
        os.remove(os.path.join(root, os.path.splitext(rel)[0] + ".txt"))
    with open(os.path.join(root, "meta.jsonl"), "w") as f:
        for rel, caption in zip(rels, CAPTIONS, strict=True):
            f.write(json.dumps({"image": rel, "prompt": caption}) + "\n")
    rc, _, err = cli("precompute", root, "--pipeline", path, "--part", "prompt", "--jsonl", "image",
                     "--captions", "prompt", "--max-sequence-length", "32")
    assert rc == 0, err
    got = featstore.FeatureStore(root, "prompt_embed").get(rels[2])
    with torch.no_grad():
        e, pooled, _ = _loaded(path).encode_prompt(prompt=CAPTIONS[2], prompt_2=None, device=torch.device("cpu"),
                                                   max_sequence_length=32)
    assert torch.equal(got["prompt_embed"], e[0]) and torch.equal(got["pooled_prompt_embed"], pooled[0])


def test_encoders_pickle_for_spawned_workers_without_their_weights(pipelines, tmp_path):
    import pickle

    path = _pipeline(pipelines, "qwen_image_edit")
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    rels = _data(root, control)
    for part in ("prompt", "control_latent"):
        enc = PipelineEncoder(path, part, control_fn=ControlDir(root, control))
        enc.to("cpu")
        copy = pickle.loads(pickle.dumps(enc))
        assert type(copy) is type(enc) and copy.fingerprint() == enc.fingerprint()
        assert getattr(copy, "pipe", None) is None
        assert copy._vae is None or copy._vae.model is None  # the VAE's weights stay behind too
        first = os.path.join(root, rels[0])
        a, b = enc.preprocess(first), copy.preprocess(first)
        if part == "prompt":
            assert a[0] == b[0] and a[1].tobytes() == b[1].tobytes()
        else:
            assert torch.equal(a, b)


def test_a_missing_control_image_fails_only_its_item(pipelines, tmp_path):
    path = _pipeline(pipelines, "qwen_image_edit")
    root, control = str(tmp_path / "data"), str(tmp_path / "control")
    rels = _data(root, control)
    os.remove(os.path.join(control, rels[1]))
    rc, out, err = cli("precompute", root, "--pipeline", path, "--part", "prompt", "--control-dir", control)
    assert rc == 1 and "Traceback" not in err
    assert f"no control image for {os.path.join(root, rels[1])}" in out + err
    store = featstore.FeatureStore(root, "prompt_embed")
    assert [store.state(r) for r in rels] == ["valid", "missing", "valid"]


def test_a_pipeline_directory_without_a_component_names_it(pipelines, tmp_path):
    import shutil

    path = _pipeline(pipelines, "sd15")
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    shutil.rmtree(os.path.join(copy, "tokenizer"))
    root = str(tmp_path / "data")
    _data(root)
    rc, _, err = cli("precompute", root, "--pipeline", copy, "--part", "prompt")
    assert rc == 1 and "Traceback" not in err
    assert f"pipeline {copy} has no tokenizer/ folder" in err
