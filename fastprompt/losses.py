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


def cosine_ce(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale, backend: str) -> torch.Tensor:
    """Mean cross-entropy of `scale · normalize(x) @ normalize(w).T` [B, C] against target.

    Computed in fp32: under bf16 autocast image features arrive in bf16 while cached text
    features are fp32, and the loss of a few-shot batch is too small to be worth less precision."""
    x, w = x.float(), w.float()  # (B, D), (C, D)
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
        logits = scale * (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T)  # (B, B)
        logits = logits.masked_fill(~valid[None, :], float("-inf"))  # (B, B): invalid rows are no negatives
        picked = logits.log_softmax(dim=-1).diagonal()  # (B,): -inf on invalid rows
        picked = torch.where(valid, picked, torch.zeros_like(picked))  # (B,)
        return -picked.sum() / valid.sum().to(picked.dtype)
