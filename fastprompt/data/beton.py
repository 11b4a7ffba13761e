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
  from, how images are stored (`image`), the `.beton`'s size and SHA-256 (`checksum`), and
  the format version. Version 1 sidecars (every split stored whole at <= 256 px) still
  open; their evaluation pixels are approximate and opening one says once how to
  re-prepare it. Sidecars written before checksums (version 2 without `checksum`) open
  as before; `fastprompt verify` says it has nothing to compare.

Writing goes to hidden temporary files in the destination folder that are renamed at the
end, the sidecar last, so a failed or interrupted write leaves no `.beton` that opens (at
worst one without a sidecar). FFCV's writer processes are watched: one that raises or dies
ends the write (`_watched_writer`), and they die with the process that writes
(`_die_with_parent`). One process writes an output at a time (a lock file
`.NAME.beton.lock` beside it, inherited by the writer processes); holding it, a write first
removes the temporary files a killed write of the same output left. A read-only or full
disk is one line naming the path. An existing `.beton` or sidecar is replaced only when
asked (`overwrite`). Opening checks the sidecar against the `.beton`'s header and tables
(size, header fields, field layout, one allocation per image, each image's record, every
label and split), so a truncated, mismatched or table-damaged pair is reported before a
loader touches it; bytes changed inside the image data are found by `verify_dataset`
(the whole file against the checksum), which is not run on every open.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, Union

import numpy as np

from fastprompt.errors import FastpromptError
from fastprompt.files import FolderLock, path_component
from fastprompt.data.ffcv_compat import import_ffcv
from fastprompt.data.pixels import UnusableImage
from fastprompt.settings import resolve_workers
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
CHECKSUM = "sha256"  # the sidecar's `checksum` of the whole .beton (hashlib; measured faster than blake2b here)
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
    """The indexed dataset FFCV's writer processes read: ((bytes, raw, height, width), label,
    split) per sample, the image already encoded as stored (`stored`).

    An image that cannot be read, sized or encoded is recorded in the shared `failed` flags
    and a 1x1 placeholder is written in its place; the parent then raises or rewrites
    without it. Each writer process also notes the sample it is on in `current` (one slot
    per process), so a process that dies can be reported with the file it was writing.
    """

    _PLACEHOLDER = (np.zeros(3, dtype=np.uint8), True, 1, 1)

    def __init__(self, source: ImageSource, order: np.ndarray, labels: np.ndarray, splits: np.ndarray, failed: Any,
                 current: Any, options: WriteOptions, raw_splits: tuple[int, ...] = ()):
        self.source, self.order, self.labels, self.splits, self.failed = source, order, labels, splits, failed
        self.current = current  # shared: 1 + the sample each writer process is on (0: none yet)
        self.options, self.page_size = options, _page_size(options)
        self.raw_splits = raw_splits  # split codes whose images are stored raw (the rest as JPEG)
        self.slot = 0  # this process's slot in `current` (set in each writer process)

    def __len__(self) -> int:
        return len(self.order)

    def stored(self, j: int) -> tuple[np.ndarray, bool, int, int]:
        """Sample j (an original index) as written: (data (nbytes,) uint8, raw, height, width).
        Raises whatever reading it raises, ValueError for an image that cannot be stored."""
        import_ffcv()
        from ffcv.fields.rgb_image import encode_jpeg

        image = self.source.load(j)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"decoded to {shape} {getattr(image, 'dtype', '')}, not (H, W, 3) uint8")
        height, width = image.shape[:2]
        if not 1 <= min(height, width) <= max(height, width) <= 65535:  # FFCV stores sides as uint16
            raise ValueError(f"stored size {width}x{height} px is outside 1..65535")
        raw = int(self.splits[j]) in self.raw_splits
        size = self.options.eval_size
        if size is not None and int(self.splits[j]) != SPLIT_CODE["train"] and (height, width) != (size, size):
            raise ValueError(f"evaluation-ready image is {width}x{height} px, not {size}x{size}")
        data = np.ascontiguousarray(image).reshape(-1) if raw else encode_jpeg(image, self.options.jpeg_quality)
        if data.nbytes > self.page_size:  # FFCV's allocator would fail in the writer process
            raise ValueError(f"stored as {data.nbytes} bytes, more than a {self.page_size}-byte page")
        return data, raw, height, width

    def __getitem__(self, i: int):
        j = int(self.order[i])
        self.current[self.slot] = j + 1
        try:
            value = self.stored(j)
        except Exception:  # noqa: BLE001 - see the class docstring: recorded here, raised by the parent
            self.failed[j] = True
            value = self._PLACEHOLDER
        return value, int(self.labels[j]), int(self.splits[j])


