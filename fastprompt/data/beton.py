"""The `.beton` dataset file and its JSON sidecar: writing (atomically) and opening (checked).

A fastprompt dataset is two files side by side:

- `NAME.beton`, an FFCV file with three fields per sample: `image` (RGBImageField),
  `label` (IntField, 0..K-1) and `split` (IntField: 0 train, 1 val, 2 test). Samples are
  stored train first, then val, then test. Images from files (`prepare imagefolder`,
  `prepare coop`) are stored as `fastprompt.data.pixels` says: val and test
  evaluation-ready (CLIP's eval transform at `eval_size`, raw pixels by default), train
  whole up to `train_short_side` / `max_resolution` as JPEG.
- `NAME.json`, the sidecar: class names (index = label), the default hand-crafted
  template, split sizes, every sample's label, split and source path, where the data came
  from, how images are stored (`image`), the `.beton`'s size, and the format version.
  Version 1 sidecars (every split stored whole at <= 256 px) still open; their evaluation
  pixels are approximate and opening one says once how to re-prepare it.

Writing goes to hidden temporary files in the destination folder that are renamed at the
end, so a failed or interrupted write leaves nothing. Opening checks the sidecar against
the `.beton` (size, header, field layout, every label and split), so a truncated or
mismatched pair is reported before a loader touches it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, Union

import numpy as np

from fastprompt.errors import FastpromptError
from fastprompt.runtime import resolve_workers
from fastprompt.validation import check_int, require
from fastprompt.data.splits import (
    SPLIT_CODE,
    SPLITS,
    FewShotDraw,
    class_subset,
    dassl_few_shot,
    few_shot_order,
    validate_split,
)

if TYPE_CHECKING:
    from fastprompt.data.loaders import BetonLoader

logger = logging.getLogger(__name__)

FORMAT = "fastprompt-beton"
FORMAT_VERSION = 2  # 2: val/test stored evaluation-ready (fastprompt.data.pixels)
READABLE_VERSIONS = (1, 2)  # 1: every split stored whole, longest side <= max_resolution (256 by default)
EVAL_FORMATS = ("raw", "jpg")
FIELD_NAMES = ("image", "label", "split")
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored in a `.beton` (see `fastprompt.data.pixels`)."""

    max_resolution: int = 1024  # longest side of a stored training image, px (larger ones are shrunk)
    jpeg_quality: int = 90  # JPEG quality of the stored training images (and of eval images with eval_format="jpg")
    workers: Optional[int] = None  # writer processes; None = all available cores (clamped to them)
    train_short_side: int = 320  # shorter side of a stored training image at most this, px (see fastprompt.data.pixels)
    eval_size: Optional[int] = 224  # val/test stored evaluation-ready at this size; None = stored like training images
    eval_format: str = "raw"  # evaluation-ready images: "raw" (CLIP's pixels exactly) or "jpg" (jpeg_quality, approximate)

    def __post_init__(self) -> None:
        check_int("max_resolution", self.max_resolution, minimum=16, maximum=8192)  # pixels
        check_int("jpeg_quality", self.jpeg_quality, minimum=1, maximum=100)
        check_int("train_short_side", self.train_short_side, minimum=16, maximum=8192)
        if self.eval_size is not None:
            check_int("eval_size", self.eval_size, minimum=16, maximum=2048)
        require(self.eval_format in EVAL_FORMATS, f"eval_format={self.eval_format!r} must be one of {', '.join(EVAL_FORMATS)}")
        resolve_workers(self.workers)

    def record(self) -> dict[str, Any]:
        """The sidecar's `image` entry."""
        return {"max_resolution": self.max_resolution, "jpeg_quality": self.jpeg_quality,
                "train_short_side": self.train_short_side, "eval_size": self.eval_size,
                "eval_format": self.eval_format if self.eval_size is not None else None}


