"""FFCV loaders for a split of a `.beton`: few-shot / class subsets, CLIP preprocessing, exact resume.

Pipelines (one FFCV `Loader` with `indices=`, which is the subset to read):
- train: random resized crop to `image_size` (torchvision's parameters: scale (0.08, 1),
  ratio (3/4, 4/3), 10 tries then a centre crop) + horizontal flip with p = 0.5;
- eval: centre crop of `center_crop_ratio` x the shorter side, resized to `image_size`.
  The default ratio 1.0 is CLIP's and CoOp's eval preprocessing (resize the shorter side
  to 224, centre-crop 224); 224/256 gives the ImageNet-style crop.
Both decode the JPEG with libjpeg-turbo and resize bilinearly (OpenCV's default inside
FFCV's native `resize`; CLIP uses bicubic, a small difference). Images are normalised with
CLIP's mean/std into float32 (B, 3, S, S), contiguous: on CPU by the decode threads
themselves (a per-channel lookup table, fused with the HWC -> CHW transpose; doing it in
torch afterwards cost as much as decoding), on CUDA after the uint8 batch is copied to the
GPU (4x fewer bytes than float). FFCV's own `NormalizeImage` is not used: on CUDA it needs
cupy, which is not a dependency.

Determinism and resume. Epoch `e` of a loader is a pure function of (order_seed, e):
- Order (`EpochOrder`): the subset permuted by a numpy generator seeded with
  (order_seed, e), dealt out by rank under torch.distributed so that W ranks with batch
  B / W see the same global batches as one process with batch B. FFCV's own orders are
  not used: RANDOM seeds with `order_seed + e` (so seed s, epoch 1 repeats seed s + 1,
  epoch 0; ffcv/traversal_order/random.py) and its distributed mode (torch's
  DistributedSampler) gives global batches that depend on the world size.
- Augmentation: FFCV's own `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip`
  draw from numba's per-thread global RNG inside parallel loops, seeded from OS entropy
  and consumed in an order that depends on thread scheduling: they cannot be made
  deterministic per seed. fastprompt's decoders instead derive the crop and flip of
  sample i in epoch e from a counter-based hash (splitmix64) of (order_seed, e, i),
  independent of threads, batch composition, rank and world size.
So `loader.set_epoch(e)` before iterating reproduces epoch e exactly (same batches, same
pixels) in a fresh process and with any number of decode threads: a trainer resumes at an
epoch boundary. Across machines the crops and flips are the same (up to a last-bit libm
difference landing on a rounding boundary); the pixels are the same where libjpeg-turbo
and OpenCV are the same versions.

JIT. FFCV compiles its pipeline with numba for every `Loader`: about 10-15 s per loader on
2 CPU cores for its stock decoders. fastprompt's decode kernels are module-level numba
functions with `cache=True` that call FFCV's native decode/resize through symbols
registered with LLVM (not ctypes pointers, which numba refuses to cache), so they compile
once per machine and later loaders only compile a trivial wrapper.
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

import ffcv._libffcv
from ffcv.loader import Loader, OrderOption
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline import Compiler, PipelineSpec
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor

from fastprompt.errors import FastpromptError
from fastprompt.runtime import available_cores, resolve_device, resolve_workers
from fastprompt.validation import is_int
from fastprompt.data.splits import relabel_table

if TYPE_CHECKING:
    from fastprompt.data.beton import BetonDataset

logger = logging.getLogger(__name__)

# CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN / OPENAI_DATASET_STD; a test
# checks they stay equal). Copied so that importing the data layer does not import open_clip.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------
# FFCV's native JPEG decode and resize, callable from cached numba code.
# ffcv/libffcv.py binds them with ctypes; numba embeds a ctypes pointer's address in the
# machine code and so refuses to cache it. Registered under our own symbol names instead,
# the cached code links against them by name in every process.

_LIB = ctypes.CDLL(ffcv._libffcv.__file__)
llvm.add_symbol("fastprompt_ffcv_imdecode", ctypes.cast(_LIB.imdecode, ctypes.c_void_p).value)
llvm.add_symbol("fastprompt_ffcv_resize", ctypes.cast(_LIB.resize, ctypes.c_void_p).value)
# int imdecode(uint8* src, uint64 src_size, uint32 h, uint32 w, uint8* dst, uint32 crop_h, uint32 crop_w,
#              uint32 off_x, uint32 off_y, uint32 scale_num, uint32 scale_denom, bool crop, bool flip)
# (pointers passed as 64-bit integers, bools as 32-bit zeros: the same registers under the x86-64 and
# aarch64 C ABIs; crop and flip are always off here).
_imdecode = types.ExternalFunction(
    "fastprompt_ffcv_imdecode",
    types.int32(types.int64, types.uint64, types.uint32, types.uint32, types.int64, types.uint32, types.uint32,
                types.uint32, types.uint32, types.uint32, types.uint32, types.int32, types.int32),
)
# void resize(int64 unused, uint8* src, int64 rows, int64 cols, int64 row0, int64 row1, int64 col0, int64 col1,
#             uint8* dst, int64 dst_rows, int64 dst_cols): cv::resize (bilinear) of src[row0:row1, col0:col1]
_resize = types.ExternalFunction("fastprompt_ffcv_resize", types.void(*([types.int64] * 11)))

_JPEG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES['jpg']
_CHUNKS_PER_THREAD = 4  # work items per decode thread and batch (see BetonLoader)


def _single_threaded_opencv() -> None:
    """Make the OpenCV that libffcv links against run each call on the calling thread.

    FFCV's native `resize` is cv::resize, which splits its work over OpenCV's own thread
    pool; called from FFCV's decode threads (one per core) that oversubscribes the cores.
    The decode threads are the parallelism, so OpenCV's pool is set to 1 thread (the
    standard advice for OpenCV in data loaders). Only this process's system OpenCV is
    touched, found by its path in /proc/self/maps (pip's cv2 is a separate copy).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libopencv_core.so" in line})
    except OSError:
        paths = []
    done = False
    for path in paths:
        setter = getattr(ctypes.CDLL(path), "_ZN2cv13setNumThreadsEi", None)  # cv::setNumThreads(int)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setter(1)
            done = True
    if not done:
        logger.warning("could not limit OpenCV's thread pool (no libopencv_core in this process's maps); "
                       "FFCV's resize may oversubscribe the cores")


_single_threaded_opencv()


def _os_cache_compile_reader(self):
    """FFCV's `OSCacheManager.compile_reader`, without corrupting numba's type tables.

    FFCV 1.0.2 builds the reader's signature with `t1 = numba.uint8[::1]; t1.mutable = False`,
    which mutates numba's interned `Array(uint8, 1, 'C')` instance: every dict keyed by that
    type (numba's compiled-overload tables) is corrupted from then on, and the next compile
    of any function taking a uint8 array fails with a KeyError (or a finaliser prints one).
    Same reader, typed on first use instead (fastprompt's kernels do not call it; stock
    FFCV decoders still can). Compiling lazily also saves ~0.5 s per Loader.
    """

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address : address + size]

    return Compiler.compile(read)


