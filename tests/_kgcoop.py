"""KgCoOp re-implemented from the published code, the oracle of tests/methods/test_kgcoop.py:
htyao89/KgCoOp `KgCoOp/trainers/kgcoop.py` (`PromptLearner`, `CustomCLIP`, `KgCoOp.forward_backward`).

Written as that code runs: any CTX_INIT replaced by "a photo of a" (its 4 tokens the context,
shared even with CSC), else N_CTX random vectors (class-specific with CSC); the full 77-token
prompts `cat([SOS, ctx, suffix])` of every class through the text tower (`TextEncoder`: the
same as CoCoOp's, `_cocoop.text_encoder`); the frozen features of `CUSTOM_TEMPLATES[dataset]`
from `encode_text` (token embedding, the same tower, `ln_final`, the argmax token, projection),
normalised; `CustomCLIP.forward`'s logits and `score = 1 - mean(CosineSimilarity(dim=1,
eps=1e-07)(text_features, text_features_old))` on normalised features; `forward_backward`'s
`F.cross_entropy(output, label) + w * score`. It runs on an open_clip CLIP's weights in their
dtype: the released fp16 casts (PREC "fp16", its second fp16 CLIP) are left out.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import _cocoop
import _maple


class PromptLearner(nn.Module):
    """`PromptLearner.__init__` and `forward`, with open_clip's tokenizer for `clip.tokenize`
    (the unused `bias_vectors` and `meta_net` left out: frozen, never read)."""

    def __init__(self, clip, tokenizer, classnames: Sequence[str], template: str, n_ctx: int, ctx_init, csc: bool):
        super().__init__()
        n_cls = len(classnames)
        ctx_dim = clip.ln_final.weight.shape[0]
        if ctx_init:
            temp = 'a photo of a'
            ctx_init = temp.replace("_", " ")
            n_ctx = len(ctx_init.split(" "))
            prompt = tokenizer([ctx_init])
            with torch.no_grad():
                embedding = clip.token_embedding(prompt)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]
            prompt_prefix = ctx_init
        else:
            if csc:
                ctx_vectors = torch.empty(n_cls, n_ctx, ctx_dim)
            else:
                ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        classnames = [name.replace("_", " ") for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        self.template = template
        self.classnames = classnames
        tokenized_prompts = tokenizer(prompts)
        with torch.no_grad():
            embedding = clip.token_embedding(tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :])  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])  # CLS, EOS
        self.n_cls = n_cls
        self.n_ctx = n_ctx
        self.tokenized_prompts = tokenized_prompts

    def forward(self):
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


@torch.no_grad()
def text_features_old(clip, tokenizer, learner: PromptLearner) -> torch.Tensor:
    """`prompts_ = [temp.format(c.replace("_", " ")) for c in classnames]` through `encode_text`, normalised."""
    tokens = tokenizer([learner.template.format(c) for c in learner.classnames])
    text_features = _cocoop.text_encoder(clip, clip.token_embedding(tokens), tokens)
    return text_features / text_features.norm(dim=-1, keepdim=True)


def custom_clip(clip, learner: PromptLearner, ori_embedding: torch.Tensor, image: torch.Tensor):
    """`CustomCLIP.forward`: (logits [B, K], score)."""
    prompts = learner()
    image_features = _maple.image_features(clip.visual, image, None, [])  # the frozen ViT, as released
    text_features = _cocoop.text_encoder(clip, prompts, learner.tokenized_prompts)
    text_features_old = ori_embedding
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logit_scale = clip.logit_scale.exp()
    logits = logit_scale * image_features @ text_features.t()
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
    text_features_old = text_features_old / text_features_old.norm(dim=-1, keepdim=True)
    score = cos(text_features, text_features_old)
    score = 1.0 - torch.mean(score)
    return logits, score


def forward_backward_loss(clip, learner: PromptLearner, ori_embedding: torch.Tensor, image: torch.Tensor,
                          label: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`KgCoOp.forward_backward` (PREC fp16/fp32 branch): (loss, logits)."""
    output, score = custom_clip(clip, learner, ori_embedding, image)
    loss = F.cross_entropy(output, label) + w * score
    return loss, output
