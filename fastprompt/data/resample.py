"""PIL's bicubic resize (antialiased when shrinking) as a numba kernel, for the decode threads.

Dassl's training transform (`RandomResizedCrop(224, interpolation=BICUBIC)` on a PIL image,
dassl/data/transforms/transforms.py) and CLIP's eval transform resize with PIL's
`Image.resize(..., BICUBIC)`. This kernel computes the same filter as Pillow's
src/libImaging/Resample.c: bicubic with a = -0.5, support 2 widened by the scale factor when
shrinking (the antialiasing), per-output-pixel weights normalised to 1 and stored as 22-bit
fixed point, each pass rounded to uint8. OpenCV's INTER_CUBIC (what FFCV's native resize
offers) differs: a = -0.75 and no antialiasing.

The passes run vertical first, each written transposed so that both are loops over
contiguous memory that LLVM vectorises: each output line is accumulated and clipped whole,
then scattered (`_pass_transposed`; `resample_reference` clips while scattering, the same
values at about half the speed, and is the reference the tests compare it with bit for bit).
`resample_normalised` does the flip and CLIP's normalisation in the last pass's writes. Pillow 13 runs the horizontal pass first for most
shapes, so a value can differ from Pillow's by the rounding of the intermediate image (mean
|diff| under 0.35 of a level; tests/data/test_data_pixels.py pins it).

`resample(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col, out)`:
`out` (S_h, S_w, 3) receives rows `first_row..first_row+S_h` and columns
`first_col..first_col+S_w` of the bicubic resize of `image[row0:row0+rows, col0:col0+cols]`
to (out_rows, out_cols). A random resized crop is (i, h, S, 0, j, w, S, 0); CLIP's
resize-then-centre-crop is (0, H, H', top, 0, W, W', left).
"""

from __future__ import annotations

import math

import numba
import numpy as np

PRECISION_BITS = 22  # Pillow's PRECISION_BITS (32 - 8 - 2) for 8-bit images
_ZERO = np.int64(0)  # a typed 0: a literal 0 argument compiles a specialisation of its own (Literal[int](0))


