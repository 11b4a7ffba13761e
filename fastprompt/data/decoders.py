"""FFCV decoders for a `.beton`'s fields: fastprompt's own image decoders (cached numba
kernels) and the sample-index decoder that labels are looked up with.

- `SeededRandomResizedCrop` (train): torchvision's RandomResizedCrop parameters (scale
  (0.08, 1), ratio (3/4, 4/3), 10 tries then a centre crop) + horizontal flip, whose
  randomness for sample i of an epoch is a counter-based hash (splitmix64) of (key, i):
  independent of threads, batch composition, rank and world size. FFCV's own
  `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip` draw from numba's per-thread
  global RNG inside parallel loops and cannot be made deterministic per seed.
- `CenterCrop` (eval): CLIP's eval geometry (torchvision's `Resize(S / ratio)` then
  `CenterCrop(S)` rounding, `fastprompt.data.pixels`); an image stored evaluation-ready
  (exactly S x S) is passed through untouched.
- `SampleIndex`: the sample's `.beton` index (labels come from a table).
Both image decoders decode the JPEG with libjpeg-turbo (FFCV's native `imdecode`; raw images
are copied), resize with PIL's antialiased bicubic filter (`fastprompt.data.resample`, as
Dassl's and CLIP's transforms do on PIL images), and optionally normalise into float32
(3, S, S) in the decode threads through a per-channel lookup table (`normalisation_table`).

JIT. The decode kernels are module-level numba functions with `cache=True` that call FFCV's
native decode through a symbol registered with LLVM (not ctypes pointers, which numba
refuses to cache), so they compile once per machine; FFCV calls them through Python
wrappers that it does not compile (`ffcv_compat`, workaround 4). The symbols are registered
by `fastprompt.data.ffcv_compat.apply_ffcv_compat()`, which must run before a kernel is first
called (`BetonLoader` calls it when it is built).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from fastprompt.data.ffcv_compat import IMDECODE_SYMBOL, import_ffcv, mark_host_code

import_ffcv()  # before the first FFCV import (ffcv_compat, workaround 0)
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from fastprompt.data.pixels import normalisation_table  # noqa: F401  (the decoders' table; pipelines imports it here)
from fastprompt.data.resample import _ZERO, resample, resample_normalised

# ----------------------------------------------------------------------------------------
# FFCV's native JPEG decode, by symbol name (see fastprompt.data.ffcv_compat).
# int imdecode(uint8* src, uint64 src_size, uint32 h, uint32 w, uint8* dst, uint32 crop_h, uint32 crop_w,
#              uint32 off_x, uint32 off_y, uint32 scale_num, uint32 scale_denom, bool crop, bool flip)
# (pointers passed as 64-bit integers, bools as 32-bit zeros: the same registers under the x86-64 and
# aarch64 C ABIs; crop and flip are always off here).
_imdecode = types.ExternalFunction(
    IMDECODE_SYMBOL,
    types.int32(types.int64, types.uint64, types.uint32, types.uint32, types.int64, types.uint32, types.uint32,
                types.uint32, types.uint32, types.uint32, types.uint32, types.int32, types.int32),
)

_JPEG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES['jpg']


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
# Typed constants for the numba calls below (and `_ZERO`, resample's typed 0): a literal 64, 0 or False
# argument compiles a specialisation of its own (numba types it Literal[int](0)), so the random crop, the
# centre crop and the resize's own passes each compiled the resize family again (cold, in a fresh install's
# first processes).
_FLIP_COUNTER = np.int64(64)  # counters 0..39 serve the 10 crop attempts
_NO_FLIP = np.bool_(False)


def _mix64_py(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _contiguous(batch_indices: np.ndarray) -> np.ndarray:
    """The batch's indices as the kernels' one specialisation takes them: C-contiguous int64 (a
    strided view, as a distributed loader's shard was, compiled the kernel again for numba's 'A' layout)."""
    return np.ascontiguousarray(batch_indices, dtype=np.int64)  # (B,)


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
    """out (S, S, 3) <- image[i:i+h, j:j+w] resized with PIL's bicubic (Dassl's RandomResizedCrop)."""
    resample(image, i, h, out.shape[0], _ZERO, j, w, out.shape[1], _ZERO, out)


@numba.njit(cache=True, nogil=True)
def _center_offset(side, crop):
    """torchvision's `int(round((side - crop) / 2.0))` (Python rounds halves to even)."""
    d = side - crop
    half = d // 2
    if d % 2 == 1 and half % 2 == 1:
        half += 1
    return half


