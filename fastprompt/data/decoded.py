"""Decode once: a training subset's images decoded from the `.beton` into one uint8 array.

A few-shot run trains on a small set (16 shots: 160 images for EuroSAT, 6,352 for SUN397,
16,000 for ImageNet) for 50-200 epochs; decoding its JPEGs was most of the training
loader's cost, paid every epoch. With the decoded cache the training loader
(`fastprompt.data.loaders.BetonLoader`, `decoded_cache`) decodes the subset once, before its
first epoch, into `DecodedImages` (every image as stored, (H, W, 3) uint8, one after the
other in one array), and every epoch's random resized crop and flip read from it
(`fastprompt.data.decoders._crop_decoded`): the same decoder, the same per-sample streams
and the same crop code as decoding every epoch, so the batches are the same bit for bit.

Memory: H * W * 3 bytes per stored image (a 320 x 427 image: 410 KB; 16 shots of ImageNet at
the default 320 px storage: about 6.5 GB). The setting (`decoded_cache`, `--decoded-cache`):
- "auto": the cache when the decoded subset fits in `AUTO_FRACTION` of the memory available
  when the loader starts (psutil's `virtual_memory().available`), else decoding every epoch;
- "off": decoding every epoch;
- a size ("8G", "512M", "1.5GiB", or bytes): the cache when the decoded subset fits in it.
The loader logs which path it takes and the bytes it holds.

Under torch.distributed the ranks of one machine (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE)
share one copy in shared memory (`/dev/shm`): each decodes only its shard of the subset
(every LOCAL_WORLD_SIZE-th image) into it, so a machine holds and decodes the subset once
whatever its rank count. The file is removed as soon as every rank has mapped it (the
mappings stay valid), so nothing is left behind once the processes end.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from fastprompt.errors import FastpromptError

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "off")
AUTO_FRACTION = 0.25  # "auto": the decoded subset must fit in this fraction of the available memory
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
CacheSetting = Union[str, int]  # "auto", "off", or a budget in bytes


def parse_cache_setting(name: str, value: object) -> CacheSetting:
    """"auto", "off", or the budget in bytes of a size such as "8G", "512M", "1.5GiB", "2000000"
    (K, M, G, T: powers of 1024); FastpromptError naming `name` otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        if value.strip().lower() in CACHE_MODES:
            return value.strip().lower()
        match = _SIZE.match(value)
        if match is not None:
            size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if size > 0:
                return size
    raise FastpromptError(f"{name}={value!r} must be auto, off, or a memory size above 0 such as 8G or 512M")


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class CachePlan:
    """Whether a loader decodes its subset once (`use`), what that holds and why; `line()` is its log."""

    use: bool
    nbytes: int  # the decoded subset's bytes
    images: int
    reason: str  # "--decoded-cache off", "fits in ...", "exceeds ..."

    def line(self) -> str:
        if self.use:
            return (f"decoded once: {self.images} training images, {format_bytes(self.nbytes)} held in memory "
                    f"({self.reason}); every epoch crops from them")
        return f"decoding every epoch: {self.images} training images ({self.reason})"


def plan_cache(setting: CacheSetting, heights: np.ndarray, widths: np.ndarray) -> CachePlan:
    """The decision for a subset of stored images of `heights` x `widths` px under `setting`."""
    nbytes = int(np.sum(heights.astype(np.int64) * widths.astype(np.int64) * 3))
    images = len(heights)
    if setting == "off":
        return CachePlan(False, nbytes, images, "decoded_cache off")
    if setting == "auto":
        budget = int(available_memory() * AUTO_FRACTION)
        what = f"a quarter of the {format_bytes(int(budget / AUTO_FRACTION))} available"
    else:
        budget, what = int(setting), f"decoded_cache {format_bytes(int(setting))}"
    if nbytes <= budget:
        return CachePlan(True, nbytes, images, f"fits in {what}")
    return CachePlan(False, nbytes, images, f"the decoded {format_bytes(nbytes)} exceed {what}")


class DecodedImages:
    """Decoded stored images: row r is pixels[offsets[r]:offsets[r + 1]], an (heights[r], widths[r], 3)
    uint8 image; `row_of[s]` is the row of .beton sample s (-1: not held)."""

    def __init__(self, pixels: np.ndarray, offsets: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                 row_of: np.ndarray):
        self.pixels = pixels  # (sum H * W * 3,) uint8
        self.offsets = offsets  # (R + 1,) int64
        self.heights, self.widths = heights, widths  # (R,) int64 each
        self.row_of = row_of  # (N,) int64

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def image(self, sample: int) -> np.ndarray:
        r = int(self.row_of[sample])
        return self.pixels[self.offsets[r] : self.offsets[r + 1]].reshape(int(self.heights[r]), int(self.widths[r]), 3)


def _layout(metadata: np.ndarray, samples: np.ndarray, num_samples: int):
    heights = metadata["height"][samples].astype(np.int64)  # (R,)
    widths = metadata["width"][samples].astype(np.int64)  # (R,)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)  # (R + 1,)
    np.cumsum(heights * widths * 3, out=offsets[1:])
    row_of = np.full(num_samples, -1, dtype=np.int64)  # (N,)
    row_of[samples] = np.arange(len(samples))
    return heights, widths, offsets, row_of


def decode_once(metadata: np.ndarray, mm: np.ndarray, ptrs: np.ndarray, sizes: np.ndarray,
                samples: np.ndarray) -> DecodedImages:
    """The images of `samples` (.beton indices) decoded into one array, in this process.

    metadata: the image field's records (FFCV's metadata['f0']); mm, ptrs, sizes: the
    memory-mapped .beton and its sorted allocation table (FFCV's OS-cache state)."""
    from fastprompt.data.decoders import decode_rows

    samples = np.asarray(samples, dtype=np.int64)
    heights, widths, offsets, row_of = _layout(metadata, samples, len(metadata))
    pixels = np.empty(int(offsets[-1]), dtype=np.uint8)
    decode_rows(samples, np.arange(len(samples), dtype=np.int64), offsets, metadata, mm, ptrs, sizes, pixels)
    return DecodedImages(pixels, offsets, heights, widths, row_of)


def _shared_folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def decode_once_shared(metadata: np.ndarray, mm: np.ndarray, ptrs: np.ndarray, sizes: np.ndarray,
                       samples: np.ndarray) -> DecodedImages:
    """`decode_once` under torch.distributed: one copy per machine in shared memory, each local
    rank decoding every local_world-th image (module docstring). Every rank must call it."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    samples = np.asarray(samples, dtype=np.int64)
    heights, widths, offsets, row_of = _layout(metadata, samples, len(metadata))
    total = max(int(offsets[-1]), 1)
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)  # one name for every rank (each machine creates its own file)
    path = _shared_folder() / f"fastprompt-decoded-{token[0]}"
    created = local_rank == 0
    try:
        if created:
            with open(path, "wb") as f:
                f.truncate(total)  # sparse: pages are allocated as the ranks write them
        dist.barrier()
        pixels = np.memmap(path, dtype=np.uint8, mode="r+", shape=(total,))
        mine = np.arange(local_rank, len(samples), local_world, dtype=np.int64)  # this rank's shard (rows)
        from fastprompt.data.decoders import decode_rows

        decode_rows(samples[mine], mine, offsets, metadata, mm, ptrs, sizes, pixels)
        dist.barrier()  # every shard is decoded and every rank has mapped the file
    finally:
        if created:
            path.unlink(missing_ok=True)
    return DecodedImages(pixels[: int(offsets[-1])], offsets, heights, widths, row_of)
