"""Losses of every method, on either backend.

All classification-like terms are cosine-logit cross-entropies `CE(scale · x̂ ŵᵀ, target)`:
`backend="fast"` calls the fused kernel (`fastprompt.kernels.cosine_cross_entropy`, Triton on
CUDA), `backend="reference"` its eager reference. Targets are class indices or
probability rows (mixup, eq. 10).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastprompt.kernels import cosine_cross_entropy, cosine_cross_entropy_reference


def loss_dtype(backend: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes in: fp32, or float64 on the reference backend where an input
    is float64.

    Under bf16 autocast image features arrive in bf16 while cached text features are fp32, and
    the loss of a few-shot batch is too small to be worth less precision: never below fp32, the
    fused kernel's precision. A float64 reference model (the tests' oracle, `tests/_util.py`)
    computes its loss in float64, as the rest of its step."""
    dtype = torch.float32
    if backend == "reference":
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def cosine_ce(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale, backend: str) -> torch.Tensor:
    """Mean cross-entropy of `scale · normalize(x) @ normalize(w).T` [B, C] against target,
    computed in `loss_dtype` (fp32; float64 for a float64 reference)."""
    dtype = loss_dtype(backend, x, w)
    x, w = x.to(dtype), w.to(dtype)  # (B, D), (C, D)
    if backend == "fast":
        return cosine_cross_entropy(x, w, target, scale)
    return cosine_cross_entropy_reference(x, w, target, scale)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale, backend: str, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE over a batch: row i of `a` [B, e] must pick row i of `b` [B, e] among all rows.

    `valid` [B] (bool): only these rows count, as anchors and as negatives (E2MIM's mixed rows
    whose pair was not kept), the value of the InfoNCE over the valid rows alone without a
    data-dependent shape. The masked form is eager PyTorch on both backends (the fused kernel
    has no column mask); B is a batch, so its [B, B] logits are small."""
    if valid is None:
        target = torch.arange(a.shape[0], device=a.device)  # (B,)
        return cosine_ce(a, b, target, scale, backend)
    with torch.autocast(a.device.type, enabled=False):  # fp32 throughout, as the fused kernel computes
        dtype = loss_dtype(backend, a, b)
        logits = scale * (F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).T)  # (B, B)
        logits = logits.masked_fill(~valid[None, :], float("-inf"))  # (B, B): invalid rows are no negatives
        picked = logits.log_softmax(dim=-1).diagonal()  # (B,): -inf on invalid rows
        picked = torch.where(valid, picked, torch.zeros_like(picked))  # (B,)
        return -picked.sum() / valid.sum().to(picked.dtype)


def knowledge_gap(w: torch.Tensor, w_clip: torch.Tensor, backend: str) -> torch.Tensor:
    """KgCoOp's `1 - mean_k cos(w_k, w_clip_k)` over the K class features w [K, D] and their frozen
    hand-crafted counterparts w_clip [K, D] (htyao89/KgCoOp trainers/kgcoop.py `CustomCLIP.forward`:
    `CosineSimilarity(dim=1, eps=1e-07)` of the normalised features, `1.0 - torch.mean(score)`),
    computed in `loss_dtype` (fp32; float64 for a float64 reference)."""
    with torch.autocast(w.device.type, enabled=False):
        dtype = loss_dtype(backend, w, w_clip)
        score = F.cosine_similarity(w.to(dtype), w_clip.to(dtype), dim=1, eps=1e-7)  # (K,)
        return 1.0 - score.mean()
