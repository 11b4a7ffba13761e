"""Prefix attention: attention over `[prefix ; tokens]` without building the concatenation.

What it computes: for queries q (B, H, N, d), token keys/values k, v (B, H, N, d) and a prompt
prefix prefix_k, prefix_v (Bp, H, P, d), with Bp = 1 (one prefix shared by the batch: VPT-deep
prompts, a CoOp context shared by all classes) or Bp = B (per-sample prefix: class-aware
prompts),

    out = softmax(scale * q [prefix_k ; k]^T + mask) [prefix_v ; v]

where `mask` is empty, or with causal=True hides token j > i from query i (the prefix stays
fully visible: the text tower with a shared context). Gradients: dq, dk, dv, dprefix_k,
dprefix_v; a shared prefix receives the sum over the batch.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691): online softmax over key blocks in
the forward pass, only the log-sum-exp saved, probabilities recomputed in the backward pass
(one kernel for dk/dv per key block, one for dq per query block). The kernel layout follows
the Triton tutorial `06-fused-attention` (Tillet et al.). Our change is the key source: every
query block walks the prefix blocks first and then the token blocks, so the (B, H, P + N, d)
concatenation is never materialised; the dk/dv kernel's grid holds the prefix key blocks
beside the token key blocks, and for a shared prefix each sample writes an fp32 partial that
is summed over the batch afterwards (deterministic, no atomics).

Limits: head dim d <= 256 (padded to a power of two >= 16 inside the kernel, so ViT-H's 80
works too, at the cost of the padding); P >= 1 and N >= 1; fp32 / bf16 / fp16 with all five
inputs of one dtype; softmax statistics and accumulators are fp32; fp32 matmuls run in IEEE
precision (no TF32). No dropout, no extra mask, no key padding. Under TRITON_INTERPRET=1
(CPU) fixed 16-wide blocks are used instead of autotuning.

Reference: `prefix_attention_reference` (torch.cat + scaled_dot_product_attention) at the end
of this file is the oracle of the tests and the path used on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.kernels._common import (
    HAS_TRITON,
    dot_precision,
    is_interpreted,
    lastdim_contiguous,
    mma,
    resolve_impl,
    shared_memory_pruner,
    tl,
    triton,
)

__all__ = ["prefix_attention", "prefix_attention_reference"]

_MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, hi, n_keys,
               offs_m, offs_d, d_mask, qk_scale,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of one query block over keys [0, hi) of one key source."""
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = mma(q, kT, None, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # m_i is finite after the first prefix block (P >= 1, never masked), so no inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = mma(p.to(v.dtype), v, acc, PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_ob, stride_oh, stride_on,
    H, N, P, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); prefix blocks, then token blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # stride_pkb/stride_pvb are 0 for a shared prefix: every sample reads prefix 0.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q,
                               PK + b * stride_pkb + h * stride_pkh, PV + b * stride_pvb + h * stride_pvh,
                               stride_pkn, stride_pvn, P, P, offs_m, offs_d, d_mask, qk_scale,
                               CAUSAL=False, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    hi = N
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)  # no token block right of the diagonal
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q,
                               K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                               stride_kn, stride_vn, hi, N, offs_m, offs_d, d_mask, qk_scale,
                               CAUSAL=CAUSAL, PRECISION=PRECISION, BLOCK_N=BLOCK_N)

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)  # log2 units


