"""The frozen CLIP ViT with visual prompts: VPT-shallow, VPT-deep and per-sample prompts.

Token order inside every layer is `[cls, prompt slots, patches]` (the CAVPT paper's eqs. 4-6).
Where layer 1's prompts join the sequence is the `placement`:
- "after-ln-pre": after the patch embedding, positional embedding and `ln_pre`: they are
  tokens of the residual stream, not of the input image (fanrena/DPT, the CAVPT authors' code);
- "before-ln-pre": after the positional embedding and before `ln_pre`, which normalises them
  with the image tokens (muzairkhattak/multimodal-prompt-learning `clip/model.py`,
  `VisionTransformer.forward`: MaPLe's VPT, IVLP and MaPLe). `ln_pre` acts on each token
  alone, so this equals the first placement with layer 1's prompts mapped through `ln_pre`,
  which is how both backends compute it. Prompts of the later layers never pass `ln_pre`.

- shallow: P prompts are inserted before layer 1 and carried through every layer as
  ordinary tokens (eqs. 4-5).
- deep: before layer l the prompt slots are overwritten with the learnable P_l; what a
  layer writes into the slots is discarded (eq. 6).
- per-sample prompts (CAVPT's class-aware prompts): a callback returns extra slots for a
  layer from that layer's input tokens (cls + patches); they sit after the deep prompts
  and are discarded after the layer like them.
- deep prompts may cover only the first L_d <= L layers. Above them the slots are either
  dropped (`carry=False`): the layers after them carry only the per-sample prompts the
  callback returns (CAVPT `released`: VPT-deep prompts in layers 1..L-1, the class-aware
  prompts alone in the last), or none at all; or kept (`carry=True`): what layer L_d writes
  into them is carried through the layers above as ordinary tokens (MaPLe's
  `ResidualAttentionBlock_IVLP` above PROMPT_DEPTH_VISION). Shallow prompts are deep
  prompts of L_d = 1 layer, carried.

MaPLe appends its prompts after the patches (`[cls, patches, prompts]`); self-attention is
permutation-equivariant and the prompts carry no positional embedding, so the class token's
output is the same function of the same tokens.

Two backends compute the same function:
- `reference`: concatenates the slots into the sequence (`torch.cat`) and calls CLIP's own
  `ResidualAttentionBlock` (nn.MultiheadAttention): the plain oracle.
- `fast`: for deep prompts, the slots never join the sequence. Their LayerNorm and K/V
  projection run once per step on P rows (shared by the batch); the image tokens attend
  to them through `prefix_attention`; the slots get no query rows, no output projection
  and no MLP, since their outputs are discarded. A layer with per-sample prompts only
  attends to that (B, Kn) prefix alone, through the same kernel; a layer with no slots
  runs the ordinary block. Carried prompts are real tokens from the last deep layer on
  (for shallow prompts: every layer) and run the ordinary block.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from fastprompt.settings import PLACEMENTS  # noqa: F401  where layer 1's visual prompts join the sequence (module docstring)
from fastprompt.kernels import prefix_attention

# layer index, layer input tokens (B, N, d) -> per-sample prompts (B, Kn, d) or None
ExtraPrompts = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


def embed(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch + class embedding, positional embedding and ln_pre: tokens [B, 1 + Np, d]."""
    x = visual.conv1(images)  # (B, d, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, Np, d)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, d)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, N, d)
    return visual.ln_pre(x)  # (B, N, d)