def _encode_image(destination, value: tuple[np.ndarray, bool, int, int], malloc) -> None:
    """FFCV's `RGBImageField.encode` (ffcv/fields/rgb_image.py) for an image encoded by
    `_WriterInput.stored`: the write mode (raw or JPEG) is chosen per sample."""
    import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES

    data, raw, height, width = value
    destination["mode"] = IMAGE_MODES["raw" if raw else "jpg"]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def _page_size(options: WriteOptions) -> int:
    """FFCV page size: a power of two, at least 2 MiB, holding a raw image of the largest size twice."""
    import_ffcv()
    from ffcv.writer import MIN_PAGE_SIZE

    side = max(options.max_resolution, options.eval_size or 0)
    need = 2 * side * side * 3
    size = MIN_PAGE_SIZE
    while size < need:
        size *= 2
    return size


class WriterFailed(FastpromptError):
    """A writer process raised or died; the write was abandoned."""


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """End this (forked) writer process when the process that writes the .beton dies.

    FFCV's writer processes wait on a work queue that the parent's feeder thread fills: a
    parent killed by SIGKILL or SIGTERM left them blocked for ever (re-parented to PID 1),
    holding the temporary .beton, the output's lock and, through the resource tracker,
    FFCV's shared memory (`/dev/shm/psm_*`). On Linux the kernel sends SIGKILL to this
    process when the thread that forked it ends (`prctl(PR_SET_PDEATHSIG)`; the writing
    thread waits for its processes, so it ends only by dying); the parent may already be
    gone by the time of the call, hence the check after it. Elsewhere a daemon thread polls
    the parent's pid twice a second."""
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="fastprompt-writer-watchdog", daemon=True).start()


def _writer_process(errors: Any, slot: int, parent: int, work_fn: Any, *args: Any) -> None:
    """One FFCV writer process (`work_fn` is FFCV's `worker_job_indexed_dataset`), ended when
    `parent` dies (`_die_with_parent`): an exception is sent to the parent as one line and
    ends the process with exit code 1, without a traceback on stderr."""
    _die_with_parent(parent)
    dataset = args[-1]
    dataset.slot = slot
    try:
        work_fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        errors.put((slot, f"{type(err).__name__}: {err}".splitlines()[0]))
        errors.close()
        errors.join_thread()
        os._exit(1)


def _describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with code {code}"


def _watched_writer(path: Path, fields: dict, page_size: int, workers: int) -> Any:
    """An FFCV `DatasetWriter` whose parent notices a failed writer process.

    FFCV's `_write_common` (ffcv/writer.py) polls a shared sample counter until it reaches
    the total, then blocks on each process's allocation list: a process that raises or is
    killed (an OpenCV error, the OOM killer, a full disk) never reports, and the parent waits
    for ever. This copy of it runs every process through `_writer_process` and, while
    waiting, checks the error queue and every process's exit status: a failure terminates
    the other processes, frees FFCV's shared memory and raises `WriterFailed`, naming the
    image the failed process was on.
    """
    import queue as queue_module
    import time
    from multiprocessing import Process, Queue, Value

    import_ffcv()
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class WatchedWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()  # writes the header and field table, creates self.metadata_sm
            processes: list = []
            try:
                work: Queue = Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)  # one stop token per process
                allocations: Queue = Queue()
                errors: Queue = Queue()
                done = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                        *extra_worker_args)
                processes = [Process(target=_writer_process, args=(errors, slot, os.getpid(), work_fn, *args),
                                     daemon=True) for slot in range(self.num_workers)]
                for p in processes:
                    p.start()
                dataset = extra_worker_args[-1]
                allocation_list: list = []
                reported = 0
                with tqdm(total=self.num_samples) as progress:
                    while reported < len(processes):
                        try:
                            allocation_list.extend(allocations.get(timeout=0.1))
                            reported += 1
                            continue
                        except queue_module.Empty:
                            pass
                        progress.update(int(done.value) - progress.n)
                        self._check(processes, errors, dataset)
                    progress.update(self.num_samples - progress.n)
                self.finalize(allocation_list)
                for p in processes:
                    p.join()
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                for p in processes:
                    p.join(timeout=5)
                    if p.is_alive():
                        p.kill()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        @staticmethod
        def _check(processes: list, errors: Any, dataset: "_WriterInput") -> None:
            failure = None
            try:
                slot, message = errors.get_nowait()
                failure = (slot, f"raised {message}")
            except queue_module.Empty:
                for slot, p in enumerate(processes):
                    if p.exitcode not in (None, 0):
                        time.sleep(0.2)  # a process that raised sent its error before exiting: let it arrive
                        try:
                            slot, message = errors.get_nowait()
                            failure = (slot, f"raised {message}")
                        except queue_module.Empty:
                            failure = (slot, _describe_exit(p.exitcode))
                        break
            if failure is not None:
                slot, what = failure
                at = int(dataset.current[slot])
                image = f" at image {dataset.source.describe(at - 1)}" if at else ""
                raise WriterFailed(f"a writer process {what}{image}; nothing was kept: fix the cause (memory, disk "
                                   "space, the image) and run `fastprompt prepare` again (fewer --workers use less memory)")

    return WatchedWriter(str(path), fields, page_size=page_size, num_workers=workers)