@triton.jit
def _prefix_attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d out_i * dout_i, the softmax-backward row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                    lo, N, offs_n, n_mask, offs_d, d_mask, qk_scale,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dk, dv of one key block over the query rows [lo, N)."""
    for start_m in range(lo, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None],
                     mask=d_mask[:, None] & m_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        lse = tl.load(lse_base + offs_m, mask=m_mask, other=0.0)  # (BLOCK_M,)
        sT = mma(k, qT, None, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        valid = n_mask[:, None] & m_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        pT = tl.math.exp2(tl.where(valid, sT - lse[None, :], float("-inf")))  # (BLOCK_N, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        dv = mma(pT.to(do.dtype), do, dv, PRECISION)  # (BLOCK_N, BLOCK_D)
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)  # (BLOCK_M,)
        dpT = mma(v, tl.trans(do), None, PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = mma(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dpb, stride_dph, stride_dpn,
    H, N, P, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, head). Programs [0, cdiv(P, BLOCK_N)) take
    prefix keys (all queries see them), the rest take token keys. DK/DV and DPK/DPV share
    strides: (B, H, N, d) and (B, H, P, d), contiguous, allocated by the launcher."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qk_scale = sm_scale * 1.4426950408889634
    n_pblocks = tl.cdiv(P, BLOCK_N)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * N
    delta_base = DELTA + pid_bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if pid_n < n_pblocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < P
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(PK + b * stride_pkb + h * stride_pkh + offs_n[:, None] * stride_pkn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(PV + b * stride_pvb + h * stride_pvh + offs_n[:, None] * stride_pvn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                 0, N, offs_n, n_mask, offs_d, d_mask, qk_scale,
                                 CAUSAL=False, PRECISION=PRECISION, BLOCK_M=BLOCK_M)
        out_off = b * stride_dpb + h * stride_dph + offs_n[:, None] * stride_dpn + offs_d[None, :]
        tl.store(DPK + out_off, (dk * sm_scale).to(DPK.dtype.element_ty), mask=kv_mask)
        tl.store(DPV + out_off, dv.to(DPV.dtype.element_ty), mask=kv_mask)
    else:
        start_n = (pid_n - n_pblocks) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        lo = 0
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M  # queries above the diagonal never see these keys
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                 lo, N, offs_n, n_mask, offs_d, d_mask, qk_scale,
                                 CAUSAL=CAUSAL, PRECISION=PRECISION, BLOCK_M=BLOCK_M)
        out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, hi, n_keys,
                  offs_m, offs_d, d_mask, qk_scale,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dq of one query block over keys [0, hi) of one key source."""
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        kv_mask = d_mask[:, None] & n_mask[None, :]
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
        s = mma(q, kT, None, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.math.exp2(tl.where(valid, s - lse[:, None], float("-inf")))  # (BLOCK_M, BLOCK_N)
        dp = mma(do, vT, None, PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, P, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dq of BLOCK_M queries of one (batch, head); prefix blocks, then tokens."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=md_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=md_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=m_mask, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=m_mask, other=0.0)  # (BLOCK_M,)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta,
                       PK + b * stride_pkb + h * stride_pkh, PV + b * stride_pvb + h * stride_pvh,
                       stride_pkn, stride_pvn, P, P, offs_m, offs_d, d_mask, qk_scale,
                       CAUSAL=False, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    hi = N
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta,
                       K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                       stride_kn, stride_vn, hi, N, offs_m, offs_d, d_mask, qk_scale,
                       CAUSAL=CAUSAL, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


_INTERPRETED = is_interpreted(_prefix_attn_fwd_kernel)
_INTERPRETER_BLOCK = 16  # tl.dot needs every block dim >= 16; no autotuning in numpy

# Shipped autotune configs, (BLOCK_M, BLOCK_N, num_warps, num_stages): short lists drawn from
# the search space of the Triton fused-attention tutorial, not yet timed on our shapes. Every
# one compiles for sm_80 and sm_90 in every dtype (tests/kernels/test_aot.py); one whose
# compiled kernel needs more shared memory than the device has is pruned before launch
# (`shared_memory_pruner`): compiled for sm_80 in fp32 at head dim 80-128, the forward's
# 64 x 64 and 128 x 64 tiles need 176 and 225 KiB (an A100 block has 163), the dq kernel's
# 128 x 32 tiles 176 KiB. Rejected: 128 x 128 tiles (fp32 forward over 227 KiB at d = 128
# even on an H100).
_FWD_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4))
# dk/dv: narrow query blocks stream past a wide key block (tutorial: BLOCK_M1 < BLOCK_N1).
# 32 x 32 is there for fp32 at head dim 80-128 on sm_80, where the other three need 193 KiB
# (it needs 97).
_DKDV_CONFIGS = ((32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 2), (32, 32, 4, 2))
# dq: the mirror image (tutorial: BLOCK_M2 > BLOCK_N2).
_DQ_CONFIGS = ((64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2))
_PREPROCESS_BLOCK = 64  # rows per program of the delta kernel (no tiles to tune)


