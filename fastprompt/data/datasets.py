"""The datasets CoOp-style papers evaluate on: names, templates, class names, class counts, layouts.

A user prepares a folder of images; when its name (or the CoOp split file's name,
`split_zhou_<Name>.json`) identifies one of these datasets, the `.beton` gets the
dataset's customary hand-crafted template (CoOp's `CUSTOM_TEMPLATES`, `trainers/coop.py`)
and the class names CoOp prompts with (e.g. EuroSAT's folder `SeaLake` becomes
"Sea or Lake"). Any other dataset gets "a photo of a {}." and generic cleanup
(underscores become spaces). The same table says how `fastprompt prepare coop` finds each
dataset in a folder laid out as CoOp's DATASETS.md describes (`fastprompt.data.coop`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from fastprompt.prompts.templates import DEFAULT_TEMPLATE

logger = logging.getLogger(__name__)


# Where CoOp's dataset guide (KaiyangZhou/CoOp, DATASETS.md) says each file comes from.
_GDRIVE = "https://drive.google.com/file/d/{}/view"
_IMAGENET_CLASSNAMES = (
    "copy $DATA/imagenet/classnames.txt (CoOp's DATASETS.md, ImageNet: " + _GDRIVE.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF") + ")"
)


@dataclass(frozen=True)
class CoopLayout:
    """How CoOp's datasets/<name>.py reads a dataset folder laid out as its DATASETS.md says."""

    folder: str  # the folder under $DATA (CoOp's `dataset_dir`), e.g. "caltech-101"
    reader: str  # "split_json" | "fgvc_aircraft" | "imagenet" | "imagenetv2" | "imagenet_folders" (fastprompt.data.coop)
    image_dir: str  # images folder inside `folder` that paths are relative to ("" = `folder` itself)
    files: Mapping[str, str]  # required file or folder (relative to `folder`) -> where the guide says it comes from
    split_file: Optional[str] = None  # CoOp's split_zhou_<Name>.json, for reader "split_json"
    ignored: tuple[str, ...] = ()  # entries of image_dir CoOp skips (ImageNet-A/R's README.txt)

    def tree(self) -> str:
        """The expected layout in one line, e.g. `eurosat/{2750/, split_zhou_EuroSAT.json}`."""
        return f"{self.folder}/{{{', '.join(self.files)}}}"


def _split_json_layout(folder: str, image_dir: str, split_file: str, images: str, split_id: str,
                       extra: Optional[dict[str, str]] = None) -> CoopLayout:
    files = {f"{image_dir}/": images} if image_dir else {}
    files.update(extra or {})
    files[split_file] = f"CoOp's DATASETS.md: {_GDRIVE.format(split_id)}"
    return CoopLayout(folder, "split_json", image_dir, files, split_file=split_file)


@dataclass(frozen=True)
class KnownDataset:
    """What fastprompt knows about one of CoOp's datasets: the one table of names, templates,
    class-name fixes, class counts and folder layouts (`fastprompt prepare coop --list`)."""

    name: str  # canonical fastprompt name (CoOp's config name), e.g. "eurosat"
    coop_name: str  # CoOp's class name for the dataset, e.g. "EuroSAT"
    template: str  # CoOp's hand-crafted template (trainers/zsclip.py CUSTOM_TEMPLATES)
    aliases: tuple[str, ...] = ()  # folder / split-file names that identify it (compared squashed)
    renames: Mapping[str, str] = field(default_factory=dict)  # folder name -> CoOp class name
    ignored_folders: tuple[str, ...] = ()  # class folders CoOp drops
    split_camel_case: bool = False  # UCF101's "ApplyEyeMakeup" -> "Apply Eye Makeup"
    num_classes: Optional[int] = None  # classes of CoOp's version (checked by `prepare coop`)
    layout: Optional[CoopLayout] = None  # how `fastprompt prepare coop` reads CoOp's folder
    test_only: bool = False  # a domain-generalisation target: every image is a test image


