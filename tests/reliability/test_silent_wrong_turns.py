"""The silent wrong turns a new user met, each made as they made it: stacked features storing the
same tensor name, a store without a manifest reading another encoder's entry, sample paths
relative to the working directory, lazy mode on images of mixed sizes, a mistyped --feature,
and start-up counts that cannot be true. Each must now be right, or loud."""

from __future__ import annotations

import glob
import json
import os
import warnings

import pytest
import torch
from conftest import age
from toy_encoders import MeanColor

import featstore
from featstore import CachedDataset, FeatureStore, _core
from featstore.cli import main
from featstore.errors import AmbiguousPathError
from featstore.examples import make_image_tree
from featstore.pipeline import precompute

from .conftest import listing


def _run(root: str, encoder: object, **kw) -> dict:
    return precompute(root, encoder=encoder, num_workers=0, progress=False, **kw)


def _tree(tmp_path, count: int = 6) -> tuple[str, list[str]]:
    root = str(tmp_path / "data")
    rels = make_image_tree(root, count, size=16)
    for r in rels:
        age(os.path.join(root, r))
    return root, rels


class Layer(MeanColor):
    """One "layer" of a toy encoder: both store a tensor named ``features``, of other sizes."""

    def __init__(self, layer: int) -> None:
        super().__init__(tag=f"layer{layer}")
        self.layer = layer

    def encode(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": super().encode(batch)["features"][:, : 8 * self.layer]}


def test_stacked_features_that_store_one_tensor_name_are_refused_or_renamed(tmp_path, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, rels = _tree(tmp_path)
    for layer in (1, 2):
        _run(root, Layer(layer), feature=f"layer{layer}")
    samples = [{"image": r} for r in rels]

    def stack(**outer: object) -> CachedDataset:
        inner = CachedDataset(samples, FeatureStore(root, "layer1"), path_fn=lambda s: s["image"],
                              cached_key="layer1_cached", log_start=False)
        return CachedDataset(inner, FeatureStore(root, "layer2"), path_fn=lambda s: s["image"],
                             cached_key="layer2_cached", log_start=False, **outer)

    with pytest.raises(ValueError, match="feature layer2 serves 'features'.*feature layer1.*rename=") as info:
        stack()
    assert "pad=" not in str(info.value)  # not the misleading advice of the collate error
    ds = stack(rename={"features": "features_layer2"})
    for batch in (next(iter(ds.loader(batch_size=3, num_workers=2))),
                  next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)))):
        assert batch["layer1_cached"].all() and batch["layer2_cached"].all()
        for j, rel in enumerate(rels[:3]):
            assert torch.equal(batch["features"][j], FeatureStore(root, "layer1").get(rel)["features"])
            assert torch.equal(batch["features_layer2"][j], FeatureStore(root, "layer2").get(rel)["features"])
    # A base sample's own key is never written over either, in the workers or in fill().
    clashing = [{"image": r, "features": "the user's own"} for r in rels]
    ds = CachedDataset(clashing, FeatureStore(root, "layer1"), path_fn=lambda s: s["image"], log_start=False)
    for batches in (lambda: ds.loader(batch_size=2, num_workers=2), lambda: ds.loader(batch_size=2),
                    lambda: torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate)):
        with pytest.raises(ValueError, match="which the base samples already holds"):
            next(iter(batches()))
    # Entries with no manifest summary (put by hand): the collision is found at the first sample.
    for layer in (1, 2):
        os.remove(FeatureStore(root, f"layer{layer}").manifest_path)
        for r in rels:
            FeatureStore(root, f"layer{layer}").put(r, {"features": torch.full((layer,), float(layer))})
    with pytest.raises(ValueError, match="feature layer2 serves 'features'.*rename="):
        next(iter(torch.utils.data.DataLoader(stack(), batch_size=2, collate_fn=featstore.collate)))
    fig.add(runs=1, cases=14)
    fig.note("two stacked features both storing 'features' (of other shapes): refused when built, or at the first "
             "sample without a manifest summary, naming both features and rename=; renamed, both served in "
             "loader() and a plain DataLoader")


