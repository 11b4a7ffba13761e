"""Cosine-logit cross-entropy, fused: the (B, C) logit matrix is never stored.

What it computes: for x (B, D), w (C, D), a scale s (python float or 0-d tensor) and targets
(int64 class indices (B,) or probability rows (B, C)),

    loss = mean_i CE(s * x̂_i ŵ^T, target_i),   x̂ = x / max(||x||, 1e-12)  (F.normalize)

with gradients to x, w and s. It is the classification loss (w = class text features) and
InfoNCE (w = the other view's embeddings, target = arange(B)).

Algorithm: the logits are produced tile by tile (BLOCK_B rows x BLOCK_C classes, the D
reduction looped in BLOCK_D chunks) and folded into an online log-sum-exp, as in the
softmax of FlashAttention (Dao et al., 2022) and Liger-Kernel's fused linear cross-entropy;
the classes are split across programs and a second kernel merges the per-split statistics.
The backward pass follows Cut Cross-Entropy (Wijmans et al., 2024, arXiv:2411.09009): a 2-D
grid over (row block, class block) recomputes its logit tile from the saved row statistics,
forms dL/dlogits in registers and accumulates x̂- and ŵ-gradients with fp32 atomics; a
row-wise kernel then applies the normalisation's Jacobian. Row inverse norms are computed
once in fp32 and the raw rows enter the matmul, so x̂ and ŵ are never written either.
Memory beyond inputs/outputs: O(B + C) floats forward, (B + C) x D fp32 backward.

Limits: x and w of one dtype (fp32 / bf16 / fp16), D >= 1; soft targets must not require
grad in the Triton path (no gradient to the target); hard targets must lie in [0, C) (no
ignore_index, no label smoothing). fp32 matmuls run in IEEE precision. The fp32 atomics make
the backward pass's last bits order-dependent (not bitwise deterministic). Under
TRITON_INTERPRET=1 (CPU) fixed 16-wide blocks are used.

Reference: `cosine_cross_entropy_reference` (F.normalize + matmul + F.cross_entropy) at the
end of this file is the oracle of the tests and the path used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.kernels._common import (
    dot_precision,
    is_interpreted,
    lastdim_contiguous,
    mma,
    resolve_impl,
    sm_count,
    tl,
    triton,
)

__all__ = ["cosine_cross_entropy", "cosine_cross_entropy_reference"]

_EPS = 1e-12  # F.normalize's clamp on the norm
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_rnorm_kernel(X, RN, n_rows, D, stride_x,
                      EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """rn_r = 1 / max(||x_r||, eps), in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < n_rows
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                    mask=r_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_D)
        ss += tl.sum(x * x, 1)
    tl.store(RN + rows, 1.0 / tl.maximum(tl.sqrt_rn(ss), EPS), mask=r_mask)


