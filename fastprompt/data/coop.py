"""`fastprompt prepare coop NAME ROOT`: CoOp's datasets, read as CoOp's datasets/*.py read them.

ROOT is `$DATA` (the folder holding CoOp's dataset folders: eurosat/, caltech-101/, ...) or
the dataset's own folder. The table in `fastprompt.data.datasets` gives each dataset's
folder, required files (and where CoOp's DATASETS.md says they come from), class count and
template; this module has one reader per layout (KaiyangZhou/CoOp, datasets/):

- `split_json`: `split_zhou_<Name>.json`, `[path, label, classname]` lists with paths
  relative to the image folder (`OxfordPets.read_split`); nine of the eleven datasets.
- `fgvc_aircraft`: `variants.txt` (one class a line, the line order is the label) and
  `images_variant_{train,val,test}.txt` (`<image id> <variant>`; the image is
  `images/<id>.jpg`) (fgvc_aircraft.py).
- `imagenet`: `images/train/<wnid>/` and `images/val/<wnid>/` (labels: the sorted wnid
  folders), names from `classnames.txt` (imagenet.py). CoOp has no ImageNet val split: it
  validates and tests on ImageNet's val set, our test split; so the `.beton` has no val
  split and the few-shot draw is train only, as CoOp's.
- `imagenetv2`: `<image folder>/<label>/` for labels 0..999, class names in
  `classnames.txt` line order (imagenetv2.py).
- `imagenet_folders`: `<image folder>/<wnid>/`, labels: the sorted wnid folders, names from
  `classnames.txt` (imagenet_sketch.py: 1,000 classes; imagenet_a.py, imagenet_r.py: 200,
  README.txt skipped). ImageNet-A and -R keep CoOp's 200 labels and names (a model is
  evaluated 200-way with their names, as CoOp does); the sidecar records each class's
  ImageNet label (`source.imagenet_labels`: its wnid's rank among the 1,000 sorted wnids,
  the label `prepare coop imagenet` gives it).

The domain-generalisation targets (ImageNet-V2, -Sketch, -A, -R) are test sets only: every
image goes to the test split. Within an ImageNet-style class folder CoOp keeps `os.listdir`'s
order (the file system's, cached in its preprocessed.pkl); fastprompt sorts the file names,
so the order, and with it the ImageNet few-shot draw, is the same on every machine (and
equals CoOp's wherever its listdir returned sorted names). The split-file datasets and
FGVCAircraft keep their files' order exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastprompt.data.beton import PathLike, WriteOptions, WriteSummary, check_output
from fastprompt.data.datasets import KNOWN_DATASETS, KnownDataset, clean_classname, find_known_dataset
from fastprompt.data.imagefolder import read_classnames_file, write_samples
from fastprompt.data.scan import FileScan
from fastprompt.data.splits import Sample, read_coop_split
from fastprompt.errors import FastpromptError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoopFolder:
    """One CoOp dataset as read from its folder: what `write_coop` stores."""

    spec: KnownDataset
    folder: Path  # the dataset folder ($DATA/<CoOp's folder name>)
    image_root: Path  # the folder the sample paths are relative to
    samples: list[Sample]  # each split in CoOp's order
    raw_names: list[str]  # class names by label as CoOp reads them (before fastprompt's cleanup)
    split_source: str  # the files the split came from, for the summary line
    classnames: list[str]  # the names the classes are prompted with (see `prompt_names`)
    extra: dict[str, Any] = field(default_factory=dict)  # more provenance (wnids, ImageNet labels, renamed classes)


def coop_datasets() -> list[KnownDataset]:
    """The datasets `prepare coop` reads, in CoOp's DATASETS.md order."""
    return [ds for ds in KNOWN_DATASETS if ds.layout is not None]


def coop_table_lines() -> list[str]:
    """`fastprompt prepare coop --list`: name, CoOp's name, class count, expected layout under ROOT."""
    lines = []
    for ds in coop_datasets():
        kind = "test only" if ds.test_only else "train/val/test" if ds.layout.reader != "imagenet" else "train/test"
        lines.append(f"{ds.name:<16} {ds.coop_name:<20} {ds.num_classes:>5} classes  {kind:<14} {ds.layout.tree()}")
    return lines


