"""CoCoOp: conditional context optimisation (Zhou et al., "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022).

What KaiyangZhou/CoOp `trainers/cocoop.py` computes (`PromptLearner`, `CustomCLIP`):
- x_b = f(image_b) / |f(image_b)|: the frozen image tower's *normalised* feature [B, D];
- π(x_b) = linear2(relu(linear1(x_b))): the meta-net `meta`, Linear(D, D // 16) -> ReLU ->
  Linear(D // 16, w), D the image tower's output dimension (`visual.output_dim`), w the text
  width (`ln_final`'s);
- the prompt of class k for image b: `[SOS, u_1 + π(x_b), ..., u_M + π(x_b), CLASS_k tokens,
  ".", EOS]`: one bias added to every context token (`ctx_shifted = ctx + bias`);
- logits_bk = τ cos(x_b, g(prompt_bk)): each image against its own K class prompts;
  `L = CE(logits, y)`.
Context initialisation as released: with `ctx_init` the context length M is the phrase's word
count (`n_ctx = len(ctx_init.split(" "))`, after `_` -> space), its first M token embeddings
initialise u and any further tokens of the phrase (a word of several BPE tokens) stay in the
prompt (`token_suffix = embedding[:, 1 + n_ctx:]`); without it, M = `n_ctx` N(0, 0.02) vectors.
The meta-net starts as PyTorch's Linear default, as released.

Defaults (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml, the config of
scripts/cocoop/base2new_train.sh and xd_train.sh): N_CTX 4, CTX_INIT "a photo of a"; OPTIM
sgd, LR 0.002, WARMUP_EPOCH 1 (constant, WARMUP_CONS_LR 1e-5), cosine over MAX_EPOCH 10, batch
1; one optimiser for the context and the meta-net (here the `text` and `meta` groups, with
the same recipe).

Fast path: the released code runs the text tower once per image on K prompts of 77 tokens;
here the B prefixes `[SOS, u + π(x_b)]` run once each and all B·K class suffixes in one pass,
EOS-truncated, attending to their own image's prefix (`CoopContext.conditioned`,
`fastprompt.models.text.encode_prefix_groups`), at any batch size; at most
`PROMPTS_PER_PASS` prompts per pass (evaluation of many classes at a large batch).

Where fastprompt differs: fp32 / bf16 instead of the released fp16 (PREC "fp16": CLIP and the
meta-net `.half()`); any batch size (the released recipe trains at batch 1); an `n_ctx` given
with a `ctx_init` of another word count is refused (the released code ignores N_CTX then);
`csc` is refused (CoCoOp's context is shared).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.losses import loss_dtype
from fastprompt.methods.base import PromptModel
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import N_CTX, CocoopConfig, context_words
from fastprompt.prompts.coop import CoopContext

PROMPTS_PER_PASS = 4096  # B·K prompts per text-tower pass at most (ImageNet's 1000 classes: 4 images a pass)


class MetaNet(nn.Sequential):
    """π: Linear(D, D // 16) -> ReLU -> Linear(D // 16, w), named as released (`meta_net`)."""

    def __init__(self, vis_dim: int, ctx_dim: int):
        super().__init__(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU()),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ]))


@register_method("cocoop")  # options, groups (text, meta), frozen image tower (π reads its features): methods.specs
class Cocoop(PromptModel):

    def __init__(self, bundle, classnames, templates, backend, config: CocoopConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        if bundle.embed_dim < 16:
            raise FastpromptError(f"the image tower's output dimension {bundle.embed_dim} is below 16: CoCoOp's "
                                  "meta-net has D // 16 hidden units; use a CLIP with D >= 16")
        phrase = " ".join(context_words(config.ctx_init)) if config.ctx_init else None
        n_ctx = len(context_words(phrase)) if phrase else (N_CTX if config.n_ctx is None else config.n_ctx)
        self.text = CoopContext(bundle, self.classnames, n_ctx=n_ctx, ctx_init=phrase)
        self.meta = MetaNet(bundle.embed_dim, bundle.text_width).to(bundle.device)

    def text_features(self) -> torch.Tensor:
        raise FastpromptError("cocoop's class features depend on the image: use class_features(image_features)")

    def class_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class features [B, K, D], normalised, of every class's prompt conditioned on each of
        the normalised image features x [B, D]."""
        shift = self.meta(x)  # (B, w): π(x), one bias for every context token
        rows = max(1, PROMPTS_PER_PASS // self.num_classes)  # images per text-tower pass
        feats = torch.cat([self.text.conditioned(self.clip, part, self.backend)
                           for part in shift.split(rows)])  # (B, K, D)
        return F.normalize(feats, dim=-1)  # (B, K, D)

    def _logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """τ cos(x_b, w_bk) [B, K] in `loss_dtype` (fp32 under bf16 autocast)."""
        with torch.autocast(x.device.type, enabled=False):
            dtype = loss_dtype(self.backend, x, w)
            return self.logit_scale().to(dtype) * torch.einsum("bd,bkd->bk", x.to(dtype), w.to(dtype))  # (B, K)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.image_features(images)  # (B, D), normalised
        return self._logits(x, self.class_features(x))  # (B, K)

    def loss_and_logits(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                        features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_labels(labels, images if features is None else features)
        x = self.image_features(images, {"features": features})  # (B, D), normalised
        logits = self._logits(x, self.class_features(x))  # (B, K)
        return F.cross_entropy(logits, labels), logits.detach()