def _ffcv_write(path: Path, data: _WriterInput, indices: np.ndarray, options: WriteOptions, workers: int) -> None:
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    image_field = RGBImageField(write_mode="jpg", jpeg_quality=options.jpeg_quality)
    # per-sample raw or JPEG (an instance attribute: the field stays an RGBImageField for FFCV's reader)
    image_field.encode = _encode_image
    fields = {"image": image_field, "label": IntField(), "split": IntField()}
    writer = _watched_writer(path, fields, _page_size(options), workers)
    writer.from_indexed_dataset(data, indices=np.asarray(indices, dtype=np.int64), chunksize=64)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_error(data: _WriterInput, j: int) -> Exception:
    """Prepare sample j again in this process to report why it failed in a writer process."""
    try:
        data.stored(j)
    except Exception as err:  # noqa: BLE001 - turned into the message of a FastpromptError
        return err
    return RuntimeError("failed in a writer process")


def _temporaries(out: Path) -> list[Path]:
    """The temporary files writes of `out` make beside it (`.STEM.XXXXXXXX.beton.tmp` and
    `.json.tmp`, mkstemp's 8 random characters): only this output's, never another name's."""
    parent = out.parent if str(out.parent) else Path(".")
    pattern = re.compile(re.escape(f".{out.stem}.") + r"[a-z0-9_]{8}\.(beton|json)\.tmp")
    try:
        return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def _write_error(out: Path, err: OSError) -> FastpromptError:
    """A failed write in this process as one line naming the path and the fix."""
    import errno

    where = f" ({err.filename})" if err.filename and str(err.filename) != str(out) else ""
    fix = ("free space on that disk, or choose another --out" if err.errno in (errno.ENOSPC, errno.EDQUOT)
           else "choose a writable folder for --out")
    return FastpromptError(f"cannot write {out}{where}: {err.strerror or err}; nothing was kept: {fix}")


def check_output(out: PathLike, overwrite: bool = False) -> Path:
    """`out` as a Path if a dataset may be written there: a `.beton` name, not a folder, and
    (unless `overwrite`) neither it nor its sidecar existing (either one alone counts:
    `--out settings.beton` must not replace a `settings.json`). `prepare` checks this
    before scanning its source, and `write_beton` again before writing and before renaming."""
    out = Path(out)
    if out.suffix != ".beton":
        raise FastpromptError(f"--out {out} must end in .beton (the sidecar goes beside it as {out.stem}.json)")
    if out.is_dir():
        raise FastpromptError(f"--out {out} is a folder; name the dataset file, e.g. {out / 'data.beton'}")
    if sidecar_path(out).is_dir():
        raise FastpromptError(f"--out {out}: its sidecar would replace the folder {sidecar_path(out)}; choose another --out")
    for path in (out, sidecar_path(out)):
        if not overwrite and (path.exists() or path.is_symlink()):
            raise FastpromptError(f"--out {out}: {path} already exists; pass --overwrite to replace it, or choose another --out")
    return out


