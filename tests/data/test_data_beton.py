"""Writing and opening .beton datasets: round trips, split sources, the demo set, damaged files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastprompt.data import DEMO_CLASSNAMES, open_dataset, write_demo, write_imagefolder
from fastprompt.data.demo import DemoConfig, DemoImages
from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD
from fastprompt.data.splits import SPLIT_CODE, stratified_split
from fastprompt.errors import FastpromptError


def decoded_pixels(ds, split: str, size: int) -> dict[int, np.ndarray]:
    """Every image of `split` through the eval pipeline at its own size, back to uint8 (H, W, 3)."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None] * 255  # (3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None] * 255  # (3, 1, 1)
    out = {}
    for images, _, index in ds.loader(split, train=False, image_size=size, batch_size=16, return_indices=True):
        for image, i in zip(images.numpy(), index.tolist()):  # image (3, S, S)
            out[i] = np.clip(np.round(image * std + mean), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return out


@pytest.fixture(scope="module")
def flat(flat_tree, tmp_path_factory):
    root, pixels = flat_tree
    out = tmp_path_factory.mktemp("flat_out") / "shapes.beton"
    summary = write_imagefolder(root, out, max_resolution=64, jpeg_quality=95, workers=2, eval_size=32)
    return summary, open_dataset(out), pixels


def test_imagefolder_round_trip_labels_and_splits(flat, flat_tree):
    summary, ds, pixels = flat
    assert (ds.name, ds.template) == ("my_shapes", "a photo of a {}.")
    assert ds.classnames == ["class a", "class b", "class c"]
    paths = ds.meta["paths"]
    assert sorted(paths) == sorted(pixels)
    folders = ["class_a", "class_b", "class_c"]
    assert [folders[label] for label in ds.labels] == [p.split("/")[0] for p in paths]  # labels exact
    expected = stratified_split([sorted(p for p in pixels if p.startswith(f + "/")) for f in folders], folders)
    split_of = {s.path: SPLIT_CODE[s.split] for s in expected}
    assert ds.splits.tolist() == [split_of[p] for p in paths]  # splits exact
    assert np.all(np.diff(ds.splits) >= 0)  # stored train, then val, then test
    assert ds.split_sizes == {"train": 16, "val": 6, "test": 9} == summary.split_sizes
    assert ds.meta["split_source"] == "stratified 50/20/30 split"


def test_imagefolder_round_trip_pixels(flat, flat_tree):
    _, ds, pixels = flat
    from ffcv.reader import Reader
    from PIL import Image

    from fastprompt.data.pixels import clip_eval_pixels

    assert ds.eval_size == 32 and ds.meta["image"]["eval_format"] == "raw"
    meta = Reader(str(ds.path)).metadata["f0"]
    large = ds.meta["paths"].index("class_b/large.png")
    assert ds.splits[large] != SPLIT_CODE["train"]  # the stratified split puts it in val/test: stored evaluation-ready
    assert (int(meta["width"][large]), int(meta["height"][large]), int(meta["mode"][large])) == (32, 32, 1)  # raw
    decoded = {}
    for split in ("train", "val", "test"):
        decoded.update(decoded_pixels(ds, split, 32))
    assert sorted(decoded) == list(range(ds.num_samples))
    for i, path in enumerate(ds.meta["paths"]):
        if ds.splits[i] != SPLIT_CODE["train"]:  # CLIP's eval transform of the original, exactly
            with Image.open(flat_tree[0] / path) as im:
                expected = clip_eval_pixels(im.convert("RGB"), 32)
            assert np.array_equal(decoded[i], expected), path
            continue
        err = np.abs(decoded[i].astype(np.int16) - pixels[path].astype(np.int16))
        assert err.mean() < 2.5 and err.max() <= 24, (path, err.mean(), err.max())  # JPEG q95 tolerance


def test_training_images_are_stored_whole_up_to_the_caps(tmp_path, make_tree):
    from ffcv.reader import Reader

    files = {"a/wide.png": (60, 150), "a/tall.png": (150, 60), "a/small.png": (20, 30), "b/x.png": (16, 16)}
    make_tree(tmp_path / "root" / "train", files)
    for split in ("val", "test"):
        make_tree(tmp_path / "root" / split, {"a/t.png": (40, 40), "b/t.png": (40, 40)}, seed=1)
    write_imagefolder(tmp_path / "root", tmp_path / "w.beton", train_short_side=48, max_resolution=100, eval_size=24,
                      workers=1)
    ds = open_dataset(tmp_path / "w.beton")
    meta = Reader(str(ds.path)).metadata["f0"]
    sizes = {p: (int(meta["height"][i]), int(meta["width"][i])) for i, p in enumerate(ds.meta["paths"])}
    # shorter side to 48 (torchvision's int(48 * 150 / 60) = 120), then the longest side to 100
    assert sizes["train/a/wide.png"] == (40, 100) and sizes["train/a/tall.png"] == (100, 40)
    assert sizes["train/a/small.png"] == (20, 30) and sizes["test/a/t.png"] == (24, 24)
    assert ds.meta["image"] == {"max_resolution": 100, "jpeg_quality": 90, "train_short_side": 48, "eval_size": 24,
                                "eval_format": "raw"}


def test_coop_split_json(coop_tree, tmp_path):
    root, split_json, split = coop_tree
    summary = write_imagefolder(root, tmp_path / "eurosat.beton", split_json=split_json, workers=1)
    ds = open_dataset(tmp_path / "eurosat.beton")
    assert (ds.name, ds.template) == ("eurosat", "a centered satellite photo of {}.")
    assert ds.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    entries = split["train"] + split["val"] + split["test"]
    assert ds.meta["paths"] == [e[0] for e in entries]
    assert ds.labels.tolist() == [e[1] for e in entries]
    assert ds.splits.tolist() == [0] * len(split["train"]) + [1] * len(split["val"]) + [2] * len(split["test"])
    assert summary.split_sizes == {"train": 9, "val": 3, "test": 6}
    assert ds.meta["split_source"] == "split_zhou_EuroSAT.json"


def test_split_folders(tmp_path, make_tree):
    files = {f"{split}/{c}/{k}.png": (16, 16) for split, n in (("train", 5), ("val", 2), ("test", 3)) for c in ("cat", "dog") for k in range(n)}
    make_tree(tmp_path / "pets_small", files)
    write_imagefolder(tmp_path / "pets_small", tmp_path / "a.beton", name="OxfordPets", workers=1)
    ds = open_dataset(tmp_path / "a.beton")
    assert (ds.name, ds.template) == ("oxford_pets", "a photo of a {}, a type of pet.")
    assert ds.split_sizes == {"train": 10, "val": 4, "test": 6}
    assert [p.split("/")[0] for p in ds.meta["paths"]] == [["train", "val", "test"][s] for s in ds.splits]
    assert [["cat", "dog"][lab] for lab in ds.labels] == [p.split("/")[1] for p in ds.meta["paths"]]

    shutil.rmtree(tmp_path / "pets_small" / "val")  # no val/: 20% of train held out per class
    summary = write_imagefolder(tmp_path / "pets_small", tmp_path / "b.beton", workers=1)
    assert summary.split_sizes == {"train": 8, "val": 2, "test": 6}
    assert "held out" in summary.split_source


def test_demo_is_deterministic(demo, tmp_path):
    assert demo.classnames == list(DEMO_CLASSNAMES) and len(set(DEMO_CLASSNAMES)) >= 10
    assert (demo.name, demo.template) == ("demo", "a photo of a {}.")
    assert demo.split_sizes == {"train": 250, "val": 100, "test": 150}
    a, b, c = DemoImages(DemoConfig()), DemoImages(DemoConfig()), DemoImages(DemoConfig(seed=1))
    for i in (0, 123, 499):
        assert np.array_equal(a.load(i), b.load(i)) and a.load(i).shape == (96, 96, 3)
        assert not np.array_equal(a.load(i), c.load(i))
    # the written set does not depend on the number of writer processes
    write_demo(tmp_path / "demo1.beton", workers=1)
    again = open_dataset(tmp_path / "demo1.beton")
    for key in ("classnames", "labels", "splits", "paths", "split_sizes"):
        assert again.meta[key] == demo.meta[key]
    first, second = decoded_pixels(demo, "val", 96), decoded_pixels(again, "val", 96)
    assert sorted(first) == sorted(second) and all(np.array_equal(first[i], second[i]) for i in first)


def _copy(ds_path: Path, dst: Path) -> Path:
    shutil.copy(ds_path, dst / "x.beton")
    shutil.copy(ds_path.with_suffix(".json"), dst / "x.json")
    return dst / "x.beton"


def test_open_rejects_damaged_datasets(demo_path, tmp_path):
    with pytest.raises(FastpromptError, match="does not exist; create it with `fastprompt prepare"):
        open_dataset(tmp_path / "nothing.beton")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(demo_path, lone / "demo.beton")
    with pytest.raises(FastpromptError, match="has no sidecar demo.json"):
        open_dataset(lone / "demo.beton")

    beton = _copy(demo_path, tmp_path)
    size = beton.stat().st_size
    with open(beton, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(FastpromptError, match="is truncated"):
        open_dataset(beton)

    beton = _copy(demo_path, tmp_path)  # truncated and the sidecar edited to match: the header check
    with open(beton, "r+b") as f:
        f.truncate(size // 2)
    meta = json.loads(beton.with_suffix(".json").read_text())
    beton.with_suffix(".json").write_text(json.dumps({**meta, "beton_bytes": size // 2}))
    with pytest.raises(FastpromptError, match="truncated or corrupt"):
        open_dataset(beton)

    beton = _copy(demo_path, tmp_path)
    meta["labels"] = [(x + 1) % 10 for x in meta["labels"]]
    beton.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(FastpromptError, match="disagree on labels or splits"):
        open_dataset(beton)

    beton.with_suffix(".json").write_text("{not json")
    with pytest.raises(FastpromptError, match="not readable JSON"):
        open_dataset(beton)


def test_failed_write_leaves_nothing(flat_tree, tmp_path, make_tree, list_files):
    root, _ = flat_tree
    with pytest.raises(FastpromptError, match="must end in .beton"):
        write_imagefolder(root, tmp_path / "out.ffcv")
    with pytest.raises(FastpromptError, match="class 'x' has 2 image"):
        bad = tmp_path / "tiny"
        make_tree(bad, {"x/0.png": (8, 8), "x/1.png": (8, 8)})
        write_imagefolder(bad, tmp_path / "sub" / "t.beton")
    assert list_files(tmp_path) == ["tiny", *("tiny/" + f for f in list_files(tmp_path / "tiny"))] and not (tmp_path / "sub").exists()
