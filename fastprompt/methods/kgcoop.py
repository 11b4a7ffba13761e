"""KgCoOp: knowledge-guided context optimisation (Yao et al., "Visual-Language Prompt Tuning with
Knowledge-guided Context Optimization", CVPR 2023).

What htyao89/KgCoOp `KgCoOp/trainers/kgcoop.py` computes (`PromptLearner`, `CustomCLIP`,
`KgCoOp.forward_backward`):
- CoOp's prompts `[SOS, u_1..u_M, CLASS_k tokens, ".", EOS]` (class at the end), t_k their
  normalised text features [K, D], x_b the frozen image tower's normalised features [B, D];
- t_k^clip the normalised features of the dataset's hand-crafted template for class k
  (`CUSTOM_TEMPLATES[cfg.DATASET.NAME]`: CoOp's templates, which are fastprompt's dataset
  templates), computed once and frozen (here the cached `template_features`);
- L = CE(τ x tᵀ, y) + w · (1 − mean_k cos(t_k, t_k^clip)): the mean over all K training classes,
  every step (`knowledge_gap`).
Context initialisation as released: with CTX_INIT set (the released config's `True`) the phrase
is *always* "a photo of a" (`temp = 'a photo of a'`), M = 4, its token embeddings initialise u
and the context is shared by every class (CSC is ignored); without it, M = N_CTX vectors
N(0, 0.02), class-specific with CSC. Only `ctx` trains (the released `bias_vectors`, `meta_net`
and `adapter` are built but frozen and unused).

Defaults (configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml, the config of
scripts/base2new_train.sh; README: `bash base2new_train.sh DATASET 8.0`): CTX_INIT True, N_CTX 4,
W 8.0; OPTIM sgd, LR 0.002, WARMUP_EPOCH 1 (constant 1e-5), cosine over MAX_EPOCH 100, batch 128.

Fast path: CoOp's (EOS-truncated text tower once per step, fused cosine cross-entropy); the
hand-crafted features are cached once per class set, so the extra term is one [K, D] dot product.

Where fastprompt differs: fp32 / bf16 instead of the released fp16 (PREC "fp16"; its hand-crafted
features come from a second fp16 CLIP); a `ctx_init` other than "a photo of a", an `n_ctx` other
than 4 with it, or `csc` with it are refused (the released code silently replaces or ignores them);
`--template ensemble` makes t^clip CLIP's 7-template ensemble (the released code has one template).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastprompt.losses import cosine_ce, knowledge_gap
from fastprompt.methods.base import PromptModel, add_coop
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import KGCOOP_N_CTX, KGCOOP_PHRASE, KgcoopConfig


@register_method("kgcoop")  # options, groups (text), frozen image tower: fastprompt.methods.specs
class Kgcoop(PromptModel):

    def __init__(self, bundle, classnames, templates, backend, config: KgcoopConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        n_ctx = config.n_ctx if config.n_ctx is not None or config.ctx_init else KGCOOP_N_CTX
        phrase = KGCOOP_PHRASE if config.ctx_init else None  # "_" is a space, as released
        add_coop(self, replace(config, n_ctx=n_ctx, ctx_init=phrase))

    def objective(self, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE + weight · (1 − mean_k cos(t_k, t_k^clip)) of normalised image features x [B, D] and
        class features w [K, D] (one text-tower pass a step, `loss_and_logits`)."""
        loss = cosine_ce(x, w, labels, self.logit_scale(), self.backend)  # ()
        return loss + self.config.weight * knowledge_gap(w, self.template_features, self.backend)  # ()