@dataclass(frozen=True)
class WriteSummary:
    """What a write produced; `line()` is the CLI's one-line report."""

    beton: Path
    sidecar: Path
    name: str
    num_samples: int
    num_classes: int
    split_sizes: dict[str, int]
    split_source: str
    skipped: tuple[str, ...] = ()  # unreadable images left out (only with skip_bad)

    def line(self) -> str:
        sizes = ", ".join(f"{s} {self.split_sizes[s]}" for s in SPLITS)
        skipped = f"; skipped {len(self.skipped)} unreadable image(s)" if self.skipped else ""
        return (
            f"wrote {self.beton} ({self.name}: {self.num_samples} images, {self.num_classes} classes; {sizes}; "
            f"split from {self.split_source}) and {self.sidecar.name}{skipped}"
        )


class ImageSource(Protocol):
    """Indexable images to write: `load(i)` returns an (H, W, 3) uint8 RGB array, as stored
    (a source of files sizes them by `WriteOptions` and the sample's split; the writer
    only encodes)."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> np.ndarray: ...

    def describe(self, i: int) -> str: ...  # the sample's file, for error messages


def sidecar_path(beton: PathLike) -> Path:
    """`data/eurosat.beton` -> `data/eurosat.json`."""
    return Path(beton).with_suffix(".json")


class _WriterInput:
    """The indexed dataset FFCV's writer processes read: (image, label, split) per sample.

    An exception inside an FFCV writer process would hang the writer (its parent waits for
    a sample count that never arrives), so a failing `load` is recorded in the shared
    `failed` flags and a 1x1 placeholder is written; the parent then raises or rewrites.
    """

    _PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)

    def __init__(self, source: ImageSource, order: np.ndarray, labels: np.ndarray, splits: np.ndarray, failed: Any,
                 raw_splits: tuple[int, ...] = ()):
        self.source, self.order, self.labels, self.splits, self.failed = source, order, labels, splits, failed
        self.raw_splits = raw_splits  # split codes whose images are stored raw (the rest as JPEG)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        j = int(self.order[i])
        try:
            image = self.source.load(j)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"decoded to shape {image.shape} dtype {image.dtype}, not (H, W, 3) uint8")
        except Exception:  # noqa: BLE001 - see the class docstring: recorded here, raised by the parent
            self.failed[j] = True
            image = self._PLACEHOLDER
        split = int(self.splits[j])
        return (image, split in self.raw_splits), int(self.labels[j]), split


def _encode_image(destination, value: tuple[np.ndarray, bool], malloc, jpeg_quality: int) -> None:
    """FFCV's `RGBImageField.encode` (ffcv/fields/rgb_image.py) with the write mode chosen per
    sample: `value` is (image (H, W, 3) uint8, raw). Images arrive at their stored size, so
    FFCV's own resize never runs."""
    from ffcv.fields.rgb_image import IMAGE_MODES, encode_jpeg

    image, raw = value
    destination["mode"] = IMAGE_MODES["raw" if raw else "jpg"]
    destination["height"], destination["width"] = image.shape[:2]
    data = np.ascontiguousarray(image).reshape(-1) if raw else encode_jpeg(image, jpeg_quality)
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def _page_size(options: WriteOptions) -> int:
    """FFCV page size: a power of two, at least 2 MiB, holding a raw image of the largest size twice."""
    from ffcv.writer import MIN_PAGE_SIZE

    side = max(options.max_resolution, options.eval_size or 0)
    need = 2 * side * side * 3
    size = MIN_PAGE_SIZE
    while size < need:
        size *= 2
    return size


