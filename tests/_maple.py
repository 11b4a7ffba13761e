"""MaPLe's prompted CLIP re-implemented from the published code, the oracle of the VPT / IVLP /
MaPLe tests: muzairkhattak/multimodal-prompt-learning `clip/model.py` (`VisionTransformer`,
`VisionTransformer_MaPLe`, `ResidualAttentionBlock_IVLP`, `ResidualAttentionBlock_MaPLe`), `trainers/independentVL.py`
(`TextEncoder`, `VLPromptLearner`, `CustomCLIP`) and `trainers/maple.py` (`MultiModalPromptLearner`,
whose `TextEncoder` and `CustomCLIP` run the same functions with the compound prompts).

Written as that code runs: sequence-first tensors (LND), prompts appended *after* the patch
tokens and before `ln_pre`, the prompts of layer i > 0 replacing the last n tokens (image) or
positions 1..n (text) before the block, a block `x + attn(ln_1(x))`, `x + mlp(ln_2(x))` with
`nn.MultiheadAttention`'s sequence-first function. It runs on an open_clip CLIP's weights
(the same frozen towers as fastprompt's), in fp32: the released code's `.half()` casts of the
prompts are left out (fastprompt computes in fp32 / bf16, never fp16).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def with_random_layernorms(clip, seed: int = 5):
    """A copy of `clip` with random LayerNorm affines, so that what ln_pre does to a prompt is
    not a plain standardisation that another placement could happen to match."""
    clip = copy.deepcopy(clip)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in clip.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
    return clip


def block_forward(block, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`ResidualAttentionBlock.forward` on x [L, N, d] (sequence first), CLIP's weights."""
    attn = block.attn
    y = block.ln_1(x)
    a, _ = F.multi_head_attention_forward(
        y, y, y, y.shape[-1], attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False, attn_mask=attn_mask)
    x = x + a
    return x + block.mlp(block.ln_2(x))


def image_features(visual, images: torch.Tensor, first: Optional[torch.Tensor], deeper: Sequence[torch.Tensor]
                   ) -> torch.Tensor:
    """`VisionTransformer.forward` (VPT / IVLP; `VisionTransformer_MaPLe` is the same with
    `first` = shared_ctx and `deeper` = the compound prompts): image features [B, D].

    first: [n, d] `self.VPT`, appended before ln_pre (None: `vision_depth` 0); deeper: the
    `VPT_shallow` [n, d] of blocks 1, 2, ... (`prompts_needed > i`), each replacing the last n tokens."""
    x = visual.conv1(images)  # shape = [*, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # shape = [*, grid ** 2, width]
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([visual.class_embedding.to(x.dtype) + zeros, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    if first is not None:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)  # after the patches, before ln_pre
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(visual.transformer.resblocks):
        if i > 0 and i - 1 < len(deeper):
            n = deeper[i - 1].shape[0]
            prefix = x[0 : x.shape[0] - n]  # drop what the previous layer wrote into the prompts
            x = torch.cat([prefix, deeper[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2)], dim=0)
        x = block_forward(block, x)
    x = x.permute(1, 0, 2)  # LND -> NLD
    return visual.ln_post(x[:, 0, :]) @ visual.proj


def text_features(clip, prompts: torch.Tensor, tokenized: torch.Tensor, deeper: Sequence[torch.Tensor]) -> torch.Tensor:
    """`TextEncoder.forward` with `ResidualAttentionBlock_IVLP` / `_MaPLe` text layers: features [K, D].

    prompts: [K, 77, w] `[SOS, ctx, suffix]` embeddings; deeper: the [n, w] prompts of blocks
    1, 2, ..., each replacing positions 1..n before its block."""
    x = prompts + clip.positional_embedding
    x = x.permute(1, 0, 2)  # NLD -> LND
    mask = torch.empty(x.shape[0], x.shape[0]).fill_(float("-inf")).triu_(1)  # build_attention_mask
    for i, block in enumerate(clip.transformer.resblocks):
        if i > 0 and i - 1 < len(deeper):
            n = deeper[i - 1].shape[0]
            prefix, suffix = x[:1], x[1 + n :]
            x = torch.cat([prefix, deeper[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2), suffix], dim=0)
        x = block_forward(block, x, attn_mask=mask)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip.text_projection


def prompt_learner(clip, tokenizer, classnames: Sequence[str], n_ctx: int, ctx_init: Optional[str]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`VLPromptLearner.__init__` / `MultiModalPromptLearner.__init__`: (initial ctx [n, w],
    token_prefix [K, 1, w], token_suffix [K, 77-1-n, w], tokenized [K, 77]). With ctx_init and n_ctx <= 4 the context starts as the
    phrase's first n_ctx token embeddings and the *whole* phrase is the prompt prefix, so the
    words after the n_ctx-th stay in every prompt; otherwise N(0, 0.02) and "X X ...".
    """
    if ctx_init and n_ctx <= 4:
        ctx_init = ctx_init.replace("_", " ")
        with torch.no_grad():
            embedding = clip.token_embedding(tokenizer([ctx_init]))
        ctx = embedding[0, 1 : 1 + n_ctx, :]
        prompt_prefix = ctx_init
    else:
        ctx = torch.empty(n_ctx, clip.token_embedding.weight.shape[1]).normal_(0.0, 0.02)
        prompt_prefix = " ".join(["X"] * n_ctx)
    names = [name.replace("_", " ") for name in classnames]
    tokenized = tokenizer([prompt_prefix + " " + name + "." for name in names])  # (n_cls, n_tkn)
    with torch.no_grad():
        embedding = clip.token_embedding(tokenized)
    return ctx, embedding[:, :1, :], embedding[:, 1 + n_ctx :, :], tokenized


def logits(clip, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """`CustomCLIP.forward` in eval: logit_scale.exp() · normalised image @ normalised text ᵀ."""
    image_feats = image_feats / image_feats.norm(dim=-1, keepdim=True)
    text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image_feats @ text_feats.t()


def maple_prompts(ctx: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor, proj, compound_prompts_text,
                  compound_prompt_projections):
    """`MultiModalPromptLearner.forward` (trainers/maple.py): (prompts [K, 77, w], shared_ctx =
    proj(ctx) [n, dv], compound_prompts_text, visual_deep_prompts = [layer_i(text_i)])."""
    ctx_k = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
    prompts = torch.cat([prefix, ctx_k, suffix], dim=1)
    visual_deep_prompts = []
    for index, layer in enumerate(compound_prompt_projections):
        visual_deep_prompts.append(layer(compound_prompts_text[index]))
    return prompts, proj(ctx), compound_prompts_text, visual_deep_prompts