def head(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Image feature `ln_post(s_L) @ proj` from the last layer's tokens [B, *, d]."""
    pooled = visual.ln_post(x[:, 0])  # (B, d)
    return pooled @ visual.proj if visual.proj is not None else pooled  # (B, D)


def encode(
    visual: VisionTransformer,
    images: torch.Tensor,
    *,
    shallow: Optional[torch.Tensor] = None,
    deep: Optional[torch.Tensor] = None,
    extra: Optional[ExtraPrompts] = None,
    carry: bool = False,
    placement: str = "after-ln-pre",
    backend: str = "fast",
) -> torch.Tensor:
    """Image features [B, D] (not normalised) of `images` [B, 3, H, W] with visual prompts.

    shallow: [P, d] carried prompts (the same as deep=shallow[None], carry=True); deep:
    [L_d, P, d] prompts of the first L_d <= L layers (L_d = L: every layer); carry: keep the
    slots as tokens above layer L_d instead of dropping them; extra: callback for per-sample
    prompts (needs `deep`, not `carry`); placement: where layer 1's prompts enter (PLACEMENTS).
    With no prompts this equals `visual(images)`; a non-ViT tower (ResNet CLIP) takes no
    prompts and runs as `visual(images)`.

    Packed runs (`fastprompt.training.pack`): shallow [G, P, d] or deep [G, L_d, P, d] hold the
    prompts of G runs, and the B images are G equal groups of consecutive rows, group g
    prompted by run g's prompts (row g·B/G + i: run g's image i); each group's features equal
    those of its own run's prompts alone.
    """
    if not isinstance(visual, VisionTransformer):  # a ResNet CLIP: no prompts, no fast path of its own
        if shallow is not None or deep is not None or extra is not None:
            raise ValueError(f"visual prompts need a ViT image tower, not a {type(visual).__name__}")
        return visual(images)  # (B, D)
    deep, carry = _check_prompts(visual, shallow, deep, extra, carry, placement, batch=images.shape[0])
    n_deep = deep.shape[-3] if deep is not None else 0  # layers with deep prompts: the first n_deep
    blocks = visual.transformer.resblocks

    x = embed(visual, images)  # (B, N, d)
    if deep is not None and backend == "fast":
        for layer, block in enumerate(blocks):
            tokens_extra = extra(layer, x) if extra is not None else None  # (B, Kn, d) or None
            shared = deep[..., layer, :, :] if layer < n_deep else None  # (P, d), (G, P, d) or None
            if carry and layer == n_deep - 1:  # the last deep layer's slots stay: real tokens from here on
                x = block(_insert(x, shared))  # (B, 1+P+Np, d)
            elif shared is None and tokens_extra is None:
                x = block(x)  # (B, N, d): a layer without prompt slots (or with carried ones)
            else:
                x = prefix_block(block, x, shared, tokens_extra)  # (B, N, d)
        return head(visual, x)

    n_slots = 0
    for layer, block in enumerate(blocks):
        if deep is not None and (layer < n_deep or not carry):
            x, n_slots = _replace_slots(x, n_slots, layer, deep, extra)  # (B, 1+P+Kn+Np, d)
        x = block(x)
    return head(visual, x)


def _check_prompts(visual: VisionTransformer, shallow: Optional[torch.Tensor], deep: Optional[torch.Tensor],
                   extra: Optional[ExtraPrompts], carry: bool, placement: str,
                   batch: Optional[int] = None) -> tuple[Optional[torch.Tensor], bool]:
    """Validate the prompt arguments of `encode` / `class_attention`; returns (deep, carry) with
    shallow prompts as one carried deep layer and layer 1's prompts mapped through `ln_pre`
    when they enter before it. Prompts of G packed runs ([G, P, d] shallow, [G, L_d, P, d]
    deep) need a batch of `batch` images that splits into G equal groups."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: pick one of {', '.join(PLACEMENTS)}")
    if shallow is not None and (deep is not None or extra is not None):
        raise ValueError("shallow prompts cannot be combined with deep or per-sample prompts")
    if extra is not None and deep is None:
        raise ValueError("per-sample prompts need deep prompts (their slots are replaced every layer)")
    if extra is not None and carry:
        raise ValueError("per-sample prompts cannot be combined with carried prompts (their slots are dropped after each layer)")
    if shallow is not None:
        deep, carry = shallow.unsqueeze(-3), True  # (1, P, d) or (G, 1, P, d)
    if deep is not None and deep.dim() not in (3, 4):
        raise ValueError(f"deep prompts must be (L_d, P, d) or, for G packed runs, (G, L_d, P, d); got {tuple(deep.shape)}")
    if deep is not None and deep.dim() == 4 and batch is not None and batch % deep.shape[0]:
        raise ValueError(f"{batch} images do not split into the {deep.shape[0]} packed runs' equal groups")
    n_layers = len(visual.transformer.resblocks)
    if deep is not None and deep.shape[-3] > n_layers:
        raise ValueError(f"deep prompts have {deep.shape[-3]} layers, the tower has {n_layers}")
    carry = carry and deep is not None and deep.shape[-3] < n_layers  # prompts in every layer: nothing above to carry to
    if deep is not None and deep.shape[-3] > 0 and placement == "before-ln-pre":
        # MaPLe: layer 1's prompts are appended before ln_pre, which normalises each token alone
        deep = torch.cat([visual.ln_pre(deep[..., :1, :, :]), deep[..., 1:, :, :]], dim=-3)  # (.., L_d, P, d)
    return deep, carry


def _per_image(prompts: torch.Tensor, batch: int) -> torch.Tensor:
    """Prompts [P, d] of every image, or [G, P, d] of G packed runs (each of B/G consecutive
    images), as rows [B, P, d]."""
    if prompts.dim() == 2:
        return prompts.expand(batch, -1, -1)  # (B, P, d)
    return prompts.repeat_interleave(batch // prompts.shape[0], dim=0)  # (B, P, d): run g's in rows g·B/G ..


def _insert(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Prompts [P, d] (or [G, P, d] of packed runs) between the class token and the patches of x [B, N, d] (as tokens)."""
    return torch.cat([x[:, :1], _per_image(prompts.to(x.dtype), x.shape[0]), x[:, 1:]], dim=1)  # (B, 1+P+Np, d)


def _replace_slots(x: torch.Tensor, n_slots: int, layer: int, deep: torch.Tensor,
                   extra: Optional[ExtraPrompts]) -> tuple[torch.Tensor, int]:
    """Reference path: the input of deep layer `layer`, [cls, P_layer, per-sample prompts, patches],
    from x = [cls, n_slots old slots, patches] [B, *, d]; returns it and its slot count."""
    batch = x.shape[0]
    cls, patches = x[:, :1], x[:, 1 + n_slots :]  # (B, 1, d), (B, Np, d)
    slots = [_per_image(deep[..., layer, :, :].to(x.dtype), batch)] if layer < deep.shape[-3] else []  # [(B, P, d)]: deep prompts in the first layers
    if extra is not None:
        tokens_extra = extra(layer, torch.cat([cls, patches], dim=1))
        if tokens_extra is not None:
            slots.append(tokens_extra)  # (B, Kn, d)
    x = torch.cat([cls, *slots, patches], dim=1)  # (B, 1+P+Kn+Np, d)
    return x, x.shape[1] - cls.shape[1] - patches.shape[1]


@torch.no_grad()
def class_attention(
    visual: VisionTransformer,
    images: torch.Tensor,
    *,
    shallow: Optional[torch.Tensor] = None,
    deep: Optional[torch.Tensor] = None,
    extra: Optional[ExtraPrompts] = None,
    carry: bool = False,
    placement: str = "after-ln-pre",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [B, D], last-layer class-token attention over patches [B, Np]).

    Runs the reference path (the same function as `encode`, for figures, not training). The
    attention is the last block's softmax(q kᵀ / sqrt(hd)) row of the class token, averaged
    over heads (what nn.MultiheadAttention returns with average_attn_weights=True), kept on
    the patch columns and renormalised to sum to one: prompt slots are not image regions,
    and the share of attention they take differs between models. Patches in raster order.
    """
    deep, carry = _check_prompts(visual, shallow, deep, extra, carry, placement, batch=images.shape[0])
    n_deep = deep.shape[-3] if deep is not None else 0
    blocks = visual.transformer.resblocks
    x = embed(visual, images)  # (B, N, d)
    n_slots = 0
    weights = None
    for layer, block in enumerate(blocks):
        if deep is not None and (layer < n_deep or not carry):
            x, n_slots = _replace_slots(x, n_slots, layer, deep, extra)  # (B, 1+S+Np, d)
        if layer == len(blocks) - 1:
            y = block.ln_1(x)  # (B, T, d)
            _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)  # (B, T, T)
        x = block(x)  # (B, T, d)
    row = weights[:, 0, 1 + n_slots :]  # (B, Np): class-token query, patch keys
    return head(visual, x), row / row.sum(-1, keepdim=True)  # (B, D), (B, Np)


def prefix_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    shared: Optional[torch.Tensor],
    per_sample: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One CLIP block for the kept tokens x [B, N, d] with discarded prompt slots as a K/V prefix.

    shared: [P, d] prompts of every image, [G, P, d] prompts of G packed runs (each of B/G
    consecutive images), or None; per_sample: [B, Kn, d] or None (not both None). Equals
    running the block on `cat([x[:, :1], shared, per_sample, x[:, 1:]])` and dropping the slot
    outputs (self-attention is permutation-equivariant; the slots' rows are never used).
    """
    if shared is None and per_sample is None:
        raise ValueError("prefix_block needs shared or per-sample prompts; run the block itself without them")
    attn = block.attn
    batch, n, width = x.shape
    heads = attn.num_heads
    hd = width // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias  # (3d, d), (3d,)

    qkv = F.linear(block.ln_1(x), w, b)  # (B, N, 3d)
    q, k, v = qkv.view(batch, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)

    kv_w, kv_b = w[width:], (b[width:] if b is not None else None)  # (2d, d), (2d,)
    pk = pv = None
    if shared is not None:
        groups = 1 if shared.dim() == 2 else shared.shape[0]  # packed runs: one prefix each
        prefix = F.linear(block.ln_1(shared.to(x.dtype)), kv_w, kv_b)  # (P, 2d) or (G, P, 2d): once per step, not per image
        pk, pv = prefix.view(groups, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)  # each (G, H, P, hd)
        if groups > 1:  # each image's own run's prefix
            pk, pv = pk.repeat_interleave(batch // groups, dim=0), pv.repeat_interleave(batch // groups, dim=0)  # (B, H, P, hd)
    if per_sample is not None:
        extra = F.linear(block.ln_1(per_sample), kv_w, kv_b)  # (B, Kn, 2d)
        ek, ev = extra.view(batch, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, Kn, hd)
        if pk is None:  # per-sample prompts alone (CAVPT released, its last layers)
            pk, pv = ek, ev  # (B, H, Kn, hd)
        else:
            pk = torch.cat([pk.expand(batch, -1, -1, -1), ek], dim=2)  # (B, H, P+Kn, hd): P+Kn rows only
            pv = torch.cat([pv.expand(batch, -1, -1, -1), ev], dim=2)  # (B, H, P+Kn, hd)

    o = prefix_attention(q, k, v, pk, pv)  # (B, H, N, hd)
    o = o.transpose(1, 2).reshape(batch, n, width)  # (B, N, d)
    x = x + block.ls_1(attn.out_proj(o))  # (B, N, d)
    return x + block.ls_2(block.mlp(block.ln_2(x)))  # (B, N, d)
