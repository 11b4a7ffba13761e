"""`fastprompt prepare coop`: every CoOp dataset folder built in miniature, read as CoOp reads it.

Each builder lays a dataset out as KaiyangZhou/CoOp's DATASETS.md describes (real file and
folder names, split-file and text-file formats) with CoOp's full class count and one or two
images per class and split. Reading only checks that files exist, so most builders write
empty files; the end-to-end tests write real (tiny) images and a .beton.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image
from typer.testing import CliRunner

from _dassl import dassl_reference
from fastprompt.cli import app
from fastprompt.data import open_dataset
from fastprompt.data.coop import coop_datasets, read_coop_folder
from fastprompt.data.datasets import find_known_dataset
from fastprompt.errors import FastpromptError

runner = CliRunner()
Writer = Callable[[Path], None]

# CoOp's trainers/zsclip.py CUSTOM_TEMPLATES, by CoOp's dataset name
COOP_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.", "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.", "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.", "ImageNetA": "a photo of a {}.", "ImageNetR": "a photo of a {}.",
}
EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def tiny_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), (len(path.name) * 7 % 256, 90, 40)).save(path, quality=95)


def _split_json(folder: Path, image_dir: str, split_file: str, classes: list[tuple[str, Callable[[int], str]]],
                write: Writer, counts=(2, 1, 1)) -> dict:
    """A CoOp split file over `classes` (split-file class name, path of image k), labels interleaved."""
    split = {"train": [], "val": [], "test": []}
    k = 0
    for s, n in zip(("train", "val", "test"), counts):
        for rep in range(n):
            for label in (list(range(len(classes)))[::-1] if rep % 2 else range(len(classes))):
                name, path_of = classes[label]
                split[s].append([path_of(k), label, name])
                write(folder / image_dir / path_of(k))
                k += 1
    (folder / split_file).write_text(json.dumps(split))
    return split


def build_eurosat(data: Path, write: Writer) -> dict:
    names = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
             "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
    classes = [(n, lambda k, f=f: f"{f}/{f}_{k + 1}.jpg") for f, n in zip(EUROSAT, names)]
    split = _split_json(data / "eurosat", "2750", "split_zhou_EuroSAT.json", classes, write, counts=(3, 1, 2))
    return {"split": split, "names": names}


def build_caltech101(data: Path, write: Writer) -> dict:
    raw = ["accordion", "airplane", "face", "leopard", "motorbike"] + [f"category_{i:03d}" for i in range(95)]
    folders = {"airplane": "airplanes", "face": "Faces", "leopard": "Leopards", "motorbike": "Motorbikes"}
    classes = [(n, lambda k, f=folders.get(n, n): f"{f}/image_{k + 1:04d}.jpg") for n in raw]
    write(data / "caltech-101" / "101_ObjectCategories" / "BACKGROUND_Google" / "image_0001.jpg")
    split = _split_json(data / "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", classes, write)
    return {"split": split, "names": raw[:5]}


def build_oxford_pets(data: Path, write: Writer) -> dict:
    raw = ["abyssinian", "american_bulldog", "american_pit_bull_terrier"] + [f"breed_{i}" for i in range(34)]
    classes = [(n, lambda k, n=n: f"{n.title()}_{k + 1}.jpg") for n in raw]
    (data / "oxford_pets" / "annotations").mkdir(parents=True)
    split = _split_json(data / "oxford_pets", "images", "split_zhou_OxfordPets.json", classes, write)
    return {"split": split, "names": ["abyssinian", "american bulldog", "american pit bull terrier"]}


def build_stanford_cars(data: Path, write: Writer) -> dict:
    raw = ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"] + [f"2012 Make Model {i}" for i in range(194)]
    split = {"train": [], "val": [], "test": []}
    k = 0
    for s, folder in (("train", "cars_train"), ("val", "cars_train"), ("test", "cars_test")):
        for label, name in enumerate(raw):
            k += 1
            split[s].append([f"{folder}/{k:05d}.jpg", label, name])
            write(data / "stanford_cars" / folder / f"{k:05d}.jpg")
    (data / "stanford_cars" / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    return {"split": split, "names": raw[:2]}


def build_oxford_flowers(data: Path, write: Writer) -> dict:
    raw = ["pink primrose", "hard-leaved pocket orchid"] + [f"flower {i}" for i in range(100)]
    classes = [(n, lambda k: f"image_{k + 1:05d}.jpg") for n in raw]
    split = _split_json(data / "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", classes, write)
    return {"split": split, "names": raw[:2]}


def build_food101(data: Path, write: Writer) -> dict:
    raw = ["apple_pie", "baby_back_ribs"] + [f"dish_{i}" for i in range(99)]
    classes = [(n, lambda k, n=n: f"{n}/{1005649 + k}.jpg") for n in raw]
    split = _split_json(data / "food-101", "images", "split_zhou_Food101.json", classes, write)
    return {"split": split, "names": ["apple pie", "baby back ribs"]}


def build_sun397(data: Path, write: Writer) -> dict:
    raw = ["abbey", "outdoor apartment_building"] + [f"indoor room_{i}" for i in range(395)]
    dirs = ["a/abbey", "a/apartment_building/outdoor"] + [f"r/room_{i}/indoor" for i in range(395)]
    classes = [(n, lambda k, d=d: f"{d}/sun_{k:012d}.jpg") for n, d in zip(raw, dirs)]
    split = _split_json(data / "sun397", "SUN397", "split_zhou_SUN397.json", classes, write)
    return {"split": split, "names": ["abbey", "outdoor apartment building"]}


def build_dtd(data: Path, write: Writer) -> dict:
    raw = ["banded", "blotchy"] + [f"texture{i}" for i in range(45)]
    classes = [(n, lambda k, n=n: f"{n}/{n}_{k:04d}.jpg") for n in raw]
    split = _split_json(data / "dtd", "images", "split_zhou_DescribableTextures.json", classes, write)
    return {"split": split, "names": raw[:2]}


def build_ucf101(data: Path, write: Writer) -> dict:
    raw = ["Apply_Eye_Makeup", "Apply_Lipstick"] + [f"Action_{i}" for i in range(99)]
    classes = [(n, lambda k, n=n: f"{n}/v_{n.replace('_', '')}_g08_c{k:02d}.jpg") for n in raw]
    split = _split_json(data / "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", classes, write)
    return {"split": split, "names": ["Apply Eye Makeup", "Apply Lipstick"]}


def build_fgvc_aircraft(data: Path, write: Writer) -> dict:
    folder = data / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "F/A-18"] + [f"A{300 + i}" for i in range(97)]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    split = {}
    k = 1025794
    for s in ("train", "val", "test"):
        lines = []
        for label in reversed(range(len(variants))):  # file order is not label order
            lines.append(f"{k} {variants[label]}\n")
            write(folder / "images" / f"{k}.jpg")
            split.setdefault(s, []).append([f"{k}.jpg", label, variants[label]])
            k += 1
        (folder / f"images_variant_{s}.txt").write_text("".join(lines))
    return {"split": split, "names": variants[:3]}


WNIDS = [f"n{1440764 + 37 * i:08d}" for i in range(1000)]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark"] + [f"class {i}" for i in range(3, 1000)]
# CLIP's names, which CoOp's classnames.txt copies, repeat two (open_clip's IMAGENET_CLASSNAMES has the same)
IMAGENET_NAMES[657] = IMAGENET_NAMES[744] = "missile"
IMAGENET_NAMES[836] = IMAGENET_NAMES[837] = "sunglasses"
RENAMED = {"744": f"missile ({WNIDS[744]})", "837": f"sunglasses ({WNIDS[837]})"}


def _classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, IMAGENET_NAMES)))


def build_imagenet(data: Path, write: Writer) -> dict:
    folder = data / "imagenet"
    _classnames_txt(folder / "classnames.txt")
    split = {"train": [], "val": [], "test": []}
    for label, wnid in enumerate(WNIDS):
        for k in (10026, 10027):
            split["train"].append([f"train/{wnid}/{wnid}_{k}.JPEG", label, IMAGENET_NAMES[label]])
        split["test"].append([f"val/{wnid}/ILSVRC2012_val_{label + 1:08d}.JPEG", label, IMAGENET_NAMES[label]])
    for entry in split["train"] + split["test"]:
        write(folder / "images" / entry[0])
    return {"split": split, "names": IMAGENET_NAMES[:3], "renamed": RENAMED}


def build_imagenetv2(data: Path, write: Writer) -> dict:
    folder = data / "imagenetv2"
    _classnames_txt(folder / "classnames.txt")
    split = {"train": [], "val": [], "test": []}
    for label in range(1000):
        path = f"{label}/{label * 7919 % 100003:x}.jpeg"
        write(folder / "imagenetv2-matched-frequency-format-val" / path)
        split["test"].append([path, label, IMAGENET_NAMES[label]])
    return {"split": split, "names": IMAGENET_NAMES[:3], "renamed": RENAMED}


def build_imagenet_sketch(data: Path, write: Writer) -> dict:
    folder = data / "imagenet-sketch"
    _classnames_txt(folder / "classnames.txt")
    split = {"train": [], "val": [], "test": []}
    for label, wnid in enumerate(WNIDS):
        split["test"].append([f"{wnid}/sketch_{label}.JPEG", label, IMAGENET_NAMES[label]])
        write(folder / "images" / split["test"][-1][0])
    return {"split": split, "names": IMAGENET_NAMES[:3], "renamed": RENAMED}


def _imagenet_200(data: Path, folder_name: str, image_dir: str, write: Writer, stem: str) -> dict:
    folder = data / folder_name
    _classnames_txt(folder / "classnames.txt")
    chosen = list(range(1, 1000, 5))  # 200 of the 1,000 classes
    (folder / image_dir).mkdir(parents=True)
    (folder / image_dir / "README.txt").write_text("readme\n")
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(chosen):
        split["test"].append([f"{WNIDS[c]}/{stem}_{label}.jpg", label, IMAGENET_NAMES[c]])
        write(folder / image_dir / split["test"][-1][0])
    return {"split": split, "names": [IMAGENET_NAMES[c] for c in chosen[:3]], "imagenet_labels": chosen}


def build_imagenet_a(data: Path, write: Writer) -> dict:
    return _imagenet_200(data, "imagenet-adversarial", "imagenet-a", write, "0.000116_digital clock _ digital clock_0.865662")


def build_imagenet_r(data: Path, write: Writer) -> dict:
    return _imagenet_200(data, "imagenet-rendition", "imagenet-r", write, "art")


BUILDERS = {name[len("build_"):]: fn for name, fn in globals().items() if name.startswith("build_")}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, dict]:
    """$DATA with every dataset in miniature (empty image files)."""
    data = tmp_path_factory.mktemp("DATA")
    return data, {name: build(data, touch) for name, build in BUILDERS.items()}


def test_every_dataset_has_a_builder_and_a_table_row():
    assert sorted(BUILDERS) == sorted(ds.name for ds in coop_datasets())
    assert len(coop_datasets()) == 15


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layout_reads_as_coop(data_root, name):
    data, built = data_root
    expected = built[name]
    spec = find_known_dataset(name)
    folder = read_coop_folder(spec.coop_name, data)  # CoOp's spelling works, ROOT = $DATA
    assert len(folder.raw_names) == spec.num_classes
    assert folder.classnames[: len(expected["names"])] == expected["names"]
    assert spec.template == COOP_TEMPLATES[spec.coop_name]
    for split in ("train", "val", "test"):
        got = [[s.path, s.label] for s in folder.samples if s.split == split]
        assert got == [e[:2] for e in expected["split"][split]], split  # same files, labels and order
        assert all((folder.image_root / p).is_file() for p, _ in got)
    if "imagenet_labels" in expected:
        assert folder.extra["imagenet_labels"] == expected["imagenet_labels"]
    assert folder.extra.get("renamed_classes") == expected.get("renamed")  # repeated names made distinct
    assert len(set(folder.classnames)) == len(folder.classnames)
    for label, renamed in expected.get("renamed", {}).items():
        assert folder.classnames[int(label)] == renamed and folder.raw_names[int(label)] == renamed.split(" (")[0]
    # the dataset's own folder as ROOT reads the same
    again = read_coop_folder(name, folder.folder)
    assert again.samples == folder.samples and again.raw_names == folder.raw_names


@pytest.mark.parametrize("name", ["eurosat", "imagenet", "fgvc_aircraft", "imagenet_r", "stanford_cars"])
def test_missing_files_name_the_file_and_its_source(data_root, name):
    data, _ = data_root
    spec = find_known_dataset(name)
    for rel, source in spec.layout.files.items():
        path = data / spec.layout.folder / rel.rstrip("/")
        hidden = path.with_name(path.name + ".away")
        path.rename(hidden)
        try:
            with pytest.raises(FastpromptError) as err:
                read_coop_folder(name, data)
        finally:
            hidden.rename(path)
        message = str(err.value)
        assert "\n" not in message and f"{path} is missing" in message and source in message


def test_class_counts_are_checked(tmp_path):
    build_eurosat(tmp_path, touch)
    split_file = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(split_file.read_text())
    split_file.write_text(json.dumps({s: [e for e in v if e[1] < 9] for s, v in split.items()}))
    with pytest.raises(FastpromptError, match=r"holds 9 classes of EuroSAT but CoOp's has 10; complete the folder"):
        read_coop_folder("eurosat", tmp_path)
    build_imagenet_r(tmp_path, touch)
    (tmp_path / "imagenet-rendition" / "imagenet-r" / WNIDS[1] / "art_0.jpg").unlink()
    (tmp_path / "imagenet-rendition" / "imagenet-r" / WNIDS[1]).rmdir()
    with pytest.raises(FastpromptError, match=r"holds 199 classes of ImageNetR but CoOp's has 200"):
        read_coop_folder("imagenet-r", tmp_path)


def test_bad_layouts(tmp_path):
    build_imagenet(tmp_path, touch)
    val = tmp_path / "imagenet" / "images" / "val"
    val.rename(tmp_path / "val-sorted")
    val.mkdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")  # the flat layout ImageNet ships
    with pytest.raises(FastpromptError, match=r"images/val has no class folders; sort ImageNet's validation images"):
        read_coop_folder("imagenet", tmp_path)
    build_fgvc_aircraft(tmp_path, touch)
    with open(tmp_path / "fgvc_aircraft" / "images_variant_val.txt", "a") as f:
        f.write("1234567 Boeing 999\n")
    with pytest.raises(FastpromptError, match=r"images_variant_val.txt:101: variant 'Boeing 999' is not in variants.txt"):
        read_coop_folder("fgvc_aircraft", tmp_path)
    with pytest.raises(FastpromptError, match=r"unknown CoOp dataset 'imagenet-c'; use one of imagenet, caltech101"):
        read_coop_folder("imagenet-c", tmp_path)


def test_folder_readers_count_a_linked_file_once(tmp_path):
    built = build_imagenet_a(tmp_path, touch)
    image_root = tmp_path / "imagenet-adversarial" / "imagenet-a"
    first = image_root / built["split"]["test"][0][0]  # class 0's image
    (first.parent / "copy.jpg").symlink_to(first.name)  # the same file twice in its folder
    (first.parent / "self").symlink_to(".")  # a folder link: class folders are listed, not walked
    (image_root / WNIDS[6] / "borrowed.jpg").symlink_to(first)  # class 0's file again under class 1
    data = read_coop_folder("imagenet-a", tmp_path)
    assert [s.path for s in data.samples] == [e[0] for e in built["split"]["test"]]
    (image_root / "n99999999").symlink_to(WNIDS[1])  # a second name for a class folder
    with pytest.raises(FastpromptError, match=r"n99999999 and .*n01440801 are the same folder \(one links to the other\)"):
        read_coop_folder("imagenet-a", tmp_path)


def test_list_prints_names_layouts_and_class_counts():
    result = runner.invoke(app, ["prepare", "coop", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 15
    for ds, line in zip(coop_datasets(), lines):
        assert line.split()[:3] == [ds.name, ds.coop_name, str(ds.num_classes)] and ds.layout.tree() in line
    result = runner.invoke(app, ["prepare", "coop"])
    assert result.exit_code == 2 and "give NAME and ROOT" in result.stderr


def test_prepare_eurosat_end_to_end(tmp_path):
    data = tmp_path / "DATA"
    built = build_eurosat(data, tiny_jpeg)
    out = tmp_path / "out" / "eurosat.beton"
    result = runner.invoke(app, ["prepare", "coop", "EuroSAT", str(data), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["prepare", "coop", "EuroSAT", str(data), "--out", str(out), "--workers", "1"])
    assert again.exit_code == 2 and f"{out} already exists; pass --overwrite to replace it" in again.stderr
    assert "eurosat: 60 images, 10 classes; train 30, val 10, test 20; split from split_zhou_EuroSAT.json" in result.stdout
    ds = open_dataset(out)
    assert ds.name == "eurosat" and ds.template == "a centered satellite photo of {}." and ds.classnames == built["names"]
    assert ds.meta["source"]["kind"] == "coop" and ds.meta["source"]["image_root"] == "2750"
    split = built["split"]
    assert ds.files("test") == [e[0] for e in split["test"]]
    expected = dassl_reference(split, 2, 1)
    assert ds.files("train", shots=2, seed=1) == [e[0] for e in expected["train"]]
    assert ds.files("val", shots=2, seed=1) == [e[0] for e in expected["val"]]


def test_prepare_imagenet_a_end_to_end(tmp_path):
    data = tmp_path / "DATA"
    built = build_imagenet_a(data, tiny_jpeg)
    out = tmp_path / "imagenet_a.beton"
    result = runner.invoke(app, ["prepare", "coop", "imagenet-a", str(data / "imagenet-adversarial"), "--out", str(out),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    ds = open_dataset(out)
    assert ds.split_sizes == {"train": 0, "val": 0, "test": 200} and ds.num_classes == 200
    assert ds.classnames[:3] == built["names"] and ds.meta["source"]["imagenet_labels"] == built["imagenet_labels"]
    assert ds.files("test") == [e[0] for e in built["split"]["test"]]
    with pytest.raises(FastpromptError, match=r"no train images \(a test set only, like ImageNet-A\); train on another"):
        ds.files("train", shots=16, seed=1)