def _triton_configs(table) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


if HAS_TRITON and not _INTERPRETED:
    _TUNE_KEY = ["N", "P", "HEAD_DIM", "CAUSAL", "PRECISION"]  # each layer shape of a run is tuned once

    def _autotuned(kernel, table, name):
        return triton.autotune(configs=_triton_configs(table), key=_TUNE_KEY,
                               prune_configs_by={"early_config_prune": shared_memory_pruner(kernel, name)})(kernel)

    _fwd_tuned = _autotuned(_prefix_attn_fwd_kernel, _FWD_CONFIGS, "prefix_attention.fwd")
    _dkdv_tuned = _autotuned(_prefix_attn_bwd_dkdv_kernel, _DKDV_CONFIGS, "prefix_attention.bwd_dkdv")
    _dq_tuned = _autotuned(_prefix_attn_bwd_dq_kernel, _DQ_CONFIGS, "prefix_attention.bwd_dq")
else:
    _fwd_tuned = _dkdv_tuned = _dq_tuned = None


def _launch(kernel, tuned, grid_fn, args, **meta):
    """Run `kernel` with fixed 16-wide blocks under the interpreter, else its autotuned twin."""
    if _INTERPRETED:
        blocks = {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}
        kernel[grid_fn(blocks)](*args, **meta, **blocks)
    else:
        tuned[grid_fn](*args, **meta)


# ----------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------


def _check_inputs(q, k, v, prefix_k, prefix_v, scale) -> None:
    """Shape/dtype/device rules shared by every impl; messages name the constraint."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    tensors = (q, k, v, prefix_k, prefix_v)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise FastpromptError(f"prefix_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise FastpromptError(f"prefix_attention: {name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise FastpromptError(
            f"prefix_attention: q, k, v must share one shape (B, H, N, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, N, d = q.shape
    if prefix_k.shape != prefix_v.shape:
        raise FastpromptError(
            f"prefix_attention: prefix_k and prefix_v must share one shape (Bp, H, P, d), got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    Bp, Hp, P, dp = prefix_k.shape
    if Bp not in (1, B) or Hp != H or dp != d:
        raise FastpromptError(
            f"prefix_attention: prefix shape must be (1 or B={B}, H={H}, P, d={d}), got {tuple(prefix_k.shape)}; "
            "use batch 1 for a shared prefix or B for a per-sample one"
        )
    if P < 1 or N < 1 or B < 1 or H < 1 or d < 1:
        raise FastpromptError(f"prefix_attention: every dimension must be >= 1, got q {tuple(q.shape)} and prefix {tuple(prefix_k.shape)}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise FastpromptError(f"prefix_attention: q, k, v, prefix_k, prefix_v must share one dtype, got {sorted(map(str, dtypes))}; cast them")
    if q.dtype not in _DTYPES:
        raise FastpromptError(f"prefix_attention: dtype must be float32, bfloat16 or float16, got {q.dtype}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise FastpromptError(f"prefix_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise FastpromptError(f"prefix_attention: scale must be a python float or None, got {type(scale).__name__}")


def _prefix_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides; batch stride 0 broadcasts a shared prefix over the batch."""
    return (0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2))