@numba.njit(cache=True, nogil=True)
def _resize_center_crop(image, short, out):
    """out (S, S, 3) <- CenterCrop(S)(Resize(short, BICUBIC)(image)) in torchvision's geometry."""
    height, width = image.shape[0], image.shape[1]
    size = out.shape[0]
    if width <= height:
        new_h, new_w = int(short * height / width), short
    else:
        new_h, new_w = short, int(short * width / height)
    resample(image, _ZERO, height, new_h, _center_offset(new_h, size), _ZERO, width, new_w, _center_offset(new_w, size),
             out)


@numba.njit(cache=True, nogil=True)
def _resize_center_crop_normalised(image, short, lut, out_f):
    """out_f (3, S, S) float32 <- lut[c, `_resize_center_crop` of image] (the last pass writes it)."""
    height, width = image.shape[0], image.shape[1]
    size = out_f.shape[1]
    if width <= height:
        new_h, new_w = int(short * height / width), short
    else:
        new_h, new_w = short, int(short * width / height)
    resample_normalised(image, _ZERO, height, new_h, _center_offset(new_h, size), _ZERO, width, new_w,
                        _center_offset(new_w, size), _NO_FLIP, lut, out_f)


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


@numba.njit(cache=True, nogil=True)
def _augment(image, state, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob, resized, normalise, lut, out_f, k):
    """The random resized crop and flip of one sample, drawn from its stream `state`:
    out_f[k] (3, S, S) float32 normalised with `normalise`, else resized (S, S, 3) uint8. Both
    training paths (decode every epoch, or read the decoded cache) call this one function, so
    their pixels are the same bit for bit."""
    i, j, h, w = _random_crop(state, image.shape[0], image.shape[1], scale_lo, scale_hi, log_ratio_lo, log_ratio_hi)
    flip = _uniform(state, _FLIP_COUNTER) < flip_prob
    size_h, size_w = resized.shape[0], resized.shape[1]
    if normalise:  # flip and normalisation in the resize's last pass (fastprompt.data.resample)
        resample_normalised(image, i, h, size_h, _ZERO, j, w, size_w, _ZERO, flip, lut, out_f[k])
    else:
        _resize_crop(image, i, j, h, w, resized)
        if flip:
            _flip_in_place(resized)


