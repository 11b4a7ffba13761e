"""The frozen CLIP text tower run on token *embeddings*, so learnable context can enter it.

CLIP's text transformer is causal and pools at the EOT token, so the tokens after the
longest EOT of a batch never influence any feature. `backend="fast"` runs the tower on
sequences cut to `max_eot + 1` positions instead of the full 77; `backend="reference"`
runs the full context length with CLIP's own mask, exactly as `encode_text` does. Both give
the same features (tested).

`encode_shared_prefix` is the fast path of CoOp's generic context: every class prompt
starts with the same `[SOS, u_1..u_M]`, and causality means those positions' hidden states
are the same for every class. They run once (one sequence of 1 + M positions); each class
suffix (name, ".", EOT) attends to their keys and values through
`prefix_attention(..., causal=True)`. Exact: equal to running every full prompt.

`encode_prefix_groups` generalises it to G prefixes, each shared by the K prompts of its
group: CoCoOp's instance-conditioned context, one prefix `[SOS, u + π(x_b)]` per image.

Deep text prompts (MaPLe's `ResidualAttentionBlock_IVLP` / `_MaPLe` text layers,
muzairkhattak/multimodal-prompt-learning `clip/model.py`): `deep` [J-1, M, width] holds the
context of layers 2..J; before each of those layers positions 1..M of every prompt are
overwritten with it (no positional embedding: they enter inside the tower). Above layer J
the context positions carry what layer J wrote, as ordinary tokens. Both functions take it;
on the shared-prefix path the overwrite touches the one shared prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from open_clip import CLIP

from fastprompt.settings import BACKENDS  # noqa: F401  (torch-free home: the CLI checks it first)
from fastprompt.kernels import prefix_attention


def tokenize(clip: CLIP, tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [K, context_length] on the model's device; EOT is the largest id of each row."""
    tokens = tokenizer(texts)  # (K, 77)
    return tokens.to(clip.token_embedding.weight.device)


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the EOT token of each row (OpenAI BPE: the largest id)."""
    return tokens.argmax(dim=-1)  # (K,)


def encode_embeddings(clip: CLIP, x: torch.Tensor, eot: torch.Tensor, backend: str = "fast",
                      length: Optional[int] = None, deep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text features [K, D] (not normalised) of prompt embeddings x [K, L, width] pooled at `eot` [K].

    `x` holds token embeddings *without* positional embeddings; L is CLIP's context length.
    `length` = max(eot) + 1 when the caller knows it (no tensor read inside a compiled step).
    `deep` [J-1, M, width]: the context of layers 2..J, written over positions 1..M (or
    [K, J-1, M, width]: each row's own, packed runs' contexts).
    """
    if backend == "fast":
        length = int(eot.max()) + 1 if length is None else length  # CPU-GPU sync when not given
        x = x[:, :length]  # (K, length, width)
    else:
        length = x.shape[1]
    x = x + clip.positional_embedding[:length].to(x.dtype)  # (K, L, width)
    mask = clip.attn_mask[:length, :length]  # (L, L)
    if deep is None:
        x = clip.transformer(x, attn_mask=mask)  # (K, L, width)
    else:
        _check_deep(clip, deep)
        for layer, block in enumerate(clip.transformer.resblocks):
            if 0 < layer <= deep.shape[-3]:
                x = _overwrite_context(x, deep[..., layer - 1, :, :])  # (K, L, width)
            x = block(x, attn_mask=mask)  # (K, L, width)
    x = clip.ln_final(x)  # (K, L, width)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (K, width)
    return _project(clip, x)  # (K, D)


def _check_deep(clip: CLIP, deep: torch.Tensor) -> None:
    if deep.dim() not in (3, 4):
        raise ValueError(f"deep text prompts must be (J-1, M, width) or one per row/group (R, J-1, M, width); got {tuple(deep.shape)}")
    if deep.shape[-3] >= len(clip.transformer.resblocks):
        raise ValueError(f"deep text prompts for {deep.shape[-3] + 1} layers, the text tower has {len(clip.transformer.resblocks)}")