def find_coop_dataset(name: str) -> KnownDataset:
    spec = find_known_dataset(name)
    if spec is None or spec.layout is None:
        names = ", ".join(ds.name for ds in coop_datasets())
        raise FastpromptError(f"unknown CoOp dataset {name!r}; use one of {names} (see `fastprompt prepare coop --list`)")
    return spec


def _dataset_folder(spec: KnownDataset, root: Path) -> Path:
    """ROOT/<CoOp's folder> when ROOT is $DATA, else ROOT itself."""
    if not root.is_dir():
        raise FastpromptError(
            f"{root} is not a folder; pass $DATA (the folder holding {spec.layout.folder}/) or {spec.layout.folder}/ itself"
        )
    nested = root / spec.layout.folder
    return nested if nested.is_dir() else root


def _check_files(spec: KnownDataset, folder: Path) -> None:
    """Every file and folder the guide lists, present; else one line naming it and its source."""
    for rel, source in spec.layout.files.items():
        path = folder / rel
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            raise FastpromptError(
                f"{path} is missing ({spec.coop_name} is laid out as {spec.layout.tree()}); it comes from {source}"
            )


def check_coop_folder(name: str, data_root: PathLike) -> Path:
    """The folder of CoOp's dataset `name` under $DATA (`data_root`), with every file its layout
    lists; FastpromptError naming what is missing and the layout expected (`fastprompt reproduce`
    checks every dataset of a table before it prepares any)."""
    spec = find_coop_dataset(name)
    folder = Path(data_root) / spec.layout.folder
    if not folder.is_dir():
        raise FastpromptError(f"{folder} is missing: {spec.coop_name} is expected under the data root as "
                              f"{spec.layout.tree()} (CoOp's DATASETS.md; `fastprompt prepare coop --list`)")
    _check_files(spec, folder)
    return folder


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FastpromptError(f"cannot read {path} ({err}); restore it from the dataset's archive") from None


def _names(folder: Path, dirs: bool) -> list[str]:
    """Sorted non-hidden sub-folders (dirs) or files of `folder` (CoOp's `listdir_nohidden`, sorted)."""
    return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir() == dirs)


def _visible(name: str) -> bool:
    return not name.startswith(".")  # CoOp's `listdir_nohidden`


def _check_exist(image_root: Path, samples: list[Sample], listed_in: str) -> None:
    missing = [s.path for s in samples if not (image_root / s.path).is_file()]
    if missing:
        raise FastpromptError(
            f"{listed_in} names {len(missing)} image(s) missing under {image_root}, e.g. {missing[0]}; "
            "extract the dataset's images there as CoOp's DATASETS.md describes"
        )


def _class_images(scan: FileScan, folder: Path) -> list[str]:
    """The files of one class folder as paths relative to the image root, each file once
    (a link to a file already counted is left out, `fastprompt.data.scan`)."""
    images = scan.files_in(folder)
    if not images:
        raise FastpromptError(f"class folder {folder} has no images; restore it from the dataset's archive")
    return images


def _name_of(names: dict[str, str], wnid: str, path: Path) -> str:
    if wnid not in names:
        raise FastpromptError(f"{path} has no line for class folder {wnid!r}; use CoOp's ImageNet classnames.txt")
    return names[wnid]


def _read_split_json(spec: KnownDataset, folder: Path) -> tuple[list[Sample], list[str], str, dict]:
    samples, raw_names = read_coop_split(folder / spec.layout.split_file, folder / spec.layout.image_dir,
                                         num_classes=spec.num_classes, dataset=spec.coop_name)
    return samples, raw_names, spec.layout.split_file, {}


def _read_fgvc_aircraft(spec: KnownDataset, folder: Path) -> tuple[list[Sample], list[str], str, dict]:
    """datasets/fgvc_aircraft.py: labels by variants.txt line, `<id> <variant>` lines per split."""
    variants = [line.strip() for line in _lines(folder / "variants.txt") if line.strip()]
    label_of = {c: i for i, c in enumerate(variants)}
    samples: list[Sample] = []
    for split in ("train", "val", "test"):
        path = folder / f"images_variant_{split}.txt"
        for k, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise FastpromptError(f"{path}:{k}: variant {variant!r} is not in variants.txt; restore both from the archive")
            samples.append(Sample(f"{image_id}.jpg", label_of[variant], split))
    _check_exist(folder / "images", samples, "images_variant_*.txt")
    return samples, variants, "images_variant_{train,val,test}.txt", {}


