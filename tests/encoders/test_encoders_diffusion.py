"""Diffusion encoders through featstore.pipeline: VAE latents (pixel and control), caption
embeddings from .txt files and .jsonl fields, and the inputs that make entries stale.

Every model is tiny, random and built here: nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from featstore import FeatureStore  # noqa: E402
from featstore.encoders import ControlDir, JsonlField, TextEncoder, VAEEncoder  # noqa: E402
from featstore.encoders.diffusion import caption_path, load_image_uint8  # noqa: E402
from featstore.errors import CheckpointError  # noqa: E402
from featstore.examples import make_image_tree  # noqa: E402
from featstore.pipeline import precompute  # noqa: E402

WORDS = "a an the red blue green cat dog bird sits on under mat table photo of".split()
SIZE = (32, 24)  # (width, height) the VAE sees


def run(root, encoder, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return precompute(root, encoder=encoder, **kw)


def tiny_vae(**config):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, **config).eval()


def tiny_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]")


def tiny_text_model():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def text_parts():
    return tiny_text_model(), tiny_tokenizer()


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=40)
    return root, rels


def write_captions(root, rels):
    captions = {}
    for i, rel in enumerate(rels):
        text = f"a photo of the {WORDS[3 + i % 3]} {WORDS[6 + i % 3]}"
        with open(os.path.splitext(os.path.join(root, rel))[0] + ".txt", "w") as f:
            f.write(text + "\n")
        captions[rel] = text
    return captions


def bump_mtime(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))


def direct_latent_dist(vae, path):
    x = load_image_uint8(path, SIZE)[None].float() / 255
    with torch.no_grad():
        return vae.encode(x * 2 - 1).latent_dist


# ----------------------------------------------------------------------------------- VAE
def test_pixel_latent_from_a_model_directory(data, vae_dir):
    root, rels = data
    s = run(root, VAEEncoder(vae_dir, image_size=SIZE), batch_size=4)
    assert s["written"] == len(rels) and s["failed"] == 0 and s["feature"] == "pixel_latent"
    store = FeatureStore(root, "pixel_latent")
    entry = store.get(rels[0])
    assert set(entry) == {"latent_mean", "latent_logvar"}
    assert entry["latent_mean"].shape == (4, 12, 16) and entry["latent_mean"].dtype == torch.float32
    dist = direct_latent_dist(tiny_vae(), os.path.join(root, rels[0]))
    assert torch.allclose(entry["latent_mean"], dist.mean[0], atol=1e-5)
    assert torch.allclose(entry["latent_logvar"], dist.logvar[0], atol=1e-5)
    assert run(root, VAEEncoder(vae_dir, image_size=SIZE))["planned"] == 0
    manifest = json.load(open(os.path.join(root, "pixel_latent_cache_manifest.json")))
    assert manifest["encoder"]["output"] == "mean_logvar" and manifest["encoder"]["model_path"] == vae_dir


def test_output_modes_and_their_fingerprints(data):
    root, rels = data
    vae = tiny_vae()
    encoders = {mode: VAEEncoder(vae, output=mode, image_size=SIZE, name=f"lat_{mode}")
                for mode in ("mean_logvar", "mean", "sample")}
    assert len({e.fingerprint() for e in encoders.values()}) == 3
    for enc in encoders.values():
        assert run(root, enc)["written"] == len(rels)
    both = FeatureStore(root, "lat_mean_logvar").get(rels[1])
    mean = FeatureStore(root, "lat_mean").get(rels[1])
    sample = FeatureStore(root, "lat_sample").get(rels[1])
    assert set(mean) == set(sample) == {"latent"}
    assert torch.equal(mean["latent"], both["latent_mean"])
    noise = (sample["latent"] - both["latent_mean"]) / (0.5 * both["latent_logvar"]).exp()
    assert not torch.allclose(sample["latent"], mean["latent"]) and noise.abs().max() < 10
    base = VAEEncoder(vae, image_size=SIZE).fingerprint()
    assert VAEEncoder(vae, image_size=SIZE).fingerprint() == base
    assert VAEEncoder(vae, image_size=(32, 32)).fingerprint() != base
    assert VAEEncoder(vae, image_size=SIZE, scaling="config").fingerprint() != base
    assert VAEEncoder(tiny_vae(scaling_factor=0.5), image_size=SIZE).fingerprint() != base


def test_scaling_applies_to_mean_and_logvar(data):
    root, rels = data
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    x = load_image_uint8(os.path.join(root, rels[0]), SIZE)[None].float() / 255
    raw = VAEEncoder(vae, image_size=SIZE).encode(x)
    by_config = VAEEncoder(vae, image_size=SIZE, scaling="config").encode(x)
    assert torch.allclose(by_config["latent_mean"], (raw["latent_mean"] - 0.1) * 0.5, atol=1e-6)
    assert torch.allclose(by_config["latent_logvar"], raw["latent_logvar"] + 2 * torch.log(torch.tensor(0.5)))
    given = VAEEncoder(vae, output="mean", image_size=SIZE, scaling=(2.0, -1.0)).encode(x)
    assert torch.allclose(given["latent"], (raw["latent_mean"] + 1.0) * 2.0, atol=1e-6)


def test_qwen_image_vae_gets_one_frame_and_per_channel_normalization(data):
    root, rels = data
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                           temperal_downsample=[False], latents_mean=mean, latents_std=std).eval()
    x = load_image_uint8(os.path.join(root, rels[0]), SIZE)[None].float() / 255
    out = VAEEncoder(vae, output="mean", image_size=SIZE, scaling="config").encode(x)["latent"]
    assert out.shape == (1, 4, 12, 16)
    with torch.no_grad():
        z = vae.encode((x * 2 - 1).unsqueeze(2)).latent_dist.mean[:, :, 0]
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_control_latent_reads_the_control_image_and_goes_stale_when_it_changes(data, tmp_path):
    root, rels = data
    control_root = str(tmp_path / "control")  # outside the data root: not scanned as sources
    for rel in rels:
        target = os.path.join(control_root, os.path.splitext(rel)[0] + ".png")  # found by stem
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with Image.open(os.path.join(root, rel)) as im:
            im.convert("L").convert("RGB").save(target)
    vae = tiny_vae()
    enc = VAEEncoder(vae, name="control_latent", output="mean", image_size=SIZE,
                     control_fn=ControlDir(root, control_root))
    assert enc.fingerprint() != VAEEncoder(vae, output="mean", image_size=SIZE).fingerprint()
    s = run(root, enc)
    assert s["written"] == len(rels) and s["failed"] == 0
    store = FeatureStore(root, "control_latent")
    control = os.path.join(control_root, os.path.splitext(rels[2])[0] + ".png")
    got = store.get(rels[2])["latent"]
    assert torch.allclose(got, direct_latent_dist(vae, control).mean[0], atol=1e-5)
    assert not torch.allclose(got, direct_latent_dist(vae, os.path.join(root, rels[2])).mean[0], atol=1e-3)

    with Image.open(control) as im:
        im.rotate(90).save(control)
    bump_mtime(control)
    assert store.state(rels[2]) == "stale"
    assert "control" in store.explain(rels[2])
    assert [store.state(r) for r in rels].count("valid") == len(rels) - 1
    again = run(root, enc)
    assert again["planned"] == 1 and again["written"] == 1
    assert torch.allclose(store.get(rels[2])["latent"], direct_latent_dist(vae, control).mean[0], atol=1e-5)

    os.remove(os.path.join(control_root, os.path.splitext(rels[3])[0] + ".png"))
    assert store.state(rels[3]) == "stale"
    missing = run(root, enc)
    assert missing["failed"] == 1 and "no control image" in missing["failures"][0][1]


# ----------------------------------------------------------------------------------- text
def test_prompt_embed_from_txt_captions_and_a_caption_edit_recomputes_exactly_it(data, text_parts):
    root, rels = data
    model, tok = text_parts
    captions = write_captions(root, rels)
    os.rename(os.path.splitext(os.path.join(root, rels[4]))[0] + ".txt", os.path.join(root, rels[4]) + ".txt")
    enc = TextEncoder(model, tok, max_length=8)
    s = run(root, enc, batch_size=4)
    assert s["written"] == len(rels) and s["failed"] == 0 and s["feature"] == "prompt_embed"
    store = FeatureStore(root, "prompt_embed")
    entry = store.get(rels[0])
    assert set(entry) == {"prompt_embed", "prompt_embeds_mask"}
    assert entry["prompt_embed"].shape == (8, 16) and entry["prompt_embeds_mask"].shape == (8,)
    assert entry["prompt_embeds_mask"].dtype == torch.int64
    assert int(entry["prompt_embeds_mask"].sum()) == len(captions[rels[0]].split())
    tokens = tok([captions[rels[0]]], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(**tokens).last_hidden_state[0]
    assert torch.allclose(entry["prompt_embed"], direct, atol=1e-5)
    assert caption_path(os.path.join(root, rels[4])) == os.path.join(root, rels[4]) + ".txt"

    before = store.get(rels[1])["prompt_embed"].clone()
    txt = caption_path(os.path.join(root, rels[1]))
    with open(txt, "w") as f:
        f.write("a blue bird under the table")
    bump_mtime(txt)
    assert store.state(rels[1]) == "stale"
    assert [store.state(r) for r in rels].count("valid") == len(rels) - 1
    again = run(root, enc)
    assert again["planned"] == 1 and again["written"] == 1
    assert not torch.allclose(store.get(rels[1])["prompt_embed"], before)
    assert run(root, enc)["planned"] == 0


def test_missing_caption_is_a_recorded_failure(data, text_parts):
    root, rels = data
    write_captions(root, rels)
    os.remove(caption_path(os.path.join(root, rels[0])))
    s = run(root, TextEncoder(*text_parts, max_length=8))
    assert s["written"] == len(rels) - 1 and s["failed"] == 1
    assert s["failures"][0][0] == rels[0] and "no caption" in s["failures"][0][1]


def test_captions_and_control_images_from_jsonl_fields(tmp_path, text_parts):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, scenes=2, size=40)  # scene000, scene001
    controls = []
    for scene in ("scene000", "scene001"):
        os.makedirs(os.path.join(root, scene, "control"), exist_ok=True)
        with open(os.path.join(root, scene, "train.jsonl"), "w") as f:
            for rel in (r for r in rels if r.startswith(scene)):
                name = os.path.basename(rel)
                control = os.path.join(root, scene, "control", name)
                with Image.open(os.path.join(root, rel)) as im:
                    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(control)
                controls.append(control)
                f.write(json.dumps({"image": name, "control": f"control/{name}", "prompt": f"a {name[-6:-4]} cat"})
                        + "\n")
    prompts = JsonlField(root, "prompt")
    assert len(prompts) == len(rels) and not prompts.errors
    enc = TextEncoder(*text_parts, max_length=8, captions=prompts)
    s = run(root, enc, jsonl="image")
    assert s["sources"] == len(rels) and s["written"] == len(rels)  # control images are not sources
    store = FeatureStore(root, "prompt_embed")
    assert store.get(rels[0])["prompt_embed"].shape == (8, 16)

    vae = VAEEncoder(tiny_vae(), name="control_latent", output="mean", image_size=SIZE,
                     control_fn=JsonlField(root, "control").path_of)
    assert run(root, vae, jsonl="image")["written"] == len(rels)
    flipped = direct_latent_dist(tiny_vae(), controls[0]).mean[0]
    assert torch.allclose(FeatureStore(root, "control_latent").get(rels[0])["latent"], flipped, atol=1e-5)

    # Editing a caption in one .jsonl makes the entry of that line stale on lookup, and only that
    # one (the other lines of the file are unchanged); precompute recomputes it alone.
    jsonl = os.path.join(root, "scene000", "train.jsonl")
    with open(jsonl) as f:
        text = f.read()
    with open(jsonl, "w") as f:
        f.write(text.replace('"prompt": "a 00 cat"', '"prompt": "a red dog"'))
    bump_mtime(jsonl)
    edited = [r for r in rels if r.startswith("scene000") and os.path.basename(r)[-6:-4] == "00"]
    assert len(edited) == 1
    assert [r for r in rels if store.state(r) == "stale"] == edited
    again = run(root, TextEncoder(*text_parts, max_length=8, captions=JsonlField(root, "prompt")), jsonl="image")
    assert (again["planned"], again["to_refresh"]) == (1, 0)
    assert (again["written"], again["refreshed"]) == (1, 0)
    assert all(FeatureStore(root, "prompt_embed").state(r) == "valid" for r in rels)


def test_text_encoder_from_directories_and_its_fingerprint(tmp_path, text_parts):
    model, tok = text_parts
    model_dir, tok_dir = str(tmp_path / "text_encoder"), str(tmp_path / "tokenizer")
    model.save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)
    enc = TextEncoder(model_dir, tok_dir, max_length=8, model_class="CLIPTextModel")
    assert enc.fingerprint() == TextEncoder(model_dir, tok_dir, max_length=8,
                                            model_class="CLIPTextModel").fingerprint()
    out = enc.encode(["a red cat", "the dog sits on the mat"])
    ref = TextEncoder(model, tok, max_length=8).encode(["a red cat", "the dog sits on the mat"])
    assert torch.allclose(out["prompt_embed"], ref["prompt_embed"], atol=1e-5)
    assert torch.equal(out["prompt_embeds_mask"], ref["prompt_embeds_mask"])
    base = TextEncoder(model, tok, max_length=8)
    assert TextEncoder(model, tok, max_length=8).fingerprint() == base.fingerprint()
    assert TextEncoder(model, tok, max_length=12).fingerprint() != base.fingerprint()
    penultimate = TextEncoder(model, tok, max_length=8, hidden_state=-2)
    assert penultimate.fingerprint() != base.fingerprint()
    assert penultimate.encode(["a cat"])["prompt_embed"].shape == (1, 8, 16)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextEncoder(str(tmp_path / "nowhere"), tok, max_length=8)
    with pytest.raises(CheckpointError, match="does not exist"):
        VAEEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="multiples of 8"):
        VAEEncoder(tiny_vae(), image_size=(30, 24))


def test_importing_featstore_encoders_imports_neither_library():
    code = ("import sys, featstore.encoders; "
            "print('diffusers' in sys.modules or 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jsonl_lines_that_cannot_be_read_are_named_when_a_caption_is_missing(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "good.jsonl").write_text('{"image": "a.jpg", "prompt": "a cat"}\n{not json\n')
    (root / "latin1.jsonl").write_bytes('{"image": "b.jpg", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    prompts = JsonlField(root, "prompt")
    assert prompts[root / "a.jpg"] == "a cat"
    assert {where.rsplit("/", 1)[-1] for where, _ in prompts.errors} == {"good.jsonl:2", "latin1.jsonl"}
    with pytest.raises(KeyError, match="2 .jsonl lines or files were skipped"):
        prompts[root / "b.jpg"]


def test_a_tokenizer_keeps_its_digest_once_it_has_been_used():
    """Fast tokenizers record the last call's truncation and padding on their backend: a used
    tokenizer must not make the next run's entries foreign."""
    from featstore.encoders.diffusion import tokenizer_digest

    tokenizer = tiny_tokenizer()
    before = tokenizer_digest(tokenizer)
    tokenizer(["a cat"], padding="max_length", truncation=True, max_length=8)
    assert tokenizer_digest(tokenizer) == before