def _overwrite_context(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """x [K, L, width] with positions 1..M replaced by `context` [M, width] (the same for every row)
    or [K, M, width] (each row's own)."""
    m = context.shape[-2]
    context = context.to(x.dtype).expand(x.shape[0], -1, -1)  # (K, M, width)
    return torch.cat([x[:, :1], context, x[:, 1 + m :]], dim=1)  # (K, L, width)


def _project(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    if isinstance(clip.text_projection, torch.nn.Linear):
        return clip.text_projection(x)  # (K, D)
    return x @ clip.text_projection  # (K, D)


def encode_shared_prefix(clip: CLIP, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor,
                         length: Optional[int] = None, deep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text features [K, D] of prompts `cat([prefix, suffix_k])` with one shared prefix.

    prefix: [P, width] (SOS + context, and any words shared by every prompt) shared by all K
    prompts; suffix: [K, L - P, width] (class tokens, ".", EOT, padding); eot: [K] EOT
    positions in the full prompt (>= P); length: max(eot) + 1 when the caller knows it;
    deep: [J-1, M, width] the context of layers 2..J, written over positions 1..M (M < P);
    `encode_prefix_groups` also takes [G, J-1, M, width], each group's own (packed runs).
    """
    return encode_prefix_groups(clip, prefix.unsqueeze(0), suffix, eot, length, deep)[0]  # (K, D)


def encode_prefix_groups(clip: CLIP, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor,
                         length: Optional[int] = None, deep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text features [G, K, D] of the G·K prompts `cat([prefix_g, suffix_k])`: G prefixes, each
    shared by the K prompts of its group (G = 1: `encode_shared_prefix`; CoCoOp: one prefix
    `[SOS, u + π(x_b)]` per image b).

    prefix: [G, P, width]; suffix: [K, L - P, width]; eot, length, deep as in
    `encode_shared_prefix`. Each group's prefix runs once (G sequences of P positions); the
    G·K suffixes attend to their group's prefix keys and values through
    `prefix_attention(..., causal=True)` (a per-sample prefix: the group's repeated K times
    when G > 1, broadcast when G = 1). Exact: equal to running every full prompt.
    """
    n_groups, n_prefix, width = prefix.shape
    if deep is not None:
        _check_deep(clip, deep)
        if deep.shape[-2] >= n_prefix:
            raise ValueError(f"deep text prompts of {deep.shape[-2]} tokens do not fit a shared prefix of {n_prefix} positions")
    length = int(eot.max()) + 1 if length is None else length  # CPU-GPU sync when not given
    pos = clip.positional_embedding.to(prefix.dtype)  # (77, width)
    xp = prefix + pos[:n_prefix]  # (G, P, width)
    xs = suffix[:, : length - n_prefix] + pos[n_prefix:length]  # (K, T, width)
    n_cls, t_len, _ = xs.shape
    xs = xs.repeat(n_groups, 1, 1)  # (G·K, T, width): row g·K + k is prompt (g, k)
    n_rows = n_groups * n_cls
    for layer, block in enumerate(clip.transformer.resblocks):
        if deep is not None and 0 < layer <= deep.shape[-3]:
            xp = _overwrite_context(xp, deep[..., layer - 1, :, :])  # (G, P, width): once per group
        attn = block.attn
        heads = attn.num_heads
        hd = width // heads
        w, b = attn.in_proj_weight, attn.in_proj_bias  # (3w, w), (3w,)
        qp, kp, vp = F.linear(block.ln_1(xp), w, b).view(n_groups, n_prefix, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (G, H, P, hd) each
        qs, ks, vs = F.linear(block.ln_1(xs), w, b).view(n_rows, t_len, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (G·K, H, T, hd) each
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (G, H, P, hd): each prefix, once
        if n_groups > 1:  # each prompt's own prefix: its group's
            kp, vp = kp.repeat_interleave(n_cls, dim=0), vp.repeat_interleave(n_cls, dim=0)  # (G·K, H, P, hd)
        os_ = prefix_attention(qs, ks, vs, kp, vp, causal=True)  # (G·K, H, T, hd): every suffix over its prefix
        xp = xp + block.ls_1(attn.out_proj(op.transpose(1, 2).reshape(n_groups, n_prefix, width)))  # (G, P, width)
        xs = xs + block.ls_1(attn.out_proj(os_.transpose(1, 2).reshape(n_rows, t_len, width)))  # (G·K, T, width)
        xp = xp + block.ls_2(block.mlp(block.ln_2(xp)))
        xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
    pooled = xs[torch.arange(n_rows, device=xs.device), (eot - n_prefix).repeat(n_groups)]  # (G·K, width): EOT lies in the suffix
    return _project(clip, clip.ln_final(pooled)).view(n_groups, n_cls, -1)  # (G, K, D)


def encode_tokens(clip: CLIP, tokens: torch.Tensor, backend: str = "fast") -> torch.Tensor:
    """Features [K, D] of token ids [K, 77]; equals `clip.encode_text(tokens)`."""
    x = clip.token_embedding(tokens)  # (K, 77, width)
    return encode_embeddings(clip, x, eot_positions(tokens), backend)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