def payload_checksum(path: PathLike, algorithm: str = CHECKSUM) -> str:
    """`algorithm:hexdigest` of the whole file, read in 1 MiB chunks (BENCHMARKS.md: about 0.2 s per 100 MB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


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
    overwrite: bool = False,
) -> WriteSummary:
    """Write `source` (with labels and splits) to `out` and its sidecar, atomically.

    Samples are stored in split order (train, val, test; stable within a split). An
    unreadable or unusable image (`fastprompt.data.pixels.storage_problem`) fails the write
    naming the file, or with `skip_bad` is left out (the count is reported; a class left
    without images is still an error); a writer process that fails or dies ends the write.
    On any failure no file remains at `out` or beside it. An existing `out` or sidecar is
    replaced only with `overwrite` (the old sidecar is removed first and the new one written
    last, so an interrupted replacement never pairs the new file with the old sidecar).
    """
    out = check_output(out, overwrite)
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

    parent = out.parent if str(out.parent) else Path(".")
    # one writer per output: the lock makes the missing folders (removed again on failure), and the writer
    # processes inherit it, so temporary files of this output found while holding it belong to no live writer
    lock = FolderLock(parent, f".{out.name}.lock", busy=f"another process is writing {out}", target=str(out))
    lock.acquire()
    tmp_beton = tmp_json = None
    try:
        for stale in _temporaries(out):
            logger.info("removing %s, left by an interrupted write of %s", stale, out)
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".beton.tmp", dir=parent)
        os.close(fd)
        tmp_beton = Path(tmp_name)
        failed = multiprocessing.Array(ctypes.c_bool, n, lock=False)
        current = multiprocessing.Array(ctypes.c_int64, workers, lock=False)
        raw = (SPLIT_CODE["val"], SPLIT_CODE["test"]) if options.eval_size is not None and options.eval_format == "raw" else ()
        data = _WriterInput(source, order, label_arr, split_arr, failed, current, options, raw)
        logger.info("writing %d images to %s with %d processes", n, tmp_beton, workers)
        _ffcv_write(tmp_beton, data, np.arange(n), options, workers)
        bad = np.flatnonzero(np.frombuffer(failed, dtype=np.bool_))  # original sample indices
        skipped: tuple[str, ...] = ()
        if len(bad):
            first = source.describe(int(bad[0]))
            if not skip_bad:
                err = _first_error(data, int(bad[0]))
                what = f"image {first} is unusable" if isinstance(err, UnusableImage) else f"cannot read image {first}"
                raise FastpromptError(
                    f"{what} ({type(err).__name__}: {err})".splitlines()[0]
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
            "checksum": payload_checksum(tmp_beton),  # `fastprompt verify` compares it; opening does not
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
        check_output(out, overwrite)  # again: something may have appeared while writing
        final_json.unlink(missing_ok=True)  # the old sidecar goes first, the new one comes last
        os.replace(tmp_beton, out)
        tmp_beton = out  # from here a failure must remove the renamed .beton too
        from fastprompt.training.hooks import kill_point

        kill_point("beton-write")  # test hook (training/hooks.py): killed between the two renames
        os.replace(tmp_json, final_json)
        tmp_beton = tmp_json = None
    except BaseException as err:
        for p in (tmp_beton, tmp_json):
            if p is not None:
                p.unlink(missing_ok=True)
        if isinstance(err, OSError):  # a read-only or full disk in this process (the writer processes: WriterFailed)
            raise _write_error(out, err) from None
        raise
    finally:
        lock.release()
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
    # the name becomes part of paths (sweep cells, eval files, figures): refused when it is not a plain name
    path_component(meta["name"], f'sidecar {side}: "name"',
                   'set "name" to a plain name such as "eurosat", or re-create the dataset with `fastprompt prepare`')
    return meta


def _check_size(path: Path, meta: dict[str, Any], shown: Path) -> int:
    """The .beton's size in bytes, which must be the sidecar's (a file cut short, or another
    file under the name); torch-free."""
    size = path.stat().st_size
    if size != meta["beton_bytes"]:
        what = "truncated" if size < meta["beton_bytes"] else "not the file its sidecar describes"
        raise FastpromptError(f"{shown} is {what} ({size} bytes, the sidecar says {meta['beton_bytes']}); "
                              "re-create it with `fastprompt prepare`")
    return size


def _check_beton(path: Path, meta: dict[str, Any], shown: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """Check `path` against its sidecar; return the (labels, splits) stored in the .beton.

    Catches what a loader would otherwise trip over later, or silently misread: a file cut
    short (size, header, allocation table), a different .beton under the same name, a
    field layout that is not ours, an allocation table or image record that does not
    describe one stored image per sample, labels or splits that disagree with the sidecar.
    Reads only the header and tables (milliseconds per 10,000 images); damage inside the
    image data is what `verify_dataset` (the sidecar's checksum) finds.
    """
    shown = shown or path
    fix = "re-create it with `fastprompt prepare`"
    size = _check_size(path, meta, shown)
    import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType
    from ffcv.writer import MIN_PAGE_SIZE

    if size < HeaderType.itemsize:
        raise FastpromptError(f"{shown} is truncated ({size} bytes, shorter than an FFCV header); {fix}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise FastpromptError(f"{shown} is not an FFCV v{CURRENT_VERSION} .beton (header version {int(header['version'])}); {fix}")
    page = int(header["page_size"])
    if int(header["num_fields"]) != len(FIELD_NAMES) or page < MIN_PAGE_SIZE or page & (page - 1):
        raise FastpromptError(
            f"{shown} has a corrupt header ({int(header['num_fields'])} fields, page size {page}); {fix}"
        )
    table_ptr = int(header["alloc_table_ptr"])
    if not 0 < table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise FastpromptError(f"{shown} is truncated or corrupt (allocation table at byte {table_ptr} of {size}); {fix}")
    n = meta["num_samples"]
    if int(header["num_samples"]) != n:
        raise FastpromptError(
            f"{shown} holds {int(header['num_samples'])} samples but its sidecar says {n}; {fix}"
        )
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises assorted types on a damaged file
        raise FastpromptError(f"{shown} is not a readable .beton ({type(err).__name__}: {err}); {fix}") from None
    if tuple(reader.field_names) != FIELD_NAMES or len(reader.metadata) != n:
        raise FastpromptError(f"{shown} has fields {reader.field_names}, expected {list(FIELD_NAMES)}; {fix}")
    # the allocation table: one image allocation per sample, between the tables and the allocation table
    data_start = HeaderType.itemsize + len(FIELD_NAMES) * FieldDescType.itemsize + n * reader.metadata.dtype.itemsize
    table = reader.alloc_table
    ids = table["sample_id"].astype(np.int64)  # (A,) in the writer processes' order
    once = len(table) == n and ids.min(initial=0) >= 0 and ids.max(initial=-1) < n
    if not once or np.bincount(ids, minlength=n).max(initial=1) != 1:
        stored = len(np.unique(ids[(ids >= 0) & (ids < n)]))
        raise FastpromptError(f"{shown} is corrupt (its allocation table lists {stored} of {n} images); {fix}")
    ptrs, sizes = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)  # (n,) by sample
    ptrs[ids], sizes[ids] = table["ptr"], table["size"]
    if n and (ptrs.min() < data_start or int(np.max(ptrs + sizes)) > table_ptr):
        raise FastpromptError(f"{shown} is corrupt (image data outside the data region); {fix}")
    image = reader.metadata["f0"]  # (n,) records: mode, width, height, data_ptr
    mode, width, height = (image[k].astype(np.int64) for k in ("mode", "width", "height"))
    raw = mode == IMAGE_MODES["raw"]
    bad = ((image["data_ptr"].astype(np.int64) != ptrs) | ~(raw | (mode == IMAGE_MODES["jpg"]))
           | (np.minimum(width, height) < 1) | (raw & (sizes != width * height * 3)))
    if bad.any():
        raise FastpromptError(f"{shown} is corrupt (the record of image {int(np.argmax(bad))} does not match its data); {fix}")
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
    eval_size = meta.get("image", {}).get("eval_size") if meta["format_version"] >= 2 else None
    if eval_size is not None:  # val/test stored evaluation-ready: exactly eval_size square
        ready = splits != SPLIT_CODE["train"]
        odd = ready & ((width != eval_size) | (height != eval_size))
        if odd.any():
            raise FastpromptError(f"{shown} is corrupt (evaluation image {int(np.argmax(odd))} is not {eval_size} px square); {fix}")
    return labels, splits


@dataclass(frozen=True)
class Verified:
    """What `verify_dataset` found; `line()` is `fastprompt verify`'s report."""

    beton: Path
    num_samples: int
    num_classes: int
    split_sizes: dict[str, int]
    checksum: Optional[str]  # the sidecar's, None for a file written before checksums

    def line(self) -> str:
        sizes = ", ".join(f"{s} {self.split_sizes[s]}" for s in SPLITS)
        head = f"{self.beton}: {self.num_samples} images, {self.num_classes} classes ({sizes})"
        if self.checksum is None:
            return (f"OK (not checksummed) {head}; header and tables checked, but its sidecar has no checksum "
                    "(written by an older fastprompt): re-create it with `fastprompt prepare` to add one")
        return f"OK {head}; {self.checksum.partition(':')[0]} checksum matches"


def verify_dataset(path: PathLike) -> Verified:
    """Every check of `open_dataset`, then the whole file against the sidecar's checksum;
    FastpromptError naming what is wrong. A file written before checksums passes with its
    `checksum` None (nothing to compare: the caller says so)."""
    dataset = open_dataset(path)
    recorded = dataset.meta.get("checksum")
    if recorded is not None:
        algorithm, _, expected = str(recorded).partition(":")
        if algorithm not in hashlib.algorithms_guaranteed or not expected:
            raise FastpromptError(f"sidecar {sidecar_path(dataset.path)} has an unreadable checksum {recorded!r}; "
                                  "re-create the dataset with `fastprompt prepare`")
        found = payload_checksum(dataset.path, algorithm)
        if found != f"{algorithm}:{expected}":
            raise FastpromptError(
                f"{dataset.path} is corrupt: its {algorithm} checksum differs from the one its sidecar recorded when it "
                f"was written; re-create it with `{dataset.prepare_command()}`"
            )
    return Verified(dataset.path, dataset.num_samples, dataset.num_classes, dataset.split_sizes,
                    None if recorded is None else str(recorded))


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
    labels: Optional[np.ndarray]  # (N,) int64, label of every sample (None: opened with tables=False)
    splits: Optional[np.ndarray]  # (N,) int64, split code of every sample (0 train, 1 val, 2 test; None: tables=False)
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
        """The `fastprompt prepare` command that re-creates this file in place (from its recorded
        source; `--overwrite`, since the file exists)."""
        source = self.meta.get("source", {})
        size = f" --eval-size {eval_size}" if eval_size is not None else ""
        out = f"--out {self.path} --overwrite"
        if source.get("kind") == "coop":
            return f"fastprompt prepare coop {source.get('dataset', self.name)} {source.get('folder', 'ROOT')} {out}{size}"
        if source.get("kind") == "imagefolder":
            extra = "".join(f" --{flag} {source[key]}" for key, flag in (("split_json", "split-json"), ("classnames_file", "classnames"))
                            if source.get(key))
            return f"fastprompt prepare imagefolder {source.get('root', 'ROOT')} {out}{extra}{size}"
        if source.get("kind") == "demo":  # stored whole: any size reads it
            drawn = "".join(f" --{flag} {source[key]}" for key, flag in (("images_per_class", "images-per-class"),
                                                                         ("image_size", "size"), ("seed", "seed"))
                            if key in source)
            return f"fastprompt prepare demo {out}{drawn}"
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


def open_dataset(path: PathLike, *, tables: bool = True) -> BetonDataset:
    """Open `path` (a .beton) and its sidecar; FastpromptError if either is missing or damaged.

    tables=False: the sidecar alone (name, template, class names, splits' sizes; `labels` and
    `splits` None) and the file's size against it, without reading the .beton's header and
    tables, which imports FFCV and torch: what planning a run needs (`training.plan.plan_run`), so a command line is checked
    before torch loads. A loader needs the full open."""
    beton = Path(path)
    if beton.suffix == ".json" and beton.with_suffix(".beton").is_file():
        beton = beton.with_suffix(".beton")  # the user pointed at the sidecar
    if beton.is_dir():
        raise FastpromptError(
            f"{beton} is a folder, not a .beton; if it holds one folder of images per class, turn it into one with "
            f"`fastprompt prepare imagefolder {beton} --out {beton.name or 'data'}.beton` and pass that file"
        )
    if not beton.is_file():
        raise FastpromptError(
            f"dataset {beton} does not exist; create it with `fastprompt prepare imagefolder ROOT --out {beton}` "
            f"or `fastprompt prepare demo --out {beton}`"
        )
    meta = _read_sidecar(beton)
    if tables:
        labels, splits = _check_beton(beton, meta)
    else:
        _check_size(beton, meta, beton)
        labels = splits = None
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