def _prefix_attention_forward(q, k, v, prefix_k, prefix_v, causal: bool, scale: float):
    """Launch the forward kernel. Returns out (B, H, N, d) and lse (B, H, N), fp32, log2 units."""
    B, H, N, d = q.shape
    P = prefix_k.shape[2]
    if d > _MAX_HEAD_DIM:
        raise FastpromptError(f"prefix_attention: the Triton kernel supports head_dim <= {_MAX_HEAD_DIM}, got {d}; use impl='reference'")
    q, k, v, prefix_k, prefix_v = map(lastdim_contiguous, (q, k, v, prefix_k, prefix_v))
    out = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)  # (B, H, N, d)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)  # (B, H, N)
    args = (
        q, k, v, prefix_k, prefix_v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *out.stride()[:3],
        H, N, P, scale,
    )
    meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal, PRECISION=dot_precision(q.dtype))
    _launch(_prefix_attn_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H), args, **meta)
    return out, lse


def _prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal: bool, scale: float):
    """Launch the three backward kernels. Returns dq, dk, dv, dprefix_k, dprefix_v."""
    B, H, N, d = q.shape
    Bp, _, P, _ = prefix_k.shape
    q, k, v, prefix_k, prefix_v, dout = map(lastdim_contiguous, (q, k, v, prefix_k, prefix_v, dout))
    BLOCK_D = max(16, triton.next_power_of_2(d))
    precision = dot_precision(q.dtype)

    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)  # (B, H, N)
    pre_block = 16 if _INTERPRETED else _PREPROCESS_BLOCK
    _prefix_attn_bwd_preprocess[(triton.cdiv(N, pre_block), B * H)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, N,
        HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_M=pre_block,
    )

    dq = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)  # (B, H, N, d)
    dk = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)  # (B, H, N, d)
    dv = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)  # (B, H, N, d)
    # A shared prefix gets one fp32 partial per sample, summed over the batch below.
    shared = Bp == 1 and B > 1
    part_dtype = torch.float32 if shared else q.dtype
    dpk = torch.empty((B, H, P, d), dtype=part_dtype, device=q.device)  # (B, H, P, d)
    dpv = torch.empty((B, H, P, d), dtype=part_dtype, device=q.device)  # (B, H, P, d)

    meta = dict(HEAD_DIM=d, BLOCK_D=BLOCK_D, CAUSAL=causal, PRECISION=precision)
    common = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *dout.stride()[:3],
    )
    _launch(
        _prefix_attn_bwd_dkdv_kernel, _dkdv_tuned,
        lambda m: (triton.cdiv(P, m["BLOCK_N"]) + triton.cdiv(N, m["BLOCK_N"]), B * H),
        (q, k, v, prefix_k, prefix_v, dout, lse, delta, dk, dv, dpk, dpv, *common,
         *dk.stride()[:3], *dpk.stride()[:3], H, N, P, scale),
        **meta,
    )
    _launch(
        _prefix_attn_bwd_dq_kernel, _dq_tuned,
        lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H),
        (q, k, v, prefix_k, prefix_v, dout, lse, delta, dq, *common, *dq.stride()[:3], H, N, P, scale),
        **meta,
    )
    if shared:
        dpk = dpk.sum(0, keepdim=True).to(q.dtype)  # (1, H, P, d)
        dpv = dpv.sum(0, keepdim=True).to(q.dtype)  # (1, H, P, d)
    return dq, dk, dv, dpk, dpv