@numba.njit(cache=True, nogil=True)
def _bicubic(x):
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@numba.njit(cache=True, nogil=True)
def coefficients(in_size, out_size, first, count):
    """Pillow's `precompute_coeffs` for outputs first..first+count of in_size -> out_size:
    bounds (count, 2) int64 (first input, taps) and weights (count, K) int32 fixed point."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inv = 1.0 / filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((count, 2), dtype=np.int64)
    weights = np.zeros((count, ksize), dtype=np.int32)
    raw = np.empty(ksize, dtype=np.float64)
    for x in range(count):
        center = (first + x + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        hi = min(int(center + support + 0.5), in_size)
        n = hi - lo
        total = 0.0
        for k in range(n):
            w = _bicubic((k + lo - center + 0.5) * inv)
            raw[k] = w
            total += w
        for k in range(n):
            w = raw[k] / total if total != 0.0 else raw[k]
            weights[x, k] = int(w * (1 << PRECISION_BITS) + (-0.5 if w < 0 else 0.5))
        bounds[x, 0] = lo
        bounds[x, 1] = n
    return bounds, weights


@numba.njit(cache=True, nogil=True)
def _rows_into(flat, first, c0, span, y, bounds, weights, acc, row8):
    """row8[:span] = clip8(sum_k weights[y, k] * flat[first + bounds[y, 0] + k, c0 : c0 + span]):
    one output line of a pass, accumulated over contiguous input lines (loops LLVM vectorises)."""
    half = np.int32(1 << (PRECISION_BITS - 1))
    lo = first + bounds[y, 0]
    w0 = weights[y, 0]
    line = flat[lo, c0 : c0 + span]  # (span,) contiguous
    for x in range(span):
        acc[x] = half + np.int32(line[x]) * w0
    for k in range(1, bounds[y, 1]):
        w = weights[y, k]
        line = flat[lo + k, c0 : c0 + span]
        for x in range(span):
            acc[x] += np.int32(line[x]) * w
    for x in range(span):
        v = acc[x] >> PRECISION_BITS
        row8[x] = np.uint8(min(max(v, 0), 255))


@numba.njit(cache=True, nogil=True)
def _pass_transposed(src, first, col_offset, length, bounds, weights, out):
    """out[x, y, :] = clip8(sum_k weights[y, k] * src[first + bounds[y, 0] + k, col_offset + x, :])
    for every output row y and x < length: one resampling pass, written transposed. Each line
    is accumulated and clipped whole (vectorised) before it is scattered: 3x faster than
    clipping while scattering (`_pass_transposed_reference`, the same values)."""
    span = length * 3
    acc = np.empty(span, dtype=np.int32)
    row8 = np.empty(span, dtype=np.uint8)
    flat = src.reshape(src.shape[0], -1)  # (lines, W * 3)
    for y in range(bounds.shape[0]):
        _rows_into(flat, first, col_offset * 3, span, y, bounds, weights, acc, row8)
        for x in range(length):
            out[x, y, 0] = row8[3 * x]
            out[x, y, 1] = row8[3 * x + 1]
            out[x, y, 2] = row8[3 * x + 2]


@numba.njit(cache=True, nogil=True)
def _pass_transposed_normalised(src, length, bounds, weights, flip, lut, out_f):
    """The last pass of `resample_normalised`: `_pass_transposed` into out_f[c, x, y'] = lut[c, value]
    (y' mirrored when `flip`): flip, CLIP normalisation and HWC -> CHW in the same writes.
    (Writing blocks of 16 adjacent columns at a time measured slower, 0.33 against 0.24 ms.)"""
    span = length * 3
    acc = np.empty(span, dtype=np.int32)
    row8 = np.empty(span, dtype=np.uint8)
    last = bounds.shape[0] - 1
    flat = src.reshape(src.shape[0], -1)  # (lines, W * 3)
    for y in range(bounds.shape[0]):
        _rows_into(flat, _ZERO, _ZERO, span, y, bounds, weights, acc, row8)
        col = last - y if flip else y
        for x in range(length):
            out_f[0, x, col] = lut[0, row8[3 * x]]
            out_f[1, x, col] = lut[1, row8[3 * x + 1]]
            out_f[2, x, col] = lut[2, row8[3 * x + 2]]


@numba.njit(cache=True, nogil=True)
def _vertical_pass(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col, out_h, out_w):
    """The first pass of `resample`: (tmp (used, out_h, 3), horizontal bounds and weights
    shifted to tmp's columns)."""
    bounds_v, weights_v = coefficients(rows, out_rows, first_row, out_h)
    bounds_h, weights_h = coefficients(cols, out_cols, first_col, out_w)
    left = bounds_h[0, 0]
    used = bounds_h[out_w - 1, 0] + bounds_h[out_w - 1, 1] - left  # columns the horizontal pass reads
    tmp = np.empty((used, out_h, 3), dtype=np.uint8)  # vertical pass, transposed
    _pass_transposed(image, row0, col0 + left, used, bounds_v, weights_v, tmp)
    bounds_h[:, 0] -= left
    return tmp, bounds_h, weights_h


@numba.njit(cache=True, nogil=True)
def resample(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col, out):
    """See the module docstring; `image` (H, W, 3) uint8 C-contiguous, `out` (S_h, S_w, 3) uint8."""
    out_h, out_w = out.shape[0], out.shape[1]
    tmp, bounds_h, weights_h = _vertical_pass(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col,
                                              out_h, out_w)
    _pass_transposed(tmp, _ZERO, _ZERO, out_h, bounds_h, weights_h, out)


@numba.njit(cache=True, nogil=True)
def resample_normalised(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col, flip, lut, out_f):
    """`resample` then (if `flip`) a left-right mirror then lut[c, value] into out_f (3, S_h, S_w)
    float32, in the last pass's writes (no uint8 image, no separate flip or normalisation pass)."""
    out_h, out_w = out_f.shape[1], out_f.shape[2]
    tmp, bounds_h, weights_h = _vertical_pass(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col,
                                              out_h, out_w)
    _pass_transposed_normalised(tmp, out_h, bounds_h, weights_h, flip, lut, out_f)


@numba.njit(cache=True, nogil=True)
def _pass_transposed_reference(src, first, col_offset, length, bounds, weights, out):
    """`_pass_transposed`, one output value at a time: the reference the fast pass is tested against."""
    span = length * 3
    acc = np.empty(span, dtype=np.int32)
    half = np.int32(1 << (PRECISION_BITS - 1))
    c0 = col_offset * 3
    for y in range(bounds.shape[0]):
        lo = first + bounds[y, 0]
        for x in range(span):
            acc[x] = half
        for k in range(bounds[y, 1]):
            w = weights[y, k]
            row = src[lo + k].reshape(-1)[c0 : c0 + span]  # contiguous (length * 3,)
            for x in range(span):
                acc[x] += np.int32(row[x]) * w
        for x in range(length):
            for c in range(3):
                v = acc[3 * x + c] >> PRECISION_BITS
                out[x, y, c] = np.uint8(min(max(v, 0), 255))


@numba.njit(cache=True, nogil=True)
def resample_reference(image, row0, rows, out_rows, first_row, col0, cols, out_cols, first_col, out):
    """`resample` on `_pass_transposed_reference`: the reference (tests/data/test_data_pixels.py)."""
    out_h, out_w = out.shape[0], out.shape[1]
    bounds_v, weights_v = coefficients(rows, out_rows, first_row, out_h)
    bounds_h, weights_h = coefficients(cols, out_cols, first_col, out_w)
    left = bounds_h[0, 0]
    used = bounds_h[out_w - 1, 0] + bounds_h[out_w - 1, 1] - left  # columns the horizontal pass reads
    tmp = np.empty((used, out_h, 3), dtype=np.uint8)  # vertical pass, transposed
    _pass_transposed_reference(image, row0, col0 + left, used, bounds_v, weights_v, tmp)
    bounds_h[:, 0] -= left
    _pass_transposed_reference(tmp, _ZERO, _ZERO, out_h, bounds_h, weights_h, out)