def test_a_store_without_a_manifest_never_serves_whichever_encoders_entry_it_reads_first(tmp_path, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, rels = _tree(tmp_path)
    _run(root, MeanColor(tag="a"))
    FeatureStore(root, "toy", fingerprint="toy-b").put(rels[0], {"features": torch.zeros(48)})
    manifest = FeatureStore(root, "toy").manifest_path
    os.rename(manifest, manifest + ".aside")  # as a damaged manifest's error advises
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for order in (rels, rels[::-1]):
            assert all(FeatureStore(root, "toy").get(r) is None for r in order)
        assert FeatureStore(root, "toy").state(rels[0]) == "foreign"
        assert "no manifest records which encoder" in FeatureStore(root, "toy").explain(rels[1])
        a = FeatureStore(root, "toy", fingerprint="toy-a")
        assert [a.get(r) is not None for r in rels] == [False] + [True] * (len(rels) - 1)
    # The advice in that reason is true: precompute with the encoder writes the manifest again.
    assert _run(root, MeanColor(tag="a"))["written"] == 1
    assert FeatureStore(root, "toy").states(rels) == ["valid"] * len(rels)
    # A store opened before a lazy run created the manifest takes its fingerprint then.
    other = str(tmp_path / "other")
    more = make_image_tree(other, 2, size=16)
    early = FeatureStore(other, "toy")
    ds = CachedDataset([{"p": r} for r in more], FeatureStore(other, "toy"), path_fn=lambda s: s["p"],
                       encoder=MeanColor, mode="lazy", log_start=False)
    assert [bool(x["cached"]) for x in ds] == [False, False]
    assert early.states(more) == ["valid", "valid"] and early.fingerprint == "toy-v1"
    fig.add(runs=2, cases=8)
    fig.note("entries of two encoders, the manifest moved aside: none served whatever the reading order, each "
             "'foreign' with advice that works; a store opened before a lazy run's manifest takes its fingerprint")


def test_sample_paths_relative_to_the_working_directory_are_read_as_written(tmp_path, monkeypatch, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, rels = _tree(tmp_path)
    _run(root, MeanColor())
    monkeypatch.chdir(tmp_path)
    samples = [{"image_path": p} for p in sorted(glob.glob("data/**/*.jpg", recursive=True))]
    assert samples and not os.path.isabs(samples[0]["image_path"])
    ds = CachedDataset(samples, FeatureStore("data", "toy"), path_fn=lambda s: s["image_path"], log_start=False)
    for batch in ds.loader(batch_size=2, num_workers=2):
        assert batch["cached"].all()
    lazy = CachedDataset(samples, FeatureStore("data", "toy"), path_fn=lambda s: s["image_path"],
                         encoder=MeanColor, mode="lazy", log_start=False)
    assert all(bool(x["cached"]) for x in lazy)
    # The CLI reads them the same way.
    assert main(["explain", samples[0]["image_path"], "--data-root", "data", "--feature", "toy"]) == 0
    # A path that names a file either way is refused, naming both readings.
    os.makedirs("data/data/scene000", exist_ok=True)
    twin = samples[0]["image_path"]
    with open(os.path.join("data", twin), "wb") as f:
        f.write(b"another file")
    with pytest.raises(AmbiguousPathError, match=f"{os.path.join(root, twin)}.*{os.path.join(root, rels[0])}"):
        CachedDataset(samples, FeatureStore("data", "toy"), path_fn=lambda s: s["image_path"], log_start=False)
    fig.add(runs=1, cases=5)
    fig.note("samples from glob('data/**/*.jpg') with the data root 'data': read, lazy and explain all read them "
             "relative to the working directory; a path naming a file both ways refused naming both")


def test_a_read_mode_dataset_that_finds_nothing_cached_says_so_once(tmp_path, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, rels = _tree(tmp_path)
    _run(root, MeanColor())
    wrong = [{"image_path": os.path.join("elsewhere", r)} for r in rels]  # names no file
    ds = CachedDataset(wrong, FeatureStore(root, "toy"), path_fn=lambda s: s["image_path"], on_miss="skip",
                       log_start=False)
    with pytest.warns(UserWarning, match=r"none of the first 2 samples has a valid toy entry.*elsewhere/scene.*"
                                         r"does not exist: relative paths are read relative to the data root"):
        batches = list(ds.loader(batch_size=2))
    assert not any(b["cached"].any() for b in batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next epoch is quiet
        list(ds.loader(batch_size=2))
    fig.add(runs=1, cases=2)
    fig.note("a read-mode dataset whose paths name no file: one warning with how many, the first path, its state "
             "and the likely cause, instead of an epoch of zeros in silence")


def test_lazy_mode_pads_what_the_encoder_says_varies(tmp_path, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    from featstore.encoders import VGGTEncoder

    root = str(tmp_path / "data")
    rels = make_image_tree(root, 4, size=64, mixed_sizes=True)
    ds = CachedDataset([{"p": r} for r in rels], FeatureStore(root, "vggt"), path_fn=lambda s: s["p"],
                       encoder=lambda: VGGTEncoder(random_weights_seed=0), mode="lazy", log_start=False)
    assert ds.pad == ("features",)
    for epoch in range(2):
        batch = next(iter(ds.loader(batch_size=4)))
        lengths = batch["features_mask"].sum(dim=1).tolist()
        assert len(set(lengths)) > 1 and batch["cached"].all() == bool(epoch)
        for j, rel in enumerate(rels):
            entry = FeatureStore(root, "vggt").get(rel)["features"]
            assert torch.equal(batch["features"][j, : lengths[j]], entry)
    # The lazy writes summed up the shapes: a later dataset pads without asking the encoder.
    doc = json.loads(_core.read_manifest(FeatureStore(root, "vggt").manifest_path))
    assert doc["tensors"]["features"]["shape"][0] is None
    assert CachedDataset([{"p": r} for r in rels], FeatureStore(root, "vggt"), path_fn=lambda s: s["p"],
                         log_start=False).pad == ("features",)
    fig.add(runs=2, cases=2 * len(rels) + 2)
    fig.note("mode='lazy' with VGGT's default crop on images of 4 aspect ratios: padded with a mask as in read "
             "mode, no flag; entries equal the rows")


def test_a_mistyped_feature_is_an_error_naming_the_features_there(tmp_path, capsys, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, _ = _tree(tmp_path)
    _run(root, MeanColor(), feature="vggt")
    cases = 0
    for command in ("verify", "status", "gc"):
        for typo in ("vgg", "VGGT", "vgtt"):
            assert main([command, root, "--feature", typo]) == 1
            err = capsys.readouterr().err
            assert f"feature '{typo}' has no manifest and no entries" in err and "did you mean --feature vggt" in err
            cases += 1
    for command in ("verify", "gc"):  # without --feature: the root's only feature, as status does
        assert main([command, root, "--json"]) == 0
        assert "--feature vggt (the only feature with a manifest" in capsys.readouterr().err
        cases += 1
    fig.add(runs=1, cases=cases)
    fig.note("verify, status and gc with --feature vgg / VGGT / vgtt: exit 1 naming the features there (did you "
             "mean vggt); verify and gc without --feature take the root's only one")


def test_start_up_counts_are_never_impossible(tmp_path, caplog, figures):
    fig = figures("silent wrong turns: names, fingerprints, paths, sizes, counts")
    root, rels = _tree(tmp_path, 8)
    _run(root, MeanColor())
    for r in rels[:3]:  # renamed and deleted after the run: the manifest index still lists them
        os.rename(os.path.join(root, r), os.path.join(root, r + ".moved.png"))
    _run(root, MeanColor(), files_from=listing(tmp_path, [r + ".moved.png" for r in rels[:3]]))
    doc = json.loads(_core.read_manifest(FeatureStore(root, "toy").manifest_path))
    assert doc["processed_images"] > doc["total_images"]  # the situation the user met
    with caplog.at_level("INFO", logger="featstore"):
        CachedDataset([{"p": r} for r in rels], FeatureStore(root, "toy"), path_fn=lambda s: s["p"])
        fresh = str(tmp_path / "fresh")
        more = make_image_tree(fresh, 2, size=16)
        CachedDataset([{"p": r} for r in more], FeatureStore(fresh, "toy"), paths=more, encoder=MeanColor,
                      mode="lazy")
    first, second = caplog.messages
    assert f"{doc['processed_images']} entries indexed for {doc['total_images']} sources" in first, first
    assert " of " not in first.split("feature toy")[1].split("(")[0], first
    assert "cached count unknown until the encoder is built" in second, second
    fig.add(runs=1, cases=2)
    fig.note("a manifest indexing renamed sources (more entries than sources) and a lazy run before any manifest: "
             "the start line says what it knows, never '301 of 299' or '0 of 60'")