def _read_imagenet(spec: KnownDataset, folder: Path) -> tuple[list[Sample], list[str], str, dict]:
    """datasets/imagenet.py: sorted wnid folders of images/train are the labels; images/val is the test set."""
    names_path = folder / "classnames.txt"
    names = read_classnames_file(names_path)
    images = folder / "images"
    wnids = _names(images / "train", dirs=True)
    val = _names(images / "val", dirs=True)
    if val != wnids:
        if not val:
            raise FastpromptError(
                f"{images / 'val'} has no class folders; sort ImageNet's validation images into one folder per class "
                "(n01440764/ ...) as train/ is, e.g. with ImageNet's valprep.sh"
            )
        odd = sorted(set(val) ^ set(wnids))
        raise FastpromptError(f"{images / 'val'} and {images / 'train'} differ in class folder {odd[0]!r}; they need the same classes")
    scan = FileScan(images, _visible)
    scan.claim([images / "train" / w for w in wnids])
    scan.claim([images / "val" / w for w in wnids])
    samples: list[Sample] = []
    for split, sub in (("train", "train"), ("test", "val")):
        for label, wnid in enumerate(wnids):
            samples += [Sample(p, label, split) for p in _class_images(scan, images / sub / wnid)]
    scan.log_repeats()
    raw_names = [_name_of(names, w, names_path) for w in wnids]
    return samples, raw_names, "images/train/ and images/val/ folders (CoOp: val is the test set)", {"wnids": wnids}


def _read_imagenetv2(spec: KnownDataset, folder: Path) -> tuple[list[Sample], list[str], str, dict]:
    """datasets/imagenetv2.py: folder <label>/ for each label, names in classnames.txt line order."""
    by_wnid = read_classnames_file(folder / "classnames.txt")
    names = list(by_wnid.values())
    image_root = folder / spec.layout.image_dir
    for label in range(len(names)):
        if not (image_root / str(label)).is_dir():
            raise FastpromptError(f"{image_root / str(label)} is missing; ImageNet-V2 has folders 0 ... 999 (re-extract it)")
    scan = FileScan(image_root, _visible)
    scan.claim([image_root / str(label) for label in range(len(names))])
    samples: list[Sample] = []
    for label in range(len(names)):
        samples += [Sample(p, label, "test") for p in _class_images(scan, image_root / str(label))]
    scan.log_repeats()
    return samples, names, f"{spec.layout.image_dir}/<label>/ folders (test only)", {"wnids": list(by_wnid)}


def _read_imagenet_folders(spec: KnownDataset, folder: Path) -> tuple[list[Sample], list[str], str, dict]:
    """datasets/imagenet_sketch.py, imagenet_a.py, imagenet_r.py: sorted wnid folders are the labels."""
    names_path = folder / "classnames.txt"
    names = read_classnames_file(names_path)
    image_root = folder / spec.layout.image_dir
    wnids = [w for w in _names(image_root, dirs=True) if w not in spec.layout.ignored]
    scan = FileScan(image_root, _visible)
    scan.claim([image_root / w for w in wnids])
    samples: list[Sample] = []
    for label, wnid in enumerate(wnids):
        samples += [Sample(p, label, "test") for p in _class_images(scan, image_root / wnid)]
    scan.log_repeats()
    raw_names = [_name_of(names, w, names_path) for w in wnids]
    imagenet_rank = {w: i for i, w in enumerate(sorted(names))}  # ImageNet's label: the wnid's sorted rank
    extra = {"imagenet_labels": [imagenet_rank[w] for w in wnids], "wnids": wnids}
    return samples, raw_names, f"{spec.layout.image_dir}/<wnid>/ folders (test only)", extra


_READERS = {
    "split_json": _read_split_json,
    "fgvc_aircraft": _read_fgvc_aircraft,
    "imagenet": _read_imagenet,
    "imagenetv2": _read_imagenetv2,
    "imagenet_folders": _read_imagenet_folders,
}