def _ffcv_write(path: Path, data: _WriterInput, indices: np.ndarray, options: WriteOptions, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image_field = RGBImageField(write_mode="jpg", jpeg_quality=options.jpeg_quality)
    # per-sample raw or JPEG (an instance attribute: the field stays an RGBImageField for FFCV's reader)
    image_field.encode = functools.partial(_encode_image, jpeg_quality=options.jpeg_quality)
    fields = {"image": image_field, "label": IntField(), "split": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=_page_size(options), num_workers=workers)
    writer.from_indexed_dataset(data, indices=np.asarray(indices, dtype=np.int64), chunksize=64)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_error(source: ImageSource, i: int) -> str:
    """Re-load sample i in this process to report why it failed in a writer process."""
    try:
        source.load(i)
    except Exception as err:  # noqa: BLE001 - turned into the message of a FastpromptError
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return "failed in a writer process"


def write_beton(
    out: PathLike,
    source: ImageSource,
    labels: Sequence[int],
    splits: Sequence[str],
    classnames: Sequence[str],
    *,
    name: str,
    template: str,
    split_source: str,
    provenance: dict[str, Any],
    paths: Optional[Sequence[str]] = None,
    options: WriteOptions = WriteOptions(),
    skip_bad: bool = False,
) -> WriteSummary:
    """Write `source` (with labels and splits) to `out` and its sidecar, atomically.

    Samples are stored in split order (train, val, test; stable within a split). An
    unreadable image fails the write naming the file, or with `skip_bad` is left out
    (the count is reported; a class left without images is still an error). On any
    failure no file remains at `out` or beside it.
    """
    out = Path(out)
    if out.suffix != ".beton":
        raise FastpromptError(f"--out {out} must end in .beton (the sidecar goes beside it as {out.stem}.json)")
    if out.is_dir():
        raise FastpromptError(f"--out {out} is a folder; name the dataset file, e.g. {out / 'data.beton'}")
    classnames = [str(c) for c in classnames]
    dup = sorted({c for c in classnames if classnames.count(c) > 1})
    if dup:
        raise FastpromptError(f"class names repeat after cleanup: {', '.join(dup)}; every class needs a distinct name")
    n = len(source)
    label_arr = np.asarray(labels, dtype=np.int64)
    split_arr = np.asarray([SPLIT_CODE[s] for s in splits], dtype=np.int64)
    if not (len(label_arr) == len(split_arr) == n) or (paths is not None and len(paths) != n):
        raise ValueError("write_beton: source, labels, splits and paths must have the same length")
    if n == 0:
        raise FastpromptError(f"no images to write to {out}; the source folder has none")
    workers = resolve_workers(options.workers)
    order = np.argsort(split_arr, kind="stable")  # train, val, test

    created: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    for d in reversed([parent, *parent.parents]):
        if not d.exists():
            d.mkdir()
            created.append(d)
    tmp_beton = tmp_json = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".beton.tmp", dir=parent)
        os.close(fd)
        tmp_beton = Path(tmp_name)
        failed = multiprocessing.Array(ctypes.c_bool, n, lock=False)
        raw = (SPLIT_CODE["val"], SPLIT_CODE["test"]) if options.eval_size is not None and options.eval_format == "raw" else ()
        data = _WriterInput(source, order, label_arr, split_arr, failed, raw)
        logger.info("writing %d images to %s with %d processes", n, tmp_beton, workers)
        _ffcv_write(tmp_beton, data, np.arange(n), options, workers)
        bad = np.flatnonzero(np.frombuffer(failed, dtype=np.bool_))  # original sample indices
        skipped: tuple[str, ...] = ()
        if len(bad):
            first = source.describe(int(bad[0]))
            if not skip_bad:
                raise FastpromptError(
                    f"cannot read image {first} ({_first_error(source, int(bad[0]))})"
                    + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                    + "; fix or remove it, or pass --skip-bad to leave unreadable images out"
                )
            skipped = tuple(source.describe(int(i)) for i in bad)
            logger.warning("skipping %d unreadable image(s), e.g. %s", len(bad), first)
            keep_mask = np.ones(n, dtype=bool)
            keep_mask[bad] = False
            for c in range(len(classnames)):
                if not np.any(keep_mask & (label_arr == c)):
                    raise FastpromptError(f"class {classnames[c]!r} has no readable images; fix its images or remove the class")
            keep_positions = np.flatnonzero(keep_mask[order])  # positions in the split-sorted order
            _ffcv_write(tmp_beton, data, keep_positions, options, workers)
            order = order[keep_positions]
            again = np.flatnonzero(np.frombuffer(failed, dtype=np.bool_)[order])
            if len(again):  # an image that read fine the first time failed now: the files are changing
                raise FastpromptError(
                    f"image {source.describe(int(order[again[0]]))} became unreadable while writing; "
                    "make sure nothing modifies the image folder during `fastprompt prepare`"
                )
        stored_labels, stored_splits = label_arr[order], split_arr[order]
        split_sizes = {s: int(np.sum(stored_splits == SPLIT_CODE[s])) for s in SPLITS}
        sidecar = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "template": template,
            "classnames": classnames,
            "num_samples": int(len(order)),
            "split_sizes": split_sizes,
            "split_source": split_source,
            "fields": {"image": "RGBImageField (train jpg; val/test per image.eval_format)", "label": "IntField", "split": "IntField (0 train, 1 val, 2 test)"},
            "image": options.record(),
            "source": {**provenance, "skipped": list(skipped)},
            "beton_bytes": tmp_beton.stat().st_size,
            "labels": stored_labels.tolist(),
            "splits": stored_splits.tolist(),
            "paths": [paths[i] for i in order] if paths is not None else None,
        }
        _check_beton(tmp_beton, sidecar, shown=out)  # what open_dataset will check
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".json.tmp", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            tmp_json = Path(tmp_name)
            json.dump(sidecar, f, separators=(",", ":"))
            f.write("\n")
        final_json = sidecar_path(out)
        mode = 0o666 & ~_umask()  # mkstemp made them private; give them the usual permissions
        os.chmod(tmp_beton, mode)
        os.chmod(tmp_json, mode)
        os.replace(tmp_beton, out)
        tmp_beton = out  # from here a failure must remove the renamed .beton too
        from fastprompt.training.hooks import kill_point

        kill_point("beton-write")  # test hook (training/hooks.py): killed between the two renames
        os.replace(tmp_json, final_json)
        tmp_beton = tmp_json = None
    except BaseException:
        for p in (tmp_beton, tmp_json):
            if p is not None:
                p.unlink(missing_ok=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return WriteSummary(
        out, final_json, name, int(len(order)), len(classnames), split_sizes, split_source, skipped
    )


# --------------------------------------------------------------------------------------
# Opening


def _read_sidecar(beton: Path) -> dict[str, Any]:
    side = sidecar_path(beton)
    if not side.is_file():
        raise FastpromptError(
            f"{beton} has no sidecar {side.name} beside it (it holds class names and splits); "
            "re-create the dataset with `fastprompt prepare`"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastpromptError(f"sidecar {side} is not readable JSON ({err}); re-create the dataset with `fastprompt prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FastpromptError(f"{side} is not a fastprompt dataset sidecar; re-create the dataset with `fastprompt prepare`")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise FastpromptError(
            f"{side} has format version {meta.get('format_version')!r}, this fastprompt reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            "re-create the dataset with this version's `fastprompt prepare`"
        )
    required = ("name", "template", "classnames", "num_samples", "split_sizes", "beton_bytes", "labels", "splits")
    missing = [k for k in required if k not in meta]
    if missing:
        raise FastpromptError(f"sidecar {side} lacks {', '.join(missing)}; re-create the dataset with `fastprompt prepare`")
    return meta


def _check_beton(path: Path, meta: dict[str, Any], shown: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """Check `path` against its sidecar; return the (labels, splits) stored in the .beton.

    Catches what a loader would otherwise trip over later, or silently misread: a file cut
    short (size, header, allocation table), a different .beton under the same name, a
    field layout that is not ours, labels or splits that disagree with the sidecar.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    shown = shown or path
    fix = "re-create it with `fastprompt prepare`"
    size = path.stat().st_size
    if size != meta["beton_bytes"]:
        what = "truncated" if size < meta["beton_bytes"] else "not the file its sidecar describes"
        raise FastpromptError(f"{shown} is {what} ({size} bytes, the sidecar says {meta['beton_bytes']}); {fix}")
    if size < HeaderType.itemsize:
        raise FastpromptError(f"{shown} is truncated ({size} bytes, shorter than an FFCV header); {fix}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise FastpromptError(f"{shown} is not an FFCV v{CURRENT_VERSION} .beton (header version {int(header['version'])}); {fix}")
    table_ptr = int(header["alloc_table_ptr"])
    if not 0 < table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise FastpromptError(f"{shown} is truncated or corrupt (allocation table at byte {table_ptr} of {size}); {fix}")
    if int(header["num_samples"]) != meta["num_samples"]:
        raise FastpromptError(
            f"{shown} holds {int(header['num_samples'])} samples but its sidecar says {meta['num_samples']}; {fix}"
        )
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises assorted types on a damaged file
        raise FastpromptError(f"{shown} is not a readable .beton ({type(err).__name__}: {err}); {fix}") from None
    if tuple(reader.field_names) != FIELD_NAMES or len(reader.metadata) != meta["num_samples"]:
        raise FastpromptError(f"{shown} has fields {reader.field_names}, expected {list(FIELD_NAMES)}; {fix}")
    table = reader.alloc_table
    if len(table) and int(np.max(table["ptr"] + table["size"])) > table_ptr:
        raise FastpromptError(f"{shown} is corrupt (image data beyond the allocation table); {fix}")
    if len(np.unique(table["sample_id"])) != meta["num_samples"]:
        stored = len(np.unique(table["sample_id"]))
        raise FastpromptError(f"{shown} is corrupt ({stored} of {meta['num_samples']} images stored); {fix}")
    labels = np.ascontiguousarray(reader.metadata["f1"], dtype=np.int64)
    splits = np.ascontiguousarray(reader.metadata["f2"], dtype=np.int64)
    same_labels = np.array_equal(labels, np.asarray(meta["labels"], dtype=np.int64))
    if not (same_labels and np.array_equal(splits, np.asarray(meta["splits"], dtype=np.int64))):
        raise FastpromptError(f"{shown} and its sidecar disagree on labels or splits; {fix}")
    num_classes = len(meta["classnames"])
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FastpromptError(f"{shown} has labels outside 0..{num_classes - 1}; {fix}")
    if len(splits) and (splits.min() < 0 or splits.max() >= len(SPLITS)):
        raise FastpromptError(f"{shown} has split codes outside 0..{len(SPLITS) - 1}; {fix}")
    return labels, splits


@dataclass
class BetonDataset:
    """An opened `.beton` with its sidecar: class names, template, splits and loaders.

    Sample indices (what `indices` returns) are positions in the `.beton`.
    """

    path: Path
    name: str  # dataset name, e.g. "eurosat" or "demo"
    template: str  # default hand-crafted template, e.g. "a photo of a {}."
    classnames: list[str]  # all classes; index = label
    split_sizes: dict[str, int]  # split -> number of samples
    labels: np.ndarray  # (N,) int64, label of every sample
    splits: np.ndarray  # (N,) int64, split code of every sample (0 train, 1 val, 2 test)
    meta: dict[str, Any] = field(repr=False)  # the whole sidecar
    _draws: dict[tuple[int, int], FewShotDraw] = field(default_factory=dict, init=False, repr=False)  # (shots, seed) -> draw

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def eval_size(self) -> Optional[int]:
        """The side val and test are stored evaluation-ready at (CLIP's eval transform done at
        prepare time), or None when they are stored whole (the demo set, version-1 files)."""
        if self.meta["format_version"] < 2:
            return None
        size = self.meta.get("image", {}).get("eval_size")
        return None if size is None else int(size)

    @property
    def approximate_eval_pixels(self) -> bool:
        """A version-1 file of image files: val/test stored at <= 256 px, so evaluation pixels
        only approximate CLIP's eval transform of the originals."""
        return self.meta["format_version"] < 2 and self.meta.get("source", {}).get("kind") in ("imagefolder", "coop")

    def prepare_command(self, eval_size: Optional[int] = None) -> str:
        """The `fastprompt prepare` command that re-creates this file (from its recorded source)."""
        source = self.meta.get("source", {})
        size = f" --eval-size {eval_size}" if eval_size is not None else ""
        if source.get("kind") == "coop":
            return f"fastprompt prepare coop {source.get('dataset', self.name)} {source.get('folder', 'ROOT')} --out {self.path}{size}"
        if source.get("kind") == "imagefolder":
            extra = "".join(f" --{flag} {source[key]}" for key, flag in (("split_json", "split-json"), ("classnames_file", "classnames"))
                            if source.get(key))
            return f"fastprompt prepare imagefolder {source.get('root', 'ROOT')} --out {self.path}{extra}{size}"
        if source.get("kind") == "demo":
            return f"fastprompt prepare demo --out {self.path}"  # stored whole: any size reads it
        return f"the `fastprompt prepare` command that wrote {self.path}, with{size or ' its options'}"

    def check_image_size(self, image_size: int) -> None:
        """FastpromptError unless val/test can be read at `image_size` (a model's input size):
        evaluation-ready splits are stored at one size, fixed when the file was prepared."""
        size = self.eval_size
        if size is not None and image_size != size:
            raise FastpromptError(
                f"{self.path} stores val/test evaluation-ready at {size} px but the model takes {image_size} px; "
                f"re-prepare it for this model: `{self.prepare_command(image_size)}`"
            )

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def class_subset(self, classes: str = "all") -> list[int]:
        """Original labels kept by `classes` ("all" | "base" | "new"), sorted; base = first ceil(K/2)."""
        return class_subset(self.num_classes, classes)

    def classnames_for(self, classes: str = "all") -> list[str]:
        """Class names in the order of the relabelled labels 0..K'-1 of `classes`."""
        return [self.classnames[c] for c in self.class_subset(classes)]

    def draw(self, shots: int, seed: int) -> FewShotDraw:
        """Dassl's few-shot draw of `shots` per class with `seed` (see `splits.dassl_few_shot`).

        Made once per (shots, seed) and kept; the first time, one log line names the classes
        that had fewer images than asked and took all of them (Dassl's rule).
        """
        key = (shots, seed)
        if key not in self._draws:
            draw = dassl_few_shot(self.labels, self.splits, shots, seed)
            if draw.short:
                listed = ", ".join(f"{self.classnames[c]!r} ({split}: {n})" for split, c, n in draw.short[:5])
                more = f" and {len(draw.short) - 5} more" if len(draw.short) > 5 else ""
                logger.warning(
                    "%s: %d class(es) have fewer images than the %d-shot draw asks and take all they have "
                    "(Dassl's rule): %s%s", self.name, len(draw.short), shots, listed, more,
                )
            self._draws[key] = draw
        return self._draws[key]

    def _order(self, split: str, shots: Optional[int], seed: int, classes: str) -> np.ndarray:
        validate_split(split)
        draw = None if shots is None or split == "test" else self.draw(shots, seed)
        return few_shot_order(self.labels, self.splits, self.classnames, split, shots, draw, self.class_subset(classes))

    def indices(self, split: str, shots: Optional[int] = None, seed: int = 1, classes: str = "all") -> np.ndarray:
        """Sorted `.beton` indices of `split` for `classes`; `shots` per class if given.

        Few-shot is Dassl's draw (`draw`): train takes `shots` per class, val min(shots, 4),
        a class with fewer takes all it has; test is never subsampled. The class half of
        base-to-new is taken after the draw (CoCoOp), so base's subset is part of all's.
        """
        return np.sort(self._order(split, shots, seed, classes))

    def files(self, split: str, shots: Optional[int] = None, seed: int = 1, classes: str = "all") -> list[str]:
        """The image paths (as written in the split file, relative to the image folder) of
        `split` that a run with `--shots shots --seed seed` uses, in Dassl's order (the order
        CoOp's split_fewshot/shot_K-seed_S.pkl holds); "test" (or shots=None) is the whole split."""
        paths = self.meta.get("paths")
        if paths is None:
            raise FastpromptError(
                f"{self.path} records no source paths; re-create it with `fastprompt prepare` to list its files"
            )
        return [str(paths[i]) for i in self._order(split, shots, seed, classes)]

    def fewshot_record(self, shots: Optional[int], seed: int, classes: str = "all") -> dict[str, Any]:
        """What a run trains and validates on, for its `fewshot.json`: per split the
        `[path, label, classname]` entries (a split file's format; original labels) in
        Dassl's order, so two runs, or a run and CoOp's pickle, compare by file list."""
        paths = self.meta.get("paths")
        record: dict[str, Any] = {"sampler": "dassl", "dataset": self.name, "beton": str(self.path), "shots": shots,
                                  "seed": seed, "classes": classes}
        for split in ("train", "val"):
            order = self._order(split, shots, seed, classes)
            record[split] = [[None if paths is None else str(paths[i]), int(self.labels[i]),
                              self.classnames[int(self.labels[i])]] for i in order]
        return record

    def loader(self, split: str, **kwargs: Any) -> "BetonLoader":
        """An FFCV loader of (images, labels) batches; see `fastprompt.data.pipelines.LoaderConfig`.

        Keyword arguments: shots, seed, classes, train, image_size, batch_size, device,
        num_workers, drop_last, order_seed, mean, std, and the rest of LoaderConfig.
        """
        from fastprompt.data.loaders import make_loader  # FFCV and numba, imported on first use
        from fastprompt.data.pipelines import LoaderConfig

        shots = kwargs.pop("shots", None)
        seed = kwargs.pop("seed", 1)
        classes = kwargs.pop("classes", "all")
        config = LoaderConfig(**kwargs)
        validate_split(split)
        if split != "train" and self.eval_size is not None:  # stored as CLIP's eval transform left it
            if config.train:
                raise FastpromptError(
                    f"split {split!r} of {self.path} is stored evaluation-ready (a {self.eval_size} px centre crop), "
                    "so a random resized crop of it is not Dassl's augmentation; train on split 'train'"
                )
            self.check_image_size(config.image_size)
            if config.center_crop_ratio != 1.0:
                raise FastpromptError(
                    f"center_crop_ratio={config.center_crop_ratio} needs whole images, but {split!r} of {self.path} is "
                    "stored evaluation-ready (CLIP's crop, ratio 1); leave center_crop_ratio at 1.0"
                )
        return make_loader(self, self.indices(split, shots=shots, seed=seed, classes=classes), split, classes, config)


def open_dataset(path: PathLike) -> BetonDataset:
    """Open `path` (a .beton) and its sidecar; FastpromptError if either is missing or damaged."""
    beton = Path(path)
    if beton.suffix == ".json" and beton.with_suffix(".beton").is_file():
        beton = beton.with_suffix(".beton")  # the user pointed at the sidecar
    if not beton.is_file():
        raise FastpromptError(
            f"dataset {beton} does not exist; create it with `fastprompt prepare imagefolder ROOT --out {beton}` "
            f"or `fastprompt prepare demo --out {beton}`"
        )
    meta = _read_sidecar(beton)
    labels, splits = _check_beton(beton, meta)
    dataset = BetonDataset(
        path=beton,
        name=str(meta["name"]),
        template=str(meta["template"]),
        classnames=[str(c) for c in meta["classnames"]],
        split_sizes={s: int(meta["split_sizes"][s]) for s in SPLITS},
        labels=labels,
        splits=splits,
        meta=meta,
    )
    key = str(beton.resolve())
    if dataset.approximate_eval_pixels and key not in _warned_approximate:
        _warned_approximate.add(key)
        logger.warning(
            "%s was prepared by an older fastprompt: its evaluation pixels are approximate (stored at <= 256 px, not "
            "CLIP's eval transform of the originals); re-prepare it with `%s`", beton, dataset.prepare_command(),
        )
    return dataset


_warned_approximate: set[str] = set()  # version-1 files already warned about in this process