def aot_launches(select) -> list:
    """Every kernel a launch compiles, under each shipped config, for the (config, case) pairs
    that `select(configs, axes)` picks (`fastprompt.kernels.aot`). Mirrors the launchers
    above: pointer dtypes, fp32 statistics, the shared prefix's fp32 partials, constexprs."""
    from fastprompt.kernels.aot import Launch, config_label

    def io(case):  # q, k, v, prefix, out and their gradients: the input dtype
        return case["dtype"]

    kernels = (
        ("fwd", _prefix_attn_fwd_kernel, _FWD_CONFIGS, {},
         lambda c: dict.fromkeys(["Q", "K", "V", "PK", "PV", "O"], io(c)) | {"LSE": "fp32"}),
        # A shared prefix writes fp32 per-sample partials, a per-sample prefix its own dtype.
        ("bwd_dkdv", _prefix_attn_bwd_dkdv_kernel, _DKDV_CONFIGS, {"prefix": ("shared", "per-sample")},
         lambda c: dict.fromkeys(["Q", "K", "V", "PK", "PV", "DO", "DK", "DV"], io(c))
         | dict.fromkeys(["DPK", "DPV"], "fp32" if c["prefix"] == "shared" else io(c))
         | {"LSE": "fp32", "DELTA": "fp32"}),
        ("bwd_dq", _prefix_attn_bwd_dq_kernel, _DQ_CONFIGS, {},
         lambda c: dict.fromkeys(["Q", "K", "V", "PK", "PV", "DO", "DQ"], io(c)) | {"LSE": "fp32", "DELTA": "fp32"}),
    )
    axes = {"dtype": ("bf16", "fp16", "fp32"), "head_dim": (32, 64, 80, 128), "causal": (False, True)}
    launches = []
    for name, fn, table, extra_axes, pointers in kernels:
        for (m, n, warps, stages), case in select(table, axes | extra_axes):
            d = case["head_dim"]
            meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=case["causal"],
                        PRECISION="ieee" if case["dtype"] == "fp32" else "tf32", BLOCK_M=m, BLOCK_N=n)
            launches.append(Launch(f"prefix_attention.{name}", fn, pointers(case), ("sm_scale",), meta, warps, stages,
                                   config_label({"BLOCK_M": m, "BLOCK_N": n}, warps, stages), case))
    pre_axes = {"dtype": axes["dtype"], "head_dim": axes["head_dim"]}
    for _config, case in select([(_PREPROCESS_BLOCK,)], pre_axes):
        d = case["head_dim"]
        launches.append(Launch(
            "prefix_attention.bwd_preprocess", _prefix_attn_bwd_preprocess,
            {"O": io(case), "DO": io(case), "DELTA": "fp32"}, (),
            dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=_PREPROCESS_BLOCK), 4, 3,
            config_label({"BLOCK_M": _PREPROCESS_BLOCK}, 4, 3), case,
        ))
    return launches


# ----------------------------------------------------------------------------------------
# Custom ops and their autograd (opaque to torch.compile, so fullgraph traces through them)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastprompt::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _prefix_attention_forward(q, k, v, prefix_k, prefix_v, causal, scale)


@_prefix_attention_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, causal, scale):
    B, H, N, d = q.shape
    return q.new_empty((B, H, N, d)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("fastprompt::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, scale)


@_prefix_attention_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(prefix_k.shape), q.new_empty(prefix_k.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = torch.ops.fastprompt.prefix_attention_bwd(
        dout, q, k, v, prefix_k, prefix_v, out, lse, ctx.causal, ctx.scale
    )
    return dq, dk, dv, dpk, dpv, None, None


_prefix_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function and eager reference
# ----------------------------------------------------------------------------------------


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of q over keys/values `[prefix ; tokens]`, the concatenation never built.

    q, k, v: (B, H, N, d); prefix_k, prefix_v: (1 or B, H, P, d). `causal` hides later
    tokens (never the prefix). `scale` defaults to 1/sqrt(d). `impl`: "auto" (Triton on
    CUDA, reference elsewhere), "triton" or "reference". Returns (B, H, N, d).
    """
    _check_inputs(q, k, v, prefix_k, prefix_v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if resolve_impl(impl, q.device, op="prefix_attention", interpreted=_INTERPRETED) == "reference":
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale)
    out, _lse = torch.ops.fastprompt.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, bool(causal), scale)
    return out


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Eager oracle: concatenate the prefix, then `scaled_dot_product_attention`."""
    B, H, N, d = q.shape
    P = prefix_k.shape[2]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)  # (B, H, P + N, d)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)  # (B, H, P + N, d)
    mask = None
    if causal:
        # query i sees key j iff j < P (prefix) or j - P <= i (token at or before i)
        mask = torch.ones(N, P + N, dtype=torch.bool, device=q.device).tril(diagonal=P)  # (N, P + N)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # (B, H, N, d)