KNOWN_DATASETS: tuple[KnownDataset, ...] = (
    KnownDataset(
        "imagenet", "ImageNet", "a photo of a {}.", aliases=("imagenet", "ilsvrc2012"), num_classes=1000,
        layout=CoopLayout("imagenet", "imagenet", "images", {
            "images/train/": "the ImageNet training set from https://image-net.org, one folder per class (n01440764/ ...)",
            "images/val/": "the ImageNet validation set from https://image-net.org, sorted into one folder per class "
                           "as train/ is (e.g. with ImageNet's valprep.sh)",
            "classnames.txt": "CoOp's DATASETS.md, ImageNet: " + _GDRIVE.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"),
        }),
    ),
    KnownDataset(
        "caltech101",
        "Caltech101",
        "a photo of a {}.",
        aliases=("caltech101", "101objectcategories"),
        renames={"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
        ignored_folders=("BACKGROUND_Google", "Faces_easy"),
        num_classes=100,
        layout=_split_json_layout(
            "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
            "101_ObjectCategories.tar.gz from http://www.vision.caltech.edu/Image_Datasets/Caltech101/",
            "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
    ),
    KnownDataset(
        "oxford_pets", "OxfordPets", "a photo of a {}, a type of pet.", aliases=("oxfordpets", "pets"), num_classes=37,
        layout=_split_json_layout(
            "oxford_pets", "images", "split_zhou_OxfordPets.json",
            "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
    ),
    KnownDataset(
        "stanford_cars", "StanfordCars", "a photo of a {}.", aliases=("stanfordcars", "cars"), num_classes=196,
        layout=_split_json_layout(
            "stanford_cars", "", "split_zhou_StanfordCars.json", "", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT",
            extra={"cars_train/": "http://ai.stanford.edu/~jkrause/car196/cars_train.tgz",
                   "cars_test/": "http://ai.stanford.edu/~jkrause/car196/cars_test.tgz"}),
    ),
    KnownDataset(
        "oxford_flowers",
        "OxfordFlowers",
        "a photo of a {}, a type of flower.",
        aliases=("oxfordflowers", "flowers102", "flowers", "oxford102flowers"),
        num_classes=102,
        layout=_split_json_layout(
            "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
    ),
    KnownDataset(
        "food101", "Food101", "a photo of {}, a type of food.", aliases=("food101",), num_classes=101,
        layout=_split_json_layout(
            "food-101", "images", "split_zhou_Food101.json",
            "food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
            "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
    ),
    KnownDataset(
        "fgvc_aircraft", "FGVCAircraft", "a photo of a {}, a type of aircraft.", aliases=("fgvcaircraft", "aircraft"),
        num_classes=100,
        layout=CoopLayout("fgvc_aircraft", "fgvc_aircraft", "images", {
            f: "data/ of https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz, "
               "renamed fgvc_aircraft/ (CoOp's DATASETS.md)"
            for f in ("images/", "variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                      "images_variant_test.txt")
        }),
    ),
    KnownDataset(
        "sun397", "SUN397", "a photo of a {}.", aliases=("sun397",), num_classes=397,
        layout=_split_json_layout(
            "sun397", "SUN397", "split_zhou_SUN397.json",
            "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
    ),
    KnownDataset(
        "dtd", "DescribableTextures", "{} texture.", aliases=("dtd", "describabletextures"), num_classes=47,
        layout=_split_json_layout(
            "dtd", "images", "split_zhou_DescribableTextures.json",
            "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
    ),
    KnownDataset(
        "eurosat",
        "EuroSAT",
        "a centered satellite photo of {}.",
        aliases=("eurosat", "2750"),
        renames={
            "AnnualCrop": "Annual Crop Land",
            "Forest": "Forest",
            "HerbaceousVegetation": "Herbaceous Vegetation Land",
            "Highway": "Highway or Road",
            "Industrial": "Industrial Buildings",
            "Pasture": "Pasture Land",
            "PermanentCrop": "Permanent Crop Land",
            "Residential": "Residential Buildings",
            "River": "River",
            "SeaLake": "Sea or Lake",
        },
        num_classes=10,
        layout=_split_json_layout(
            "eurosat", "2750", "split_zhou_EuroSAT.json", "http://madm.dfki.de/files/sentinel/EuroSAT.zip",
            "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
    ),
    KnownDataset(
        "ucf101",
        "UCF101",
        "a photo of a person doing {}.",
        aliases=("ucf101", "ucf101midframes"),
        split_camel_case=True,
        num_classes=101,
        layout=_split_json_layout(
            "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
            "UCF-101-midframes.zip from " + _GDRIVE.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),
            "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
    ),
    KnownDataset(
        "imagenetv2", "ImageNetV2", "a photo of a {}.", aliases=("imagenetv2", "imagenetv2matchedfrequency"),
        num_classes=1000, test_only=True,
        layout=CoopLayout("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", {
            "imagenetv2-matched-frequency-format-val/": "https://s3-us-west-2.amazonaws.com/imagenetv2public/"
                                                       "imagenetv2-matched-frequency.tar.gz (folders 0 ... 999)",
            "classnames.txt": _IMAGENET_CLASSNAMES,
        }),
    ),
    KnownDataset(
        "imagenet_sketch", "ImageNetSketch", "a photo of a {}.", aliases=("imagenetsketch",), num_classes=1000,
        test_only=True,
        layout=CoopLayout("imagenet-sketch", "imagenet_folders", "images", {
            "images/": "https://github.com/HaohanWang/ImageNet-Sketch (1,000 folders n*)",
            "classnames.txt": _IMAGENET_CLASSNAMES,
        }),
    ),
    KnownDataset(
        "imagenet_a", "ImageNetA", "a photo of a {}.", aliases=("imageneta", "imagenetadversarial"), num_classes=200,
        test_only=True,
        layout=CoopLayout("imagenet-adversarial", "imagenet_folders", "imagenet-a", {
            "imagenet-a/": "https://github.com/hendrycks/natural-adv-examples (200 folders n*)",
            "classnames.txt": _IMAGENET_CLASSNAMES,
        }, ignored=("README.txt",)),
    ),
    KnownDataset(
        "imagenet_r", "ImageNetR", "a photo of a {}.", aliases=("imagenetr", "imagenetrendition"), num_classes=200,
        test_only=True,
        layout=CoopLayout("imagenet-rendition", "imagenet_folders", "imagenet-r", {
            "imagenet-r/": "https://github.com/hendrycks/imagenet-r (200 folders n*)",
            "classnames.txt": _IMAGENET_CLASSNAMES,
        }, ignored=("README.txt",)),
    ),
)


def _squash(name: str) -> str:
    """Lower-case and drop everything but letters and digits: "Oxford_Flowers-102" -> "oxfordflowers102"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_ALIAS = {_squash(alias): ds for ds in KNOWN_DATASETS for alias in (ds.name, ds.coop_name, *ds.aliases)}


def find_known_dataset(name: str) -> Optional[KnownDataset]:
    """The known dataset `name` identifies (any spelling of its aliases), or None."""
    return _BY_ALIAS.get(_squash(name))


def dataset_name_from_split_file(filename: str) -> Optional[str]:
    """`split_zhou_EuroSAT.json` -> "EuroSAT"; None for other file names."""
    m = re.fullmatch(r"split_zhou_(.+)\.json", filename)
    return m.group(1) if m else None


def canonical_name(name: str) -> str:
    """The dataset name stored in the sidecar: the known canonical name, else a cleaned lower-case name."""
    known = find_known_dataset(name)
    if known is not None:
        return known.name
    cleaned = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return cleaned or "dataset"


def default_template(name: str) -> str:
    """The hand-crafted template for dataset `name` (CoOp's for known datasets)."""
    known = find_known_dataset(name)
    return known.template if known is not None else DEFAULT_TEMPLATE


def clean_classname(raw: str, dataset: Optional[str] = None) -> str:
    """The name a class is prompted with, from its folder name or split-file name.

    Known datasets' renames first (EuroSAT's `SeaLake` -> "Sea or Lake"), UCF101's
    CamelCase split, then generally: underscores become spaces, runs of spaces collapse.
    Already clean names ("Sea or Lake") pass unchanged, so cleaning is idempotent.
    """
    known = find_known_dataset(dataset) if dataset else None
    name = raw
    if known is not None:
        name = known.renames.get(name, name)
        if known.split_camel_case and "_" not in name and " " not in name:
            name = "_".join(re.findall(r"[A-Z][^A-Z]*", name)) or name
    name = name.replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def ignored_class_folders(dataset: Optional[str]) -> tuple[str, ...]:
    """Class folders CoOp drops for this dataset (Caltech101's background class)."""
    known = find_known_dataset(dataset) if dataset else None
    return known.ignored_folders if known is not None else ()
