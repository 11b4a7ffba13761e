"""`fastprompt prepare imagefolder`: a folder of class folders (or a CoOp split file) -> `.beton`.

Split source, first that applies:
1. a CoOp split file (`--split-json split_zhou_<Name>.json`): `[relative_path, label, classname]`
   lists for train/val/test, paths relative to ROOT;
2. `ROOT/train/<class>/`, `ROOT/test/<class>/` and optionally `ROOT/val/<class>/`
   (without val/, 20% of each class's train images are held out, as CoOp's `split_trainval`);
3. `ROOT/<class>/`: a deterministic stratified 50/20/30 split per class (CoOp's rule for
   datasets that ship no split).
Labels are the sorted class-folder names' positions (as torchvision's ImageFolder), or the
split file's labels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fastprompt.errors import FastpromptError
from fastprompt.data.beton import PathLike, WriteOptions, WriteSummary, write_beton
from fastprompt.data.datasets import (
    canonical_name,
    clean_classname,
    dataset_name_from_split_file,
    default_template,
    ignored_class_folders,
)
from fastprompt.data.pixels import clip_eval_pixels, train_storage_pixels
from fastprompt.data.splits import Sample, hold_out_val, read_coop_split, stratified_split

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageFiles:
    """Image files read as Dassl reads them (PIL, convert("RGB")) and sized as stored
    (`fastprompt.data.pixels`): val/test evaluation-ready at `eval_size` (unless None),
    train whole up to `train_short_side` / `max_resolution`."""

    root: str
    paths: tuple[str, ...]  # relative to root
    eval_ready: tuple[bool, ...]  # per sample: store CLIP's eval transform of it (val/test)
    options: WriteOptions

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        options = self.options
        with Image.open(os.path.join(self.root, self.paths[i])) as im:
            if self.eval_ready[i]:  # every pixel as CLIP's transform computes it from the original
                return clip_eval_pixels(im.convert("RGB"), options.eval_size)  # (S, S, 3)
            # JPEG only: decode at a reduced DCT scale that keeps both sides >= train_short_side
            # (a training image is a crop source; the bicubic shrink below sets its size)
            im.draft("RGB", (options.train_short_side, options.train_short_side))
            return train_storage_pixels(im.convert("RGB"), options.train_short_side, options.max_resolution)  # (H, W, 3)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path, root: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted POSIX paths relative to `root`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if _is_image(f))
    return sorted(found)


def _scan_classes(folder: Path, root: Path, classes: Optional[list[str]], dataset: Optional[str]) -> dict[str, list[str]]:
    """Class folder name -> its images; `classes` (if given) must contain every folder found."""
    ignored = set(ignored_class_folders(dataset))
    names = [c for c in _subdirs(folder) if c not in ignored]
    if ignored & set(_subdirs(folder)):
        logger.info("leaving out class folders %s (CoOp drops them for %s)", sorted(ignored & set(_subdirs(folder))), dataset)
    if not names:
        raise FastpromptError(f"{folder} has no class folders; put each class's images in {folder}/<class name>/")
    if classes is not None:
        extra = [c for c in names if c not in classes]
        if extra:
            raise FastpromptError(f"{folder} has class folder {extra[0]!r} that train/ lacks; every class needs train images")
    found = {}
    for c in names:
        images = _images_under(folder / c, root)
        if not images:
            raise FastpromptError(
                f"class folder {folder / c} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        found[c] = images
    return found


def read_classnames_file(path: Path) -> dict[str, str]:
    """`folder name<space>class name` per line (CoOp's ImageNet classnames.txt)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FastpromptError(f"cannot read class-name file {path} ({err}); pass a text file of 'folder classname' lines") from None
    mapping = {}
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        if not name.strip():
            raise FastpromptError(f"{path}:{k}: expected 'folder classname', got {line!r}; fix the line")
        mapping[folder] = name.strip()
    return mapping


def _infer_name(root: Path, split_json: Optional[Path], name: Optional[str]) -> str:
    if name:
        return name
    if split_json is not None:
        from_file = dataset_name_from_split_file(split_json.name)
        if from_file:
            return from_file
    return root.resolve().name


def collect_imagefolder(
    root: PathLike, split_json: Optional[PathLike] = None, name: Optional[str] = None
) -> tuple[list[Sample], list[str], str, str]:
    """Scan ROOT: (samples, raw class names by label, dataset name as given/inferred, split source)."""
    root = Path(root)
    if not root.exists():
        raise FastpromptError(f"image folder {root} does not exist; pass the folder that holds the class folders")
    if not root.is_dir():
        raise FastpromptError(f"{root} is not a folder; pass the folder that holds the class folders")
    split_path = Path(split_json) if split_json is not None else None
    dataset = _infer_name(root, split_path, name)
    if split_path is not None:
        samples, raw_names = read_coop_split(split_path, root)
        return samples, raw_names, dataset, split_path.name
    top = _subdirs(root)
    if "train" in top and set(top) <= set(SPLIT_FOLDERS):
        if "test" not in top:
            raise FastpromptError(f"{root} has train/ but no test/; add {root}/test/<class>/ or pass --split-json")
        train = _scan_classes(root / "train", root, None, dataset)
        raw_names = list(train)
        samples: list[Sample] = []
        by_label = [train[c] for c in raw_names]
        if "val" in top:
            samples += [Sample(p, label, "train") for label, paths in enumerate(by_label) for p in paths]
            source = "train/ val/ test/ folders"
        else:
            samples += hold_out_val(by_label, raw_names)
            source = "train/ test/ folders (val: 20% of train held out)"
        for split in ("val", "test"):
            if split in top:
                found = _scan_classes(root / split, root, raw_names, dataset)
                samples += [Sample(p, raw_names.index(c), split) for c, paths in found.items() for p in paths]
        return samples, raw_names, dataset, source
    classes = _scan_classes(root, root, None, dataset)
    raw_names = list(classes)
    return stratified_split([classes[c] for c in raw_names], raw_names), raw_names, dataset, "stratified 50/20/30 split"


def write_imagefolder(
    root: PathLike,
    out: PathLike,
    *,
    split_json: Optional[PathLike] = None,
    name: Optional[str] = None,
    classnames_file: Optional[PathLike] = None,
    max_resolution: int = 1024,
    jpeg_quality: int = 90,
    workers: Optional[int] = None,
    skip_bad: bool = False,
    train_short_side: int = 320,
    eval_size: int = 224,
    eval_format: str = "raw",
) -> WriteSummary:
    """Write the images under `root` to `out` (.beton) and its sidecar; see the module docstring.

    The dataset name comes from `name`, else the split file's `split_zhou_<Name>.json`,
    else ROOT's folder name; a known CoOp dataset gets its template and class names.
    `classnames_file` maps folder names to class names (e.g. ImageNet's wnids).
    Storage (`fastprompt.data.pixels`): val/test evaluation-ready at `eval_size` (the
    model's input size), train whole with the shorter side at most `train_short_side`.
    """
    options = WriteOptions(max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=workers,
                           train_short_side=train_short_side, eval_size=eval_size, eval_format=eval_format)
    samples, raw_names, given_name, split_source = collect_imagefolder(root, split_json, name)
    dataset = canonical_name(given_name)
    if classnames_file is not None:
        mapping = read_classnames_file(Path(classnames_file))
        unnamed = [c for c in raw_names if c not in mapping]
        if unnamed:
            raise FastpromptError(f"class-name file {classnames_file} has no entry for {unnamed[0]!r}; add a line for it")
        raw_names = [mapping[c] for c in raw_names]
    root = Path(root)
    provenance = {
        "kind": "imagefolder",
        "root": str(root.resolve()),
        "split_json": str(Path(split_json).resolve()) if split_json is not None else None,
        "classnames_file": str(Path(classnames_file).resolve()) if classnames_file is not None else None,
        "raw_classnames": raw_names,  # folder or split-file names before cleanup
    }
    classnames = [clean_classname(c, given_name) for c in raw_names]
    return write_samples(out, root, samples, classnames, name=dataset, template=default_template(given_name),
                         split_source=split_source, provenance=provenance, options=options, skip_bad=skip_bad)


def write_samples(
    out: PathLike,
    root: Path,
    samples: list[Sample],
    classnames: list[str],
    *,
    name: str,
    template: str,
    split_source: str,
    provenance: dict,
    options: WriteOptions,
    skip_bad: bool,
) -> WriteSummary:
    """Write image files (`samples`, paths relative to `root`) to `out`: what every
    `prepare` of image files (imagefolder, coop) shares. Paths are kept in the sidecar as
    given (a split file's), and each split's samples in their given order (Dassl's draw
    depends on it)."""
    ready = tuple(options.eval_size is not None and s.split != "train" for s in samples)
    source = ImageFiles(str(root), tuple(s.path for s in samples), ready, options)
    return write_beton(
        out,
        source,
        [s.label for s in samples],
        [s.split for s in samples],
        classnames,
        name=name,
        template=template,
        split_source=split_source,
        provenance=provenance,
        paths=[s.path for s in samples],
        options=options,
        skip_bad=skip_bad,
    )