@triton.jit
def _logit_tile(X, W, rows, cols, r_mask, c_mask, D, stride_xb, stride_wc,
                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw dot products x_rows . w_cols of one tile, fp32 (BLOCK_B, BLOCK_C)."""
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xb + offs_d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_B, BLOCK_D)
        wT = tl.load(W + cols[None, :].to(tl.int64) * stride_wc + offs_d[:, None],
                     mask=d_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_C)
        acc = mma(x, wT, acc, PRECISION)
    return acc


@triton.jit
def _cce_fwd_kernel(
    X, W, T, RX, RW, SCALE, PART_M, PART_L, PART_T, PART_P,
    B, C, D, stride_xb, stride_wc, stride_tb, cols_per_split,
    SOFT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_B rows against the classes of one split. Writes, per row and split,
    the running max m and sum_c exp(z_c - m), the target term (z_target, or
    sum_c p_c (z_c - m)) and sum_c p_c. Statistics stay relative to the max, so that
    lse - z_target never subtracts two large numbers (the reference's log_softmax doesn't)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    s = tl.load(SCALE).to(tl.float32)
    row_scale = s * tl.load(RX + rows, mask=r_mask, other=0.0)  # (BLOCK_B,)
    if not SOFT:
        tgt = tl.load(T + rows.to(tl.int64) * stride_tb, mask=r_mask, other=-1)  # (BLOCK_B,)

    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    p_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)  # the launcher makes every split non-empty
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = cols < c_hi
        acc = _logit_tile(X, W, rows, cols, r_mask, c_mask, D, stride_xb, stride_wc,
                          PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)  # (BLOCK_B, BLOCK_C)
        rw = tl.load(RW + cols, mask=c_mask, other=0.0)  # (BLOCK_C,)
        z = acc * row_scale[:, None] * rw[None, :]  # (BLOCK_B, BLOCK_C) logits; 0 where masked
        zm = tl.where(c_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zm, 1))  # finite: every tile has a valid class
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), 1)
        if SOFT:
            p = tl.load(T + rows[:, None].to(tl.int64) * stride_tb + cols[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_C)
            shift = tl.where(m_i > float("-inf"), m_i - m_new, 0.0)  # re-centre sum p (z - m)
            t_i += p_i * shift + tl.sum(p * (z - m_new[:, None]), 1)
            p_i += tl.sum(p, 1)
        else:
            t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m_i = m_new
    out = pid_s * B + rows
    tl.store(PART_M + out, m_i, mask=r_mask)
    tl.store(PART_L + out, l_i, mask=r_mask)
    tl.store(PART_T + out, t_i, mask=r_mask)
    if SOFT:
        tl.store(PART_P + out, p_i, mask=r_mask)


@triton.jit
def _cce_combine_kernel(PART_M, PART_L, PART_T, PART_P, ROWMAX, LOGL, PSUM, LOSS, B, n_splits,
                        SOFT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """Merge the splits into the row max M and log L = log sum_c exp(z_c - M) (so lse = M +
    log L) and the row loss: hard (M - z_target) + log L; soft psum log L - sum p (z - M)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    splits = tl.arange(0, BLOCK_S)
    mask = (splits < n_splits)[:, None] & r_mask[None, :]
    offs = splits[:, None] * B + rows[None, :]  # (BLOCK_S, BLOCK_B)
    part_m = tl.load(PART_M + offs, mask=mask, other=-1e30)  # (BLOCK_S, BLOCK_B); finite fill
    m = tl.max(part_m, 0)  # (BLOCK_B,)
    part_l = tl.load(PART_L + offs, mask=mask, other=1.0)  # (BLOCK_S, BLOCK_B); x exp(-huge) = 0
    log_l = tl.log(tl.sum(part_l * tl.exp(part_m - m[None, :]), 0))
    part_t = tl.load(PART_T + offs, mask=mask, other=0.0)  # (BLOCK_S, BLOCK_B)
    if SOFT:
        part_p = tl.load(PART_P + offs, mask=mask, other=0.0)  # (BLOCK_S, BLOCK_B)
        psum = tl.sum(part_p, 0)
        loss = psum * log_l - tl.sum(part_t + part_p * (part_m - m[None, :]), 0)
    else:
        psum = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        loss = (m - tl.sum(part_t, 0)) + log_l  # only the target's split holds z_target
    tl.store(ROWMAX + rows, m, mask=r_mask)
    tl.store(LOGL + rows, log_l, mask=r_mask)
    tl.store(PSUM + rows, psum, mask=r_mask)
    tl.store(LOSS + rows, loss, mask=r_mask)


@triton.jit
def _cce_bwd_kernel(
    X, W, T, RX, RW, SCALE, ROWMAX, LOGL, PSUM, GRAD, DXH, DWH, DSCALE_PART,
    B, C, D, stride_xb, stride_wc, stride_tb, inv_b,
    SOFT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one (row block, class block) tile. Recomputes the logits, forms
    G = dL/dlogits, adds G-weighted rows into dx̂ (B, D) and dŵ (C, D) with fp32 atomics and
    writes its share of dL/ds."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = rows < B
    c_mask = cols < C
    valid = r_mask[:, None] & c_mask[None, :]

    acc = _logit_tile(X, W, rows, cols, r_mask, c_mask, D, stride_xb, stride_wc,
                      PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)  # (BLOCK_B, BLOCK_C)
    s = tl.load(SCALE).to(tl.float32)
    g = tl.load(GRAD).to(tl.float32) * inv_b  # upstream grad of the mean
    rx = tl.load(RX + rows, mask=r_mask, other=0.0)  # (BLOCK_B,)
    rw = tl.load(RW + cols, mask=c_mask, other=0.0)  # (BLOCK_C,)
    m = tl.load(ROWMAX + rows, mask=r_mask, other=0.0)  # (BLOCK_B,)
    log_l = tl.load(LOGL + rows, mask=r_mask, other=0.0)  # (BLOCK_B,)
    # z bit-identical to the forward pass's (same tiles, same product order), so z - M is
    # exactly 0 at the row max and the softmax exp((z - M) - log L) is accurate near 1,
    # where G = prob - 1 is small.
    z = acc * (s * rx)[:, None] * rw[None, :]  # (BLOCK_B, BLOCK_C)
    cos = acc * rx[:, None] * rw[None, :]  # (BLOCK_B, BLOCK_C), for dL/ds
    prob = tl.exp(tl.where(valid, (z - m[:, None]) - log_l[:, None], float("-inf")))  # 0 outside
    if SOFT:
        p = tl.load(T + rows[:, None].to(tl.int64) * stride_tb + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        psum = tl.load(PSUM + rows, mask=r_mask, other=0.0)
        grad = prob * psum[:, None] - p  # (BLOCK_B, BLOCK_C)
    else:
        tgt = tl.load(T + rows.to(tl.int64) * stride_tb, mask=r_mask, other=-1)
        grad = prob - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)  # (BLOCK_B, BLOCK_C)
    grad = tl.where(valid, grad, 0.0) * g  # dL/dz
    tl.store(DSCALE_PART + pid_b * tl.num_programs(1) + pid_c, tl.sum(tl.sum(grad * cos, 1), 0))
    grad = grad * s  # dL/dcos

    if COMPUTE_DX:
        gx = (grad * rw[None, :]).to(X.dtype.element_ty)  # (BLOCK_B, BLOCK_C): dcos/dx̂ = ŵ = rw * w
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            w = tl.load(W + cols[:, None].to(tl.int64) * stride_wc + offs_d[None, :],
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_C, BLOCK_D)
            dxh = mma(gx, w, None, PRECISION)  # (BLOCK_B, BLOCK_D)
            tl.atomic_add(DXH + rows[:, None].to(tl.int64) * D + offs_d[None, :], dxh,
                          mask=r_mask[:, None] & d_mask[None, :], sem="relaxed")
    if COMPUTE_DW:
        gwT = tl.trans(grad * rx[:, None]).to(X.dtype.element_ty)  # (BLOCK_C, BLOCK_B)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = tl.load(X + rows[:, None].to(tl.int64) * stride_xb + offs_d[None, :],
                        mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_B, BLOCK_D)
            dwh = mma(gwT, x, None, PRECISION)  # (BLOCK_C, BLOCK_D)
            tl.atomic_add(DWH + cols[:, None].to(tl.int64) * D + offs_d[None, :], dwh,
                          mask=c_mask[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _normalize_bwd_kernel(X, DXH, DX, n_rows, D, stride_x, stride_dx,
                          EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of x̂ = x / max(||x||, eps): dx = dx̂ / n - x (x . dx̂) / n^3 (the second term
    vanishes where the clamp is active, as in autograd's clamp_min)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < n_rows
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    xd = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dxh = tl.load(DXH + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)
        ss += tl.sum(x * x, 1)
        xd += tl.sum(x * dxh, 1)
    norm = tl.sqrt_rn(ss)
    rn = 1.0 / tl.maximum(norm, EPS)
    coef = tl.where(norm >= EPS, xd * rn * rn * rn, 0.0)  # (BLOCK_R,)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dxh = tl.load(DXH + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)
        dx = dxh * rn[:, None] - x * coef[:, None]  # (BLOCK_R, BLOCK_D)
        tl.store(DX + rows[:, None].to(tl.int64) * stride_dx + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask)


_INTERPRETED = is_interpreted(_cce_fwd_kernel)


# Shipped tiles, (BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages), the second of each pair
# halved for grids that would not cover the GPU twice. Every one compiles for sm_80 and sm_90
# within the shared memory of a block (tests/kernels/test_aot.py).
_TILES = {
    "wide": ((64, 128, 64, 8, 3), (32, 64, 64, 4, 3)),  # bf16 / fp16: tensor-core dots
    "fp32": ((64, 64, 32, 4, 2), (32, 32, 32, 4, 2)),  # IEEE fp32 dots use CUDA cores: narrower tiles and D chunks
}
_ROW_BLOCK = 32  # rows per program of the norm kernels
_COMBINE_BLOCK = 128  # rows per program of the split-merging kernel, at most
_COMBINE_ELEMENTS = 4096  # (splits x rows) per program: 32 fp32 values a thread at 4 warps


def _combine_rows(block_s: int) -> int:
    """Rows per program of the split-merging kernel for BLOCK_S splits: its (BLOCK_S, BLOCK_B)
    tiles stay in registers (compiled for sm_90, 512 x 128 spilled 15 KB a thread)."""
    return max(1, min(_COMBINE_BLOCK, _COMBINE_ELEMENTS // block_s))


def _tile_dict(tile) -> dict:
    bb, bc, bd, warps, stages = tile
    return dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def _tiles(dtype: torch.dtype, B: int, C: int, device: torch.device) -> dict:
    """Fixed tiles, no autotuning: the backward accumulates with atomics (a re-run by the
    autotuner would double-count) and at B x C of a few 10^5 the op is launch-bound anyway.
    Untimed defaults in the range Liger-Kernel and Cut Cross-Entropy use on A100/H100, halved
    when the backward grid would not cover the GPU twice (B 256 x C 1000 gives 32 tiles of
    64 x 128). Forward and backward must share them: the backward relies on recomputing
    logits that are bit-identical to the forward pass's row max."""
    if _INTERPRETED:
        return dict(BLOCK_B=16, BLOCK_C=16, BLOCK_D=16, num_warps=1, num_stages=1)
    full, halved = _TILES["fp32" if dtype == torch.float32 else "wide"]
    if triton.cdiv(B, full[0]) * triton.cdiv(C, full[1]) < 2 * sm_count(device.index or 0):
        return _tile_dict(halved)
    return _tile_dict(full)


def _width_block(D: int) -> int:
    """BLOCK_D of the norm kernels for rows of width D."""
    return min(triton.next_power_of_2(D), 256)


def aot_launches(select) -> list:
    """Every kernel a launch compiles, under each shipped tile, for the (config, case) pairs
    that `select(configs, axes)` picks (`fastprompt.kernels.aot`). Mirrors the launchers
    below: pointer dtypes, fp32 statistics and gradient buffers, constexprs."""
    from fastprompt.kernels.aot import Launch, config_label

    launches = []

    def add(kernel, fn, pointers, floats, meta, warps, stages, case, blocks):
        launches.append(Launch(f"cosine_cross_entropy.{kernel}", fn, pointers, floats, meta, warps, stages,
                               config_label(blocks, warps, stages), case))

    stats = ["RX", "RW", "SCALE", "PART_M", "PART_L", "PART_T", "PART_P"]
    for group, dtypes in (("wide", ("bf16", "fp16")), ("fp32", ("fp32",))):
        for tile, case in select(_TILES[group], {"dtype": dtypes, "target": ("classes", "probabilities")}):
            t = _tile_dict(tile)
            blocks = {k: t[k] for k in ("BLOCK_B", "BLOCK_C", "BLOCK_D")}
            soft = case["target"] == "probabilities"
            common = dict(PRECISION="ieee" if case["dtype"] == "fp32" else "tf32", SOFT=soft, **blocks)
            # Probability rows compiled in fp32 (mixup, CAVPT's top-K rows); another dtype is another variant.
            target = "fp32" if soft else "i64"
            add("fwd", _cce_fwd_kernel, {"X": case["dtype"], "W": case["dtype"], "T": target} | dict.fromkeys(stats, "fp32"),
                (), common, t["num_warps"], t["num_stages"], case, blocks)
        for tile, case in select(_TILES[group], {"dtype": dtypes, "target": ("classes", "probabilities"),
                                                 "grads": ("x and w", "x", "w")}):
            t = _tile_dict(tile)
            blocks = {k: t[k] for k in ("BLOCK_B", "BLOCK_C", "BLOCK_D")}
            soft = case["target"] == "probabilities"
            meta = dict(PRECISION="ieee" if case["dtype"] == "fp32" else "tf32", SOFT=soft,
                        COMPUTE_DX=case["grads"] != "w", COMPUTE_DW=case["grads"] != "x", **blocks)
            pointers = {"X": case["dtype"], "W": case["dtype"], "T": "fp32" if soft else "i64"} | dict.fromkeys(
                ["RX", "RW", "SCALE", "ROWMAX", "LOGL", "PSUM", "GRAD", "DXH", "DWH", "DSCALE_PART"], "fp32")
            add("bwd", _cce_bwd_kernel, pointers, ("inv_b",), meta, t["num_warps"], t["num_stages"], case, blocks)
    widths = {"dtype": ("bf16", "fp16", "fp32"), "width": (32, 512)}
    for _config, case in select([(_ROW_BLOCK,)], widths):
        blocks = dict(BLOCK_R=_ROW_BLOCK, BLOCK_D=_width_block(case["width"]))
        add("row_rnorm", _row_rnorm_kernel, {"X": case["dtype"], "RN": "fp32"}, (), dict(EPS=_EPS, **blocks), 4, 3, case, blocks)
        add("normalize_bwd", _normalize_bwd_kernel, {"X": case["dtype"], "DXH": "fp32", "DX": case["dtype"]}, (),
            dict(EPS=_EPS, **blocks), 4, 3, case, blocks)
    # BLOCK_S covers the class splits: up to cdiv(2 x SMs, row blocks) (H100: 264 -> 512).
    for _config, case in select([(_COMBINE_BLOCK,)], {"target": ("classes", "probabilities"), "splits": (2, 64, 512)}):
        blocks = dict(BLOCK_S=case["splits"], BLOCK_B=_combine_rows(case["splits"]))
        add("combine", _cce_combine_kernel, dict.fromkeys(["PART_M", "PART_L", "PART_T", "PART_P", "ROWMAX", "LOGL", "PSUM", "LOSS"], "fp32"),
            (), dict(SOFT=case["target"] == "probabilities", **blocks), 4, 3, case, blocks)
    return launches


# ----------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------


def _check_inputs(x, w, target, scale) -> None:
    """Shape/dtype/device rules shared by every impl; messages name the constraint."""
    for name, t in (("x", x), ("w", w), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise FastpromptError(f"cosine_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or w.dim() != 2:
        raise FastpromptError(f"cosine_cross_entropy: x and w must be 2-D (B, D) and (C, D), got {tuple(x.shape)} and {tuple(w.shape)}")
    B, D = x.shape
    C = w.shape[0]
    if w.shape[1] != D:
        raise FastpromptError(f"cosine_cross_entropy: x (B, D) and w (C, D) must share D, got {tuple(x.shape)} and {tuple(w.shape)}")
    if B < 1 or C < 1 or D < 1:
        raise FastpromptError(f"cosine_cross_entropy: B, C and D must be >= 1, got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise FastpromptError(f"cosine_cross_entropy: x and w must share one dtype, got {x.dtype} and {w.dtype}; cast one of them")
    if x.dtype not in _DTYPES:
        raise FastpromptError(f"cosine_cross_entropy: dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if target.dtype == torch.int64:
        if target.shape != (B,):
            raise FastpromptError(f"cosine_cross_entropy: class-index target must have shape (B,) = ({B},), got {tuple(target.shape)}")
    elif target.is_floating_point():
        if target.shape != (B, C):
            raise FastpromptError(f"cosine_cross_entropy: probability target must have shape (B, C) = ({B}, {C}), got {tuple(target.shape)}")
    else:
        raise FastpromptError(f"cosine_cross_entropy: target must be int64 class indices (B,) or float probabilities (B, C), got {target.dtype}")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise FastpromptError(f"cosine_cross_entropy: scale must be a float or a one-element float tensor, got shape {tuple(scale.shape)} {scale.dtype}")
        if scale.device != x.device:
            raise FastpromptError(f"cosine_cross_entropy: scale is on {scale.device} but x on {x.device}; move scale to {x.device}")
    elif not isinstance(scale, (int, float)):
        raise FastpromptError(f"cosine_cross_entropy: scale must be a python float or a tensor, got {type(scale).__name__}")
    if w.device != x.device or target.device != x.device:
        raise FastpromptError(f"cosine_cross_entropy: x, w and target must be on one device, got {x.device}, {w.device}, {target.device}")


def _check_class_indices(target: torch.Tensor, C: int) -> None:
    """Out-of-range indices would silently pick no class in the kernel: fail instead (an
    async device assert on CUDA, so the check costs no host sync)."""
    if target.device.type == "cuda":
        torch._assert_async(((target >= 0) & (target < C)).all())
    elif bool(((target < 0) | (target >= C)).any()):
        raise FastpromptError(f"cosine_cross_entropy: class-index target must lie in [0, C) = [0, {C}), got values outside it")


def _row_rnorm(t: torch.Tensor) -> torch.Tensor:
    """fp32 inverse row norms (n,) of a (n, D) tensor, clamped like F.normalize."""
    n, D = t.shape
    rn = torch.empty(n, dtype=torch.float32, device=t.device)  # (n,)
    block_r = 16 if _INTERPRETED else _ROW_BLOCK
    block_d = 16 if _INTERPRETED else _width_block(D)
    _row_rnorm_kernel[(triton.cdiv(n, block_r),)](t, rn, n, D, t.stride(0), EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d)
    return rn


def _normalize_backward(t: torch.Tensor, dt_hat: torch.Tensor) -> torch.Tensor:
    """dt (n, D) in t's dtype from dt̂ (n, D) fp32 through t̂ = t / max(||t||, eps)."""
    n, D = t.shape
    dt = torch.empty((n, D), dtype=t.dtype, device=t.device)  # (n, D)
    block_r = 16 if _INTERPRETED else _ROW_BLOCK
    block_d = 16 if _INTERPRETED else _width_block(D)
    _normalize_bwd_kernel[(triton.cdiv(n, block_r),)](
        t, dt_hat, dt, n, D, t.stride(0), dt.stride(0), EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return dt


def _cosine_ce_forward(x, w, target, scale):
    """Launch the forward kernels. Returns loss (0-d, x.dtype) and, for the backward pass,
    the row max of the logits (B,), log sum exp(logits - max) (B,), the target mass psum (B,)
    and the inverse norms rx (B,) and rw (C,), all fp32."""
    x, w = lastdim_contiguous(x), lastdim_contiguous(w)
    B, D = x.shape
    C = w.shape[0]
    soft = target.is_floating_point()
    if soft:
        target = lastdim_contiguous(target)
    else:
        _check_class_indices(target, C)
    tiles = _tiles(x.dtype, B, C, x.device)
    bb, bc = tiles["BLOCK_B"], tiles["BLOCK_C"]

    rx = _row_rnorm(x)  # (B,)
    rw = _row_rnorm(w)  # (C,)
    # Split the classes so that the grid fills the GPU even for small B (several waves of
    # programs); each split gets a whole number of BLOCK_C tiles and at least one class.
    n_rb = triton.cdiv(B, bb)
    n_ctiles = triton.cdiv(C, bc)
    want = 4 if _INTERPRETED else triton.cdiv(2 * sm_count(x.device.index or 0), n_rb)
    n_splits = max(1, min(n_ctiles, want))
    cols_per_split = triton.cdiv(n_ctiles, n_splits) * bc
    n_splits = triton.cdiv(C, cols_per_split)

    part_m = torch.empty((n_splits, B), dtype=torch.float32, device=x.device)  # (S, B)
    part_l = torch.empty((n_splits, B), dtype=torch.float32, device=x.device)  # (S, B)
    part_t = torch.empty((n_splits, B), dtype=torch.float32, device=x.device)  # (S, B)
    part_p = torch.empty((n_splits, B) if soft else (1,), dtype=torch.float32, device=x.device)  # (S, B)
    _cce_fwd_kernel[(n_rb, n_splits)](
        x, w, target, rx, rw, scale, part_m, part_l, part_t, part_p,
        B, C, D, x.stride(0), w.stride(0), target.stride(0), cols_per_split,
        SOFT=soft, PRECISION=dot_precision(x.dtype), **tiles,
    )
    rowmax = torch.empty(B, dtype=torch.float32, device=x.device)  # (B,)
    log_l = torch.empty(B, dtype=torch.float32, device=x.device)  # (B,)
    psum = torch.empty(B, dtype=torch.float32, device=x.device)  # (B,)
    row_loss = torch.empty(B, dtype=torch.float32, device=x.device)  # (B,)
    block_s = max(2, triton.next_power_of_2(n_splits))
    block_b = 16 if _INTERPRETED else _combine_rows(block_s)
    _cce_combine_kernel[(triton.cdiv(B, block_b),)](
        part_m, part_l, part_t, part_p, rowmax, log_l, psum, row_loss, B, n_splits,
        SOFT=soft, BLOCK_S=block_s, BLOCK_B=block_b,
    )
    loss = row_loss.mean().to(x.dtype)  # ()
    return loss, rowmax, log_l, psum, rx, rw


def _cosine_ce_backward(grad, x, w, target, scale, rowmax, log_l, psum, rx, rw, need_dx: bool, need_dw: bool):
    """Launch the backward kernels. Returns dx (B, D), dw (C, D) (empty when not needed) and
    dscale (shaped and typed like scale)."""
    x, w = lastdim_contiguous(x), lastdim_contiguous(w)
    B, D = x.shape
    C = w.shape[0]
    soft = target.is_floating_point()
    if soft:
        target = lastdim_contiguous(target)
    tiles = _tiles(x.dtype, B, C, x.device)
    grid = (triton.cdiv(B, tiles["BLOCK_B"]), triton.cdiv(C, tiles["BLOCK_C"]))
    empty = torch.empty(0, dtype=torch.float32, device=x.device)
    dx_hat = torch.zeros((B, D), dtype=torch.float32, device=x.device) if need_dx else empty  # (B, D)
    dw_hat = torch.zeros((C, D), dtype=torch.float32, device=x.device) if need_dw else empty  # (C, D)
    dscale_part = torch.empty(grid, dtype=torch.float32, device=x.device)  # (B blocks, C blocks)
    _cce_bwd_kernel[grid](
        x, w, target, rx, rw, scale, rowmax, log_l, psum, grad, dx_hat, dw_hat, dscale_part,
        B, C, D, x.stride(0), w.stride(0), target.stride(0), 1.0 / B,
        SOFT=soft, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, PRECISION=dot_precision(x.dtype), **tiles,
    )
    dx = _normalize_backward(x, dx_hat) if need_dx else x.new_empty(0)  # (B, D)
    dw = _normalize_backward(w, dw_hat) if need_dw else w.new_empty(0)  # (C, D)
    dscale = dscale_part.sum().reshape(scale.shape).to(scale.dtype)  # like scale
    return dx, dw, dscale


# ----------------------------------------------------------------------------------------
# Custom ops and their autograd (opaque to torch.compile, so fullgraph traces through them)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastprompt::cosine_cross_entropy_fwd", mutates_args=())
def _cosine_ce_fwd_op(
    x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cosine_ce_forward(x, w, target, scale)


@_cosine_ce_fwd_op.register_fake
def _(x, w, target, scale):
    B, C = x.shape[0], w.shape[0]
    f32 = dict(dtype=torch.float32)
    rowmax, log_l, psum, rx = (x.new_empty(B, **f32) for _ in range(4))
    return x.new_empty(()), rowmax, log_l, psum, rx, x.new_empty(C, **f32)


@torch.library.custom_op("fastprompt::cosine_cross_entropy_bwd", mutates_args=())
def _cosine_ce_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
    rowmax: torch.Tensor, log_l: torch.Tensor, psum: torch.Tensor, rx: torch.Tensor, rw: torch.Tensor,
    need_dx: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cosine_ce_backward(grad, x, w, target, scale, rowmax, log_l, psum, rx, rw, need_dx, need_dw)


@_cosine_ce_bwd_op.register_fake
def _(grad, x, w, target, scale, rowmax, log_l, psum, rx, rw, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw = w.new_empty(w.shape) if need_dw else w.new_empty(0)
    return dx, dw, scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, w, target, scale = inputs
    _loss, rowmax, log_l, psum, rx, rw = output
    ctx.save_for_backward(x, w, target, scale, rowmax, log_l, psum, rx, rw)


def _backward(ctx, grad, *_aux_grads):
    x, w, target, scale, rowmax, log_l, psum, rx, rw = ctx.saved_tensors
    need_dx, need_dw, _, need_ds = ctx.needs_input_grad
    dx, dw, dscale = torch.ops.fastprompt.cosine_cross_entropy_bwd(
        grad, x, w, target, scale, rowmax, log_l, psum, rx, rw, need_dx, need_dw
    )
    return (dx if need_dx else None, dw if need_dw else None, None, dscale if need_ds else None)


_cosine_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function and eager reference
# ----------------------------------------------------------------------------------------


def cosine_cross_entropy(
    x: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of `scale * normalize(x) @ normalize(w).T` against `target`.

    x: (B, D); w: (C, D); target: int64 (B,) class indices or float (B, C) probabilities;
    scale: python float or one-element tensor (may require grad). `impl`: "auto" (Triton on
    CUDA, reference elsewhere), "triton" or "reference". Returns a 0-d tensor of x's dtype.
    """
    _check_inputs(x, w, target, scale)
    if resolve_impl(impl, x.device, op="cosine_cross_entropy", interpreted=_INTERPRETED) == "reference":
        return cosine_cross_entropy_reference(x, w, target, scale)
    if target.requires_grad:
        raise FastpromptError("cosine_cross_entropy: the Triton path gives no gradient to target; pass target.detach() or use impl='reference'")
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=x.device)
    loss, *_saved = torch.ops.fastprompt.cosine_cross_entropy_fwd(x, w, target, scale)
    return loss


def cosine_cross_entropy_reference(
    x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """Eager oracle: F.normalize + matmul + F.cross_entropy (probability targets included)."""
    logits = scale * (F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T)  # (B, C)
    if target.is_floating_point():
        target = target.to(logits.dtype)  # F.cross_entropy wants probabilities in the logits' dtype
    return F.cross_entropy(logits, target)
