"""CoCoOp re-implemented from the published code, the oracle of tests/methods/test_cocoop.py:
KaiyangZhou/CoOp `trainers/cocoop.py` (`PromptLearner`, `TextEncoder`, `CustomCLIP`).

Written as that code runs: the context length from `ctx_init`'s words, the meta-net on the
normalised image feature, the prompts of every image built as `[B, K, 77, w]`, then a loop
over the images, each running its K full 77-token prompts through the text tower
(sequence-first, CLIP's causal mask, pooled at the argmax token) and scoring only its own
image. It runs on an open_clip CLIP's weights (the frozen towers fastprompt uses) in the
dtype of those weights: the released `.half()` casts (PREC "fp16") are left out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import _maple


class PromptLearner(nn.Module):
    """`PromptLearner.__init__` and `forward`, with open_clip's tokenizer for `clip.tokenize`."""

    def __init__(self, clip, tokenizer, classnames: Sequence[str], n_ctx: int, ctx_init: Optional[str]):
        super().__init__()
        n_cls = len(classnames)
        ctx_dim = clip.ln_final.weight.shape[0]
        vis_dim = clip.visual.output_dim
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = len(ctx_init.split(" "))
            prompt = tokenizer([ctx_init])
            with torch.no_grad():
                embedding = clip.token_embedding(prompt)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]
            prompt_prefix = ctx_init
        else:
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ]))
        classnames = [name.replace("_", " ") for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        tokenized_prompts = tokenizer(prompts)  # (n_cls, n_tkn)
        with torch.no_grad():
            embedding = clip.token_embedding(tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :])  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])  # CLS, EOS
        self.n_cls = n_cls
        self.n_ctx = n_ctx
        self.tokenized_prompts = tokenized_prompts

    def construct_prompts(self, ctx, prefix, suffix):
        return torch.cat([prefix, ctx, suffix], dim=1)

    def forward(self, im_features):
        prefix = self.token_prefix
        suffix = self.token_suffix
        ctx = self.ctx  # (n_ctx, ctx_dim)
        bias = self.meta_net(im_features)  # (batch, ctx_dim)
        bias = bias.unsqueeze(1)  # (batch, 1, ctx_dim)
        ctx = ctx.unsqueeze(0)  # (1, n_ctx, ctx_dim)
        ctx_shifted = ctx + bias  # (batch, n_ctx, ctx_dim)
        prompts = []
        for ctx_shifted_i in ctx_shifted:
            ctx_i = ctx_shifted_i.unsqueeze(0).expand(self.n_cls, -1, -1)
            pts_i = self.construct_prompts(ctx_i, prefix, suffix)  # (n_cls, n_tkn, ctx_dim)
            prompts.append(pts_i)
        return torch.stack(prompts)


def text_encoder(clip, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
    """`TextEncoder.forward`: [K, 77, w] prompt embeddings -> features [K, D]."""
    x = prompts + clip.positional_embedding.to(prompts.dtype)
    x = x.permute(1, 0, 2)  # NLD -> LND
    mask = torch.full((x.shape[0], x.shape[0]), float("-inf"), dtype=x.dtype).triu_(1)  # build_attention_mask
    for block in clip.transformer.resblocks:
        x = _maple.block_forward(block, x, attn_mask=mask)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ clip.text_projection


def custom_clip(clip, learner: PromptLearner, image: torch.Tensor, label: Optional[torch.Tensor] = None):
    """`CustomCLIP.forward`: the loss with `label` (training), else the logits [B, K]."""
    logit_scale = clip.logit_scale.exp()
    image_features = _maple.image_features(clip.visual, image, None, [])  # the frozen ViT, as released
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    prompts = learner(image_features)
    logits = []
    for pts_i, imf_i in zip(prompts, image_features):
        text_features = text_encoder(clip, pts_i, learner.tokenized_prompts)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        l_i = logit_scale * imf_i @ text_features.t()
        logits.append(l_i)
    logits = torch.stack(logits)
    if label is not None:
        return F.cross_entropy(logits, label)
    return logits