def check_class_count(spec: KnownDataset, found: int, folder: Path) -> None:
    """CoOp's version of the dataset has `spec.num_classes` classes; anything else is an incomplete folder."""
    if found != spec.num_classes:
        raise FastpromptError(
            f"{folder} holds {found} classes of {spec.coop_name} but CoOp's has {spec.num_classes}; "
            f"complete the folder as CoOp's DATASETS.md lays it out ({spec.layout.tree()})"
        )


def prompt_names(spec: KnownDataset, raw_names: list[str], ids: list[str]) -> tuple[list[str], dict[int, str]]:
    """The names classes are prompted with: CoOp's (underscores become spaces), made distinct.

    CLIP's ImageNet names, which CoOp's classnames.txt copies, call two pairs of classes
    the same ("missile": n03773504 and n04008634; "sunglasses": n04355933 and n04356056).
    CoOp prompts both with the same text; fastprompt needs distinct names (a model's
    classes and a sidecar's class names are checked for repeats), so every repeat after the
    first gets its id appended ("missile (n04008634)"), logged and recorded in the sidecar
    (`source.renamed_classes`). Those two classes' prompts differ from CoOp's.
    """
    names = [clean_classname(c, spec.name) for c in raw_names]
    seen: set[str] = set()
    renamed: dict[int, str] = {}
    for label, name in enumerate(names):
        if name in seen:
            renamed[label] = names[label] = f"{name} ({ids[label]})"
        seen.add(name)
    if renamed:
        listed = ", ".join(repr(n) for n in list(renamed.values())[:4])
        logger.warning("%s: %d class name(s) repeat an earlier class's; prompted as %s (CoOp prompts them alike)",
                       spec.coop_name, len(renamed), listed)
    return names, renamed


def read_coop_folder(name: str, root: PathLike) -> CoopFolder:
    """Find and read dataset `name` under ROOT as CoOp does; FastpromptError naming any missing file."""
    spec = find_coop_dataset(name)
    folder = _dataset_folder(spec, Path(root))
    _check_files(spec, folder)
    samples, raw_names, split_source, extra = _READERS[spec.layout.reader](spec, folder)
    check_class_count(spec, len(raw_names), folder)
    classnames, renamed = prompt_names(spec, raw_names, extra.get("wnids", [str(c) for c in range(len(raw_names))]))
    if renamed:
        extra["renamed_classes"] = {str(label): n for label, n in renamed.items()}
    return CoopFolder(spec, folder, folder / spec.layout.image_dir, samples, raw_names, split_source, classnames, extra)


def write_coop(
    name: str,
    root: PathLike,
    out: Optional[PathLike] = None,
    *,
    max_resolution: int = 1024,
    jpeg_quality: int = 90,
    workers: Optional[int] = None,
    skip_bad: bool = False,
    train_short_side: int = 320,
    eval_size: int = 224,
    eval_format: str = "raw",
    overwrite: bool = False,
) -> WriteSummary:
    """Write CoOp's dataset `name` found under `root` to `out` (default `<name>.beton`) and its
    sidecar; images stored as `write_imagefolder` stores them."""
    options = WriteOptions(max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=workers,
                           train_short_side=train_short_side, eval_size=eval_size, eval_format=eval_format)
    check_output(out if out is not None else f"{find_coop_dataset(name).name}.beton", overwrite)  # before reading the folder
    data = read_coop_folder(name, root)
    spec = data.spec
    provenance = {
        "kind": "coop",
        "dataset": spec.coop_name,
        "folder": str(data.folder.resolve()),
        "image_root": spec.layout.image_dir,  # sample paths are relative to folder/image_root
        "raw_classnames": data.raw_names,
        **data.extra,
    }
    logger.info("%s: %d images of %d classes from %s", spec.coop_name, len(data.samples), len(data.raw_names), data.folder)
    return write_samples(
        out if out is not None else f"{spec.name}.beton", data.image_root, data.samples, data.classnames,
        name=spec.name, template=spec.template, split_source=data.split_source, provenance=provenance,
        options=options, skip_bad=skip_bad, overwrite=overwrite,
    )
