"""The datasets CoOp-style papers evaluate on: canonical names, templates, class-name cleanup.

A user prepares a folder of images; when its name (or the CoOp split file's name,
`split_zhou_<Name>.json`) identifies one of these datasets, the `.beton` gets the
dataset's customary hand-crafted template (CoOp's `CUSTOM_TEMPLATES`, `trainers/coop.py`)
and the class names CoOp prompts with (e.g. EuroSAT's folder `SeaLake` becomes
"Sea or Lake"). Any other dataset gets "a photo of a {}." and generic cleanup
(underscores become spaces).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from fastprompt.prompts.templates import DEFAULT_TEMPLATE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownDataset:
    """What fastprompt knows about one of CoOp's datasets."""

    name: str  # canonical fastprompt name (CoOp's config name), e.g. "eurosat"
    coop_name: str  # CoOp's class name for the dataset, e.g. "EuroSAT"
    template: str  # CoOp's hand-crafted template
    aliases: tuple[str, ...] = ()  # folder / split-file names that identify it (compared squashed)
    renames: Mapping[str, str] = field(default_factory=dict)  # folder name -> CoOp class name
    ignored_folders: tuple[str, ...] = ()  # class folders CoOp drops
    split_camel_case: bool = False  # UCF101's "ApplyEyeMakeup" -> "Apply Eye Makeup"


KNOWN_DATASETS: tuple[KnownDataset, ...] = (
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
    ),
    KnownDataset("oxford_pets", "OxfordPets", "a photo of a {}, a type of pet.", aliases=("oxfordpets", "pets")),
    KnownDataset(
        "oxford_flowers",
        "OxfordFlowers",
        "a photo of a {}, a type of flower.",
        aliases=("oxfordflowers", "flowers102", "flowers", "oxford102flowers"),
    ),
    KnownDataset("food101", "Food101", "a photo of {}, a type of food.", aliases=("food101",)),
    KnownDataset(
        "fgvc_aircraft", "FGVCAircraft", "a photo of a {}, a type of aircraft.", aliases=("fgvcaircraft", "aircraft")
    ),
    KnownDataset("dtd", "DescribableTextures", "{} texture.", aliases=("dtd", "describabletextures")),
    KnownDataset("stanford_cars", "StanfordCars", "a photo of a {}.", aliases=("stanfordcars", "cars")),
    KnownDataset(
        "caltech101",
        "Caltech101",
        "a photo of a {}.",
        aliases=("caltech101", "101objectcategories"),
        renames={"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
        ignored_folders=("BACKGROUND_Google", "Faces_easy"),
    ),
    KnownDataset("sun397", "SUN397", "a photo of a {}.", aliases=("sun397",)),
    KnownDataset(
        "ucf101",
        "UCF101",
        "a photo of a person doing {}.",
        aliases=("ucf101", "ucf101midframes"),
        split_camel_case=True,
    ),
    KnownDataset("imagenet", "ImageNet", "a photo of a {}.", aliases=("imagenet", "ilsvrc2012")),
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