@numba.njit(cache=True, nogil=True, parallel=True)
def _decode_random_resized_crop(batch_indices, out, scratch, lut, normalise, chunks, metadata, mm, ptrs, sizes,
                                key_address, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob):
    """Train decoder: out[k] (S, S, 3) = flip?(resize(crop(image of sample batch_indices[k]))).

    Returns, with `normalise`, a new (B, 3, S, S) float32 array of the normalised images
    (new memory: the caller owns the batch, no copy out of FFCV's reused buffers), else an
    empty one. Work is split in `chunks` interleaved chunks (a few per decode thread): chunk
    c takes samples c, c + chunks, ... and decodes into row c of `scratch`, which stays in
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
            resized = out[c] if normalise else out[k]  # (S, S, 3): unused, or the output
            _augment(image, state, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob, resized, normalise, lut,
                     out_f, k)
    return out_f


@numba.njit(cache=True, nogil=True, parallel=True)
def _crop_decoded(batch_indices, out, lut, normalise, chunks, row_of, pixels, offsets, heights, widths,
                  key_address, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob):
    """`_decode_random_resized_crop` reading the decoded cache (`fastprompt.data.decoded`)
    instead of decoding: sample s is row r = row_of[s], pixels[offsets[r]:offsets[r + 1]] an
    (heights[r], widths[r], 3) image. Same streams, same `_augment`, same output."""
    key = _load_u64(key_address)
    n = len(batch_indices)
    size = out.shape[1]
    out_f = np.empty((n if normalise else 0, 3, size, size), dtype=np.float32)  # (B, 3, S, S)
    chunks = max(1, min(chunks, n))
    for c in prange(chunks):
        for k in range(c, n, chunks):
            sample = batch_indices[k]
            state = _mix64(key + (np.uint64(sample) + np.uint64(1)) * _GOLDEN)  # this sample's stream
            r = row_of[sample]
            image = pixels[offsets[r] : offsets[r + 1]].reshape(heights[r], widths[r], 3)  # (H, W, 3)
            resized = out[c] if normalise else out[k]  # (S, S, 3): unused, or the output
            _augment(image, state, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob, resized, normalise, lut,
                     out_f, k)
    return out_f


@numba.njit(cache=True, nogil=True, parallel=True)
def decode_rows(samples, rows, offsets, metadata, mm, ptrs, sizes, pixels):
    """pixels[offsets[r]:offsets[r + 1]] <- the decoded image of samples[k], r = rows[k], for
    every k (in parallel): what `_decode_to` gives the per-epoch path, decoded in place."""
    for k in prange(len(samples)):
        r = rows[k]
        _decode_to(metadata[samples[k]], mm, ptrs, sizes, pixels[offsets[r] : offsets[r + 1]])


@numba.njit(cache=True, nogil=True, parallel=True)
def _decode_center_crop(batch_indices, out, scratch, lut, normalise, chunks, metadata, mm, ptrs, sizes, short):
    """Eval decoder: out[k] (S, S, 3) = CenterCrop(S)(Resize(short)(image)); an image of exactly
    S x S with short == S (stored evaluation-ready) is used as decoded.

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
            ready = image.shape[0] == size and image.shape[1] == size and short == size
            if ready and normalise:
                _normalise_chw(image, lut, out_f[k])
            elif ready:
                out[k] = image
            elif normalise:
                _resize_center_crop_normalised(image, short, lut, out_f[k])
            else:
                _resize_center_crop(image, short, out[k])
    return out_f


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

    def _scratch_bytes(self) -> int:
        """Bytes of the per-chunk buffer a stored image is decoded into: the largest image."""
        return int(self.metadata["height"].astype(np.int64).max()) * int(self.metadata["width"].astype(np.int64).max()) * 3

    def declare_state_and_memory(self, previous_state: State):
        size = self.image_size
        u8 = np.dtype("<u1")
        if self.lut is not None:
            state = replace(previous_state, jit_mode=True, shape=(3, size, size), dtype=np.dtype("<f4"))
        else:
            state = replace(previous_state, jit_mode=True, shape=(size, size, 3), dtype=u8)
        return state, (
            AllocationQuery((size, size, 3), u8),  # resized image
            AllocationQuery((self._scratch_bytes(),), u8),  # decoded full image
        )

    def _table(self) -> np.ndarray:
        return self.lut if self.lut is not None else np.zeros((3, 256), dtype=np.float32)