OSCacheManager.compile_reader = _os_cache_compile_reader  # the one patch of FFCV; see above


@intrinsic
def _load_u64(typingctx, address):
    """Read the uint64 at an integer address: lets compiled code see a value set from Python later."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(pointer, "monotonic", 8)

    return types.uint64(address), codegen


# ----------------------------------------------------------------------------------------
# Counter-based random numbers: uniform k of sample i in an epoch with key K is a pure
# function of (K, i, k). splitmix64's finaliser (Steele, Lea, Flood 2014) as the hash.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_FLIP_COUNTER = 64  # counters 0..39 serve the 10 crop attempts


def _mix64_py(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def augment_key(order_seed: int, epoch: int) -> int:
    """The 64-bit key of epoch `epoch` of a loader seeded with `order_seed`."""
    golden = int(_GOLDEN)
    return _mix64_py(_mix64_py(order_seed * golden + 1) ^ ((epoch + 1) * golden))


@numba.njit(cache=True, nogil=True)
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _uniform(state, counter):
    """Uniform in [0, 1) with 53 random bits."""
    bits = _mix64(state + np.uint64(counter + 1) * _GOLDEN)
    return np.float64(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True)
def _random_crop(state, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """torchvision's RandomResizedCrop.get_params on the hashed stream: (row, col, h, w)."""
    area = height * width
    for attempt in range(10):
        c = 4 * attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * _uniform(state, c))
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * _uniform(state, c + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(_uniform(state, c + 2) * (height - h + 1))
            j = int(_uniform(state, c + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height  # fallback: the largest centred crop with an allowed aspect ratio
    if in_ratio < math.exp(log_ratio_lo):
        w = width
        h = int(round(w / math.exp(log_ratio_lo)))
    elif in_ratio > math.exp(log_ratio_hi):
        h = height
        w = int(round(h * math.exp(log_ratio_hi)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(cache=True, nogil=True)
def _decode_to(record, mm, ptrs, sizes, scratch):
    """Decode one stored image into `scratch`; returns it as an (H, W, 3) view."""
    height = np.int64(record["height"])
    width = np.int64(record["width"])
    ptr = record["data_ptr"]
    size = sizes[np.searchsorted(ptrs, ptr)]  # the allocation that starts at ptr
    start = np.int64(ptr)
    data = mm[start : start + np.int64(size)]
    n = height * width * 3
    if record["mode"] == _JPEG_MODE:
        _imdecode(data.ctypes.data, np.uint64(size), np.uint32(height), np.uint32(width), scratch.ctypes.data,
                  np.uint32(height), np.uint32(width), np.uint32(0), np.uint32(0), np.uint32(1), np.uint32(1),
                  np.int32(0), np.int32(0))
    else:  # raw pixels
        scratch[:n] = data[:n]
    return scratch[:n].reshape(height, width, 3)  # (H, W, 3)


@numba.njit(cache=True, nogil=True)
def _resize_crop(image, i, j, h, w, out):
    """out (S, S, 3) <- image[i:i+h, j:j+w] resized bilinearly."""
    _resize(0, image.ctypes.data, image.shape[0], image.shape[1], i, i + h, j, j + w,
            out.ctypes.data, out.shape[0], out.shape[1])


@numba.njit(cache=True, nogil=True)
def _flip_in_place(out):
    """Mirror an (H, W, 3) image left-right."""
    rows, cols = out.shape[0], out.shape[1]
    for y in range(rows):
        for x in range(cols // 2):
            x2 = cols - 1 - x
            for ch in range(3):
                t = out[y, x, ch]
                out[y, x, ch] = out[y, x2, ch]
                out[y, x2, ch] = t


@numba.njit(cache=True, nogil=True)
def _normalise_chw(image, lut, out):
    """out (3, S, S) float32 <- lut[c, image (S, S, 3) uint8]: CLIP normalisation and NCHW in one pass."""
    rows, cols = image.shape[0], image.shape[1]
    for c in range(3):
        for y in range(rows):
            for x in range(cols):
                out[c, y, x] = lut[c, image[y, x, c]]


@numba.njit(cache=True, nogil=True, parallel=True)
def _decode_random_resized_crop(batch_indices, out, scratch, lut, normalise, chunks, metadata, mm, ptrs, sizes,
                                key_address, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob):
    """Train decoder: out[k] (S, S, 3) = flip?(resize(crop(image of sample batch_indices[k]))).

    Returns, with `normalise`, a new (B, 3, S, S) float32 array of the normalised images
    (new memory: the caller owns the batch, no copy out of FFCV's reused buffers), else an
    empty one. Work is split in `chunks` interleaved chunks (a few per decode thread): chunk
    c takes samples c, c + chunks, ... and reuses row c of the intermediates, which stays in
    cache (a row per sample would stream ~0.4 MB per image through memory).
    """
    key = _load_u64(key_address)  # this epoch's key, set from Python before the epoch starts
    n = len(batch_indices)
    size = out.shape[1]
    out_f = np.empty((n if normalise else 0, 3, size, size), dtype=np.float32)  # (B, 3, S, S)
    chunks = max(1, min(chunks, n))
    for c in prange(chunks):
        for k in range(c, n, chunks):
            sample = batch_indices[k]
            state = _mix64(key + (np.uint64(sample) + np.uint64(1)) * _GOLDEN)  # this sample's stream
            image = _decode_to(metadata[sample], mm, ptrs, sizes, scratch[c])  # (H, W, 3)
            i, j, h, w = _random_crop(state, image.shape[0], image.shape[1], scale_lo, scale_hi, log_ratio_lo, log_ratio_hi)
            resized = out[c] if normalise else out[k]  # (S, S, 3): an intermediate, or the output
            _resize_crop(image, i, j, h, w, resized)
            if _uniform(state, _FLIP_COUNTER) < flip_prob:
                _flip_in_place(resized)
            if normalise:
                _normalise_chw(resized, lut, out_f[k])
    return out_f


@numba.njit(cache=True, nogil=True, parallel=True)
def _decode_center_crop(batch_indices, out, scratch, lut, normalise, chunks, metadata, mm, ptrs, sizes, ratio):
    """Eval decoder: out[k] (S, S, 3) = resize(central square of `ratio` x the shorter side).

    Returns the normalised batch like `_decode_random_resized_crop`.
    """
    n = len(batch_indices)
    size = out.shape[1]
    out_f = np.empty((n if normalise else 0, 3, size, size), dtype=np.float32)  # (B, 3, S, S)
    chunks = max(1, min(chunks, n))
    for c in prange(chunks):
        for k in range(c, n, chunks):
            sample = batch_indices[k]
            image = _decode_to(metadata[sample], mm, ptrs, sizes, scratch[c])  # (H, W, 3)
            height, width = image.shape[0], image.shape[1]
            side = max(1, int(ratio * min(height, width)))
            resized = out[c] if normalise else out[k]  # (S, S, 3): an intermediate, or the output
            _resize_crop(image, (height - side) // 2, (width - side) // 2, side, side, resized)
            if normalise:
                _normalise_chw(resized, lut, out_f[k])
    return out_f


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level per channel."""
    levels = np.arange(256, dtype=np.float64)  # (256,)
    table = (levels[None, :] - 255.0 * np.asarray(mean)[:, None]) / (255.0 * np.asarray(std)[:, None])  # (3, 256)
    return np.ascontiguousarray(table, dtype=np.float32)


class _CropDecoder(Operation):
    """FFCV decoder for an RGBImageField: our cached kernels behind FFCV's Operation API.

    With a normalisation table (CPU delivery) the decoder outputs float32 (3, S, S)
    normalised images, computed in the decode threads into memory the caller then owns;
    without (CUDA delivery) uint8 (S, S, 3) in FFCV's buffers, which ToDevice copies to the
    GPU (4x fewer bytes than float) to be normalised there.
    """

    def __init__(self, image_size: int, lut: Optional[np.ndarray], chunks: int):
        super().__init__()
        self.image_size = image_size
        self.lut = lut  # (3, 256) float32 or None
        self.chunks = chunks  # the kernels split a batch in this many interleaved chunks

    def declare_state_and_memory(self, previous_state: State):
        max_pixels = int(self.metadata["height"].astype(np.int64).max()) * int(self.metadata["width"].astype(np.int64).max())
        size = self.image_size
        u8 = np.dtype("<u1")
        if self.lut is not None:
            state = replace(previous_state, jit_mode=True, shape=(3, size, size), dtype=np.dtype("<f4"))
        else:
            state = replace(previous_state, jit_mode=True, shape=(size, size, 3), dtype=u8)
        return state, (
            AllocationQuery((size, size, 3), u8),  # resized image
            AllocationQuery((max_pixels * 3,), u8),  # decoded full image
        )

    def _table(self) -> np.ndarray:
        return self.lut if self.lut is not None else np.zeros((3, 256), dtype=np.float32)


class SeededRandomResizedCrop(_CropDecoder):
    """Random resized crop + horizontal flip whose randomness is a function of (key, sample index).

    `set_key` before an epoch (the compiled code reads the key from this object's buffer
    at every batch, so no recompilation is needed).
    """

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float], flip_prob: float,
                 lut: Optional[np.ndarray] = None, chunks: int = 1):
        super().__init__(image_size, lut, chunks)
        self.scale, self.ratio, self.flip_prob = scale, ratio, flip_prob
        self._key = np.zeros(1, dtype=np.uint64)  # read by the compiled decoder through its address

    def set_key(self, key: int) -> None:
        self._key[0] = np.uint64(key)

    def generate_code(self):
        # FFCV compiles the returned function once per Loader: it only unpacks FFCV's buffers and
        # calls the cached kernel. np.uint64(address), np.int64(chunks): plain integers, not
        # Literal[int]s, or the cached kernel would be specialised (and recompiled) for every value.
        kernel, lut, address = _decode_random_resized_crop, self._table(), int(self._key.ctypes.data)
        chunks = int(self.chunks)
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        flip_prob = float(self.flip_prob)
        if self.lut is not None:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                return kernel(batch_indices, out, scratch, lut, True, np.int64(chunks), metadata, mm, ptrs, sizes,
                              np.uint64(address), scale_lo, scale_hi, log_lo, log_hi, flip_prob)  # (B, 3, S, S) f32
        else:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                kernel(batch_indices, out, scratch, lut, False, np.int64(chunks), metadata, mm, ptrs, sizes,
                       np.uint64(address), scale_lo, scale_hi, log_lo, log_hi, flip_prob)
                return out[: len(batch_indices)]  # (B, S, S, 3) uint8
        return decode


class CenterCrop(_CropDecoder):
    """Central square of `ratio` x the shorter side, resized to image_size."""

    def __init__(self, image_size: int, ratio: float, lut: Optional[np.ndarray] = None, chunks: int = 1):
        super().__init__(image_size, lut, chunks)
        self.ratio = ratio

    def generate_code(self):
        kernel, lut, ratio, chunks = _decode_center_crop, self._table(), float(self.ratio), int(self.chunks)
        if self.lut is not None:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                return kernel(batch_indices, out, scratch, lut, True, np.int64(chunks), metadata, mm, ptrs, sizes, ratio)  # (B, 3, S, S)
        else:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                kernel(batch_indices, out, scratch, lut, False, np.int64(chunks), metadata, mm, ptrs, sizes, ratio)
                return out[: len(batch_indices)]  # (B, S, S, 3) uint8
        return decode


class SampleIndex(Operation):
    """Decoder for any field that outputs the sample's index in the .beton (labels come from a table)."""

    def declare_state_and_memory(self, previous_state: State):
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=np.dtype("<i8")), AllocationQuery((1,), np.dtype("<i8"))

    def generate_code(self):
        def decode(batch_indices, out, metadata, storage_state):
            for k in range(len(batch_indices)):
                out[k, 0] = batch_indices[k]
            return out[: len(batch_indices)]

        return decode


# ----------------------------------------------------------------------------------------
# The loader


@dataclass(frozen=True)
class LoaderConfig:
    """How a split is loaded; `BetonDataset.loader(split, **fields)` builds one."""

    train: Optional[bool] = None  # augment (random resized crop + flip); None = (split == "train")
    image_size: int = 224  # side of the square output images, px
    batch_size: int = 32
    device: Union[str, torch.device] = "cpu"  # where batches are delivered
    num_workers: Optional[int] = None  # FFCV decode threads; None = available cores (clamped to them)
    drop_last: Optional[bool] = None  # None = train and the subset fills at least one batch (Dassl's rule)
    shuffle: Optional[bool] = None  # None = train
    order_seed: int = 0  # epoch e's order and augmentation are functions of (order_seed, e)
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean of [0, 1] pixels
    std: tuple[float, float, float] = CLIP_STD
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range
    flip_prob: float = 0.5
    center_crop_ratio: float = 1.0  # eval crop side / shorter image side (CLIP: 1.0; ImageNet-style: 224/256)
    batches_ahead: int = 3  # batches FFCV prepares ahead
    return_indices: bool = False  # also yield the (B,) .beton indices of the batch

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "batches_ahead"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise FastpromptError(f"{name}={v!r} must be a positive integer")
        if not is_int(self.order_seed) or self.order_seed < 0:
            raise FastpromptError(f"order_seed={self.order_seed!r} must be a non-negative integer")
        resolve_workers(self.num_workers, "num_workers")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise FastpromptError(f"mean={self.mean!r} and std={self.std!r} need 3 values each, std > 0")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise FastpromptError(f"crop_scale={self.crop_scale!r} must satisfy 0 < low <= high <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise FastpromptError(f"crop_ratio={self.crop_ratio!r} must satisfy 0 < low <= high")
        if not 0 <= self.flip_prob <= 1:
            raise FastpromptError(f"flip_prob={self.flip_prob!r} must be in [0, 1]")
        if not 0 < self.center_crop_ratio <= 1:
            raise FastpromptError(f"center_crop_ratio={self.center_crop_ratio!r} must be in (0, 1]")


def _next_batch(epoch_iter, poll_s: float = 1.0):
    """FFCV's `EpochIterator.__next__`, but failing instead of hanging when its thread dies.

    FFCV's iterator blocks on its output queue forever if the background thread that runs
    the pipeline raises (the exception is only printed). This waits in slices and checks
    that the thread is alive; the rest is what `__next__` does (end marker, CUDA stream wait).
    """
    while True:
        try:
            item = epoch_iter.output_queue.get(timeout=poll_s)
            break
        except queue.Empty:
            if not epoch_iter.is_alive() and epoch_iter.output_queue.empty():
                raise RuntimeError("FFCV's loader thread failed (its traceback is printed above)") from None
    if item is None:
        epoch_iter.close()
        raise StopIteration
    slot, result = item
    if epoch_iter.cuda_streams[slot] is not None:
        epoch_iter.current_stream.wait_stream(epoch_iter.cuda_streams[slot])  # the batch's copies are done
    return result


_ORDER_STREAM = 7  # seed-sequence tag of the epoch order (the augmentation key uses its own hash)


class EpochOrder:
    """The samples of epoch e on this rank: a pure function of (order_seed, e, rank, world size).

    Installed as the FFCV Loader's traversal order (FFCV 1.0.2's `Loader` cannot be given a
    custom order class: its `isinstance(order, TraversalOrder)` branch then calls the
    instance), it replaces FFCV's RANDOM / SEQUENTIAL orders and its distributed mode.
    - Shuffled (training): the subset permuted by a generator seeded with
      (order_seed, e); for W ranks, padded with its first entries to a multiple of W and
      dealt out, rank r taking positions r, r + W, ... With a per-rank batch of B / W, the
      ranks' k-th batches together are exactly the one-process k-th batch of size B, so
      training on W ranks sees the same global batches as on one. (FFCV's distributed mode,
      torch's DistributedSampler, permutes with torch's generator and deals contiguous
      blocks: its global batches depend on the world size.)
    - In order (evaluation): the subset dealt out the same way without padding, so each
      sample is seen exactly once over all ranks (shards differ by at most one sample).
    """

    def __init__(self, indices: np.ndarray, order_seed: int, shuffle: bool, rank: int, world: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.order_seed, self.shuffle, self.rank, self.world = order_seed, shuffle, rank, world

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_ORDER_STREAM, self.order_seed, epoch])))
            order = rng.permutation(order)
            pad = (-len(order)) % self.world
            if pad:
                order = np.concatenate([order, order[:pad]])
        return order[self.rank :: self.world]


class BetonLoader:
    """Batches of one split of a `.beton`: iterate for (images, labels) [, indices].

    images: float32 (B, 3, S, S), contiguous, normalised, on `device`;
    labels: int64 (B,), relabelled 0..K'-1 for the class subset, on `device`;
    indices (with return_indices): int64 (B,) positions in the .beton, on the CPU.
    Each `iter()` is one epoch; `set_epoch(e)` chooses which (see the module docstring).
    """

    def __init__(self, dataset: "BetonDataset", indices: np.ndarray, split: str, classes: str, config: LoaderConfig):
        if len(indices) == 0:
            raise FastpromptError(f"split {split!r} of {dataset.path} has no samples for classes={classes!r}; choose another split")
        train = config.train if config.train is not None else split == "train"
        shuffle = config.shuffle if config.shuffle is not None else train
        drop_last = config.drop_last if config.drop_last is not None else train and len(indices) >= config.batch_size
        if drop_last and len(indices) < config.batch_size:
            raise FastpromptError(
                f"drop_last=True with batch_size={config.batch_size} but the subset has only {len(indices)} samples "
                "(no batch would remain); lower batch_size or pass drop_last=False"
            )
        self.dataset, self.split, self.classes, self.config = dataset, split, classes, config
        self.train, self.shuffle, self.drop_last = train, shuffle, drop_last
        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = resolve_device(config.device)
        self.num_workers = resolve_workers(config.num_workers, "num_workers")
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world_size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if self.distributed else (0, 1)
        )
        kept = dataset.class_subset(classes)
        self.classnames = [dataset.classnames[c] for c in kept]
        self._sample_label = torch.from_numpy(relabel_table(dataset.num_classes, kept)[dataset.labels])  # (N,) int64
        on_gpu = self.device.type == "cuda"
        # CPU: the decode threads normalise into float32 (B, 3, S, S) through a lookup table.
        # CUDA: uint8 (B, S, S, 3) crosses to the GPU (4x fewer bytes) and is normalised there.
        lut = None if on_gpu else normalisation_table(config.mean, config.std)  # (3, 256)
        if on_gpu:
            mean = torch.tensor(config.mean, dtype=torch.float32, device=self.device) * 255.0  # (3,)
            std = torch.tensor(config.std, dtype=torch.float32, device=self.device) * 255.0  # (3,)
            self._shift = mean.view(1, 3, 1, 1)  # (1, 3, 1, 1)
            self._scale = (1.0 / std).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        # A few chunks per decode thread: a batch waits for its slowest chunk, so small chunks keep a
        # thread that the OS preempts from stalling the batch; each chunk still reuses its buffers.
        chunks = _CHUNKS_PER_THREAD * self.num_workers
        if train:
            self._decoder: _CropDecoder = SeededRandomResizedCrop(
                config.image_size, config.crop_scale, config.crop_ratio, config.flip_prob, lut, chunks
            )
        else:
            self._decoder = CenterCrop(config.image_size, config.center_crop_ratio, lut, chunks)
        image_ops = [ToTensor()]
        if on_gpu:
            image_ops.append(ToDevice(self.device, non_blocking=True))
        # Explicit PipelineSpecs: a decoder in a plain list must be an instance of the field's
        # default decoder class, else FFCV silently inserts the default one in front of it.
        pipelines = {
            "image": PipelineSpec("image", decoder=self._decoder, transforms=image_ops),
            "label": PipelineSpec("label", decoder=SampleIndex(), transforms=[ToTensor()]),
            "split": None,
        }
        torch_threads = torch.get_num_threads()  # FFCV sets torch's thread count to num_workers; keep the caller's
        try:
            self._ffcv = Loader(
                str(dataset.path),
                batch_size=config.batch_size,
                num_workers=self.num_workers,
                os_cache=True,  # our kernels read through the OS page cache (memory-mapped file)
                order=OrderOption.SEQUENTIAL,  # replaced by EpochOrder below
                distributed=False,  # EpochOrder shards by rank
                seed=config.order_seed,
                indices=self.indices,
                pipelines=pipelines,
                drop_last=drop_last,
                batches_ahead=config.batches_ahead,
            )
        finally:
            torch.set_num_threads(torch_threads)
        self._order = EpochOrder(self.indices, config.order_seed, shuffle, self.rank, self.world_size)
        self._ffcv.traversal_order = self._order  # FFCV's Loader asks it for each epoch's samples
        self._ffcv.first_traversal_order = self._order.sample_order(0)  # what FFCV's len() counts
        logger.info(
            "%s loader: %d samples of %s (classes=%s), %s pipeline at %d px, batch %d, %d workers%s",
            split, len(self.indices), dataset.path, classes, "train" if train else "eval", config.image_size,
            config.batch_size, self.num_workers, f", rank {self.rank} of {self.world_size}" if self.distributed else "",
        )

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return int(self._ffcv.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch `epoch` (order and augmentation), e.g. to resume."""
        if not is_int(epoch) or epoch < 0:
            raise FastpromptError(f"epoch={epoch!r} must be a non-negative integer")
        self._ffcv.next_epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in the subset (over all ranks)."""
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return len(self._ffcv)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """FFCV's batch -> a float32 (B, 3, S, S) normalised tensor the caller owns."""
        if images.dtype == torch.float32:  # CPU: normalised by the decoder into new memory
            return images  # (B, 3, S, S)
        x = images.permute(0, 3, 1, 2)  # (B, 3, S, S) uint8 on the GPU, a view of (B, S, S, 3)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, 3, S, S) contiguous
        out.copy_(x)
        return out.sub_(self._shift).mul_(self._scale)  # (B, 3, S, S) normalised

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if isinstance(self._decoder, SeededRandomResizedCrop):
            self._decoder.set_key(augment_key(self.config.order_seed, self.epoch))
        torch_threads = torch.get_num_threads()
        epoch_iter = iter(self._ffcv)  # starts FFCV's background thread for this epoch
        torch.set_num_threads(torch_threads)
        try:
            while True:
                try:
                    images, index = _next_batch(epoch_iter)  # images (B, 3, S, S) f32 / (B, S, S, 3) u8 on CUDA; index (B, 1)
                except StopIteration:
                    return
                sample = index[:, 0].clone()  # (B,)
                labels = self._sample_label[sample].to(self.device, non_blocking=True)  # (B,)
                batch = (self._finish(images), labels)
                yield (*batch, sample) if self.config.return_indices else batch
        finally:
            epoch_iter.close()


def make_loader(dataset: "BetonDataset", indices: np.ndarray, split: str, classes: str, config: LoaderConfig) -> BetonLoader:
    return BetonLoader(dataset, indices, split, classes, config)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BetonLoader",
    "LoaderConfig",
    "SeededRandomResizedCrop",
    "CenterCrop",
    "SampleIndex",
    "augment_key",
    "available_cores",
]