class SeededRandomResizedCrop(_CropDecoder):
    """Random resized crop + horizontal flip whose randomness is a function of (key, sample index).

    `set_key` before an epoch (the compiled code reads the key from this object's buffer
    at every batch, so no recompilation is needed). With `decoded`, the images are read from
    a `fastprompt.data.decoded.DecodedImages` given to `attach` before the first batch,
    instead of being decoded from the .beton: the same pixels (`_augment` in both kernels).
    """

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float], flip_prob: float,
                 lut: Optional[np.ndarray] = None, chunks: int = 1, decoded: bool = False):
        super().__init__(image_size, lut, chunks)
        self.scale, self.ratio, self.flip_prob = scale, ratio, flip_prob
        self.decoded = decoded
        self.cache = None  # the DecodedImages the decoded path reads (`attach`)
        self._key = np.zeros(1, dtype=np.uint64)  # read by the compiled decoder through its address

    def set_key(self, key: int) -> None:
        self._key[0] = np.uint64(key)

    def attach(self, cache) -> None:
        """The decoded images the `decoded` path reads from the next batch on."""
        if not self.decoded:
            raise ValueError("attach() needs a decoder built with decoded=True")
        self.cache = cache

    def _scratch_bytes(self) -> int:
        return 1 if self.decoded else super()._scratch_bytes()  # the decoded path decodes nothing

    def generate_code(self):
        # The returned function runs as Python (ffcv_compat, workaround 4): it only unpacks FFCV's
        # buffers and calls the cached kernel. np.uint64(address), np.int64(chunks): fixed integer
        # types, so that the cached kernel keeps one specialisation.
        kernel, lut, address = _decode_random_resized_crop, self._table(), int(self._key.ctypes.data)
        chunks = int(self.chunks)
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        flip_prob = float(self.flip_prob)
        if self.decoded:
            return self._decoded_code(lut, np.uint64(address), np.int64(chunks), scale_lo, scale_hi, log_lo, log_hi,
                                      flip_prob)
        if self.lut is not None:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                return kernel(_contiguous(batch_indices), out, scratch, lut, True, np.int64(chunks), metadata, mm, ptrs, sizes,
                              np.uint64(address), scale_lo, scale_hi, log_lo, log_hi, flip_prob)  # (B, 3, S, S) f32
        else:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                kernel(_contiguous(batch_indices), out, scratch, lut, False, np.int64(chunks), metadata, mm, ptrs, sizes,
                       np.uint64(address), scale_lo, scale_hi, log_lo, log_hi, flip_prob)
                return out[: len(batch_indices)]  # (B, S, S, 3) uint8
        return mark_host_code(decode)  # Python around the cached kernel (ffcv_compat, workaround 4)


    def _decoded_code(self, lut, address, chunks, scale_lo, scale_hi, log_lo, log_hi, flip_prob):
        kernel, normalise, holder = _crop_decoded, self.lut is not None, self

        def decode(batch_indices, storage, metadata, storage_state):
            out, _ = storage
            c = holder.cache  # attached by the loader before its first epoch
            out_f = kernel(_contiguous(batch_indices), out, lut, normalise, chunks, c.row_of, c.pixels, c.offsets, c.heights,
                           c.widths, address, scale_lo, scale_hi, log_lo, log_hi, flip_prob)
            return out_f if normalise else out[: len(batch_indices)]  # (B, 3, S, S) f32 / (B, S, S, 3) u8

        return mark_host_code(decode)  # Python around the cached kernel (ffcv_compat, workaround 4)


class CenterCrop(_CropDecoder):
    """CLIP's eval geometry: shorter side resized to `image_size / ratio`, centre crop of image_size."""

    def __init__(self, image_size: int, ratio: float, lut: Optional[np.ndarray] = None, chunks: int = 1):
        super().__init__(image_size, lut, chunks)
        self.ratio = ratio

    def generate_code(self):
        from fastprompt.data.pixels import eval_resize_short

        kernel, lut, chunks = _decode_center_crop, self._table(), int(self.chunks)
        short = np.int64(eval_resize_short(self.image_size, self.ratio))  # the shorter side before the crop
        if self.lut is not None:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                return kernel(_contiguous(batch_indices), out, scratch, lut, True, np.int64(chunks), metadata, mm, ptrs, sizes, short)  # (B, 3, S, S)
        else:
            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage
                mm, ptrs, sizes = storage_state
                kernel(_contiguous(batch_indices), out, scratch, lut, False, np.int64(chunks), metadata, mm, ptrs, sizes, short)
                return out[: len(batch_indices)]  # (B, S, S, 3) uint8
        return mark_host_code(decode)  # Python around the cached kernel (ffcv_compat, workaround 4)


class SampleIndex(Operation):
    """Decoder for any field that outputs the sample's index in the .beton (labels come from a table)."""

    def declare_state_and_memory(self, previous_state: State):
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=np.dtype("<i8")), AllocationQuery((1,), np.dtype("<i8"))

    def generate_code(self):
        def decode(batch_indices, out, metadata, storage_state):
            out[: len(batch_indices), 0] = batch_indices  # (B,)
            return out[: len(batch_indices)]  # (B, 1)

        return mark_host_code(decode)  # numpy, no compile (ffcv_compat, workaround 4)

