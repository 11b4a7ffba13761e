"""CAVPT: class-aware visual prompt tuning (Xing et al.; seed paper eqs. 9-12).

VPT-deep prompts plus, in the last `layers` layers, K_N class-aware prompts per image:
1. the top-K_N classes of each image from zero-shot CLIP (frozen, unprompted image tower
   against the cached template features);
2. queries: those classes' template features [K_N, D] through a 2-layer MLP -> d;
3. keys and values: the layer's input tokens (cls + patches) projected to d; single-head
   attention softmax(q kᵀ / sqrt(d)) v (the released code attends over the layer tokens;
   eq. 9 as printed would attend over the class token alone, a trivial softmax);
4. + K_N copies of the layer's class token s_l, LayerNorm, linear projection -> prompts
   appended to that layer's prompt slots;
5. an auxiliary K-way classifier on the LayerNorm outputs with eq. 10 targets (one-hot
   for the output of the ground-truth class, uniform 1/K for the others; or `gt-only`).
   Our classifier is a cosine classifier (weights [K, d], CLIP's τ) so that the term runs
   through the same fused cosine cross-entropy as the main loss.
Loss (eq. 12): L = L_ce + alpha · L_ce^ca, the auxiliary term averaged over CAVPT layers.
With `text_prompt=True` the text side is CoOp's learnable context (VLP-CLIP-CAVPT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.losses import cosine_ce
from fastprompt.methods.base import PromptModel, add_coop, add_visual_prompts
from fastprompt.methods.options import CavptOptions, CoopOptions, VisualOptions
from fastprompt.models import vision

log = logging.getLogger(__name__)


@dataclass
class CavptConfig(CavptOptions, VisualOptions, CoopOptions):
    def _validate(self) -> None:
        if not self.text_prompt:
            for name in ("n_ctx", "ctx_init"):
                if getattr(self, name) is not None:
                    raise FastpromptError(f"{name} needs text_prompt=True (CAVPT's text side is hand-crafted otherwise)")
            if self.csc:
                raise FastpromptError("csc needs text_prompt=True (CAVPT's text side is hand-crafted otherwise)")


class ClassAwarePromptLayer(nn.Module):
    """Class-aware prompts for one layer (eq. 9) and the LayerNorm outputs for eq. 10."""

    def __init__(self, embed_dim: int, width: int, num_classes: int, device=None):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(embed_dim, width), nn.GELU(), nn.Linear(width, width)).to(device)
        self.key = nn.Linear(width, width, device=device)
        self.value = nn.Linear(width, width, device=device)
        self.norm = nn.LayerNorm(width, device=device)
        self.proj = nn.Linear(width, width, device=device)
        self.classifier = nn.Parameter(torch.empty(num_classes, width, device=device).normal_(0.0, 0.02))  # (K, d)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, d] (cls + patches of the layer input), text [B, K_N, D] ->
        (prompts [B, K_N, d], LayerNorm outputs [B, K_N, d])."""
        q = self.query(text.to(tokens.dtype))  # (B, K_N, d)
        k, v = self.key(tokens), self.value(tokens)  # (B, N, d)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, K_N, d): softmax(q kᵀ/sqrt(d)) v
        normed = self.norm(attended + tokens[:, :1])  # (B, K_N, d): + K_N copies of s_l
        return self.proj(normed), normed


def aux_targets(topk: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 10 targets [B, K_N, K]: one-hot(y) for the output whose class is the ground truth,
    uniform 1/K for every other output."""
    onehot = F.one_hot(labels, num_classes).float()  # (B, K)
    uniform = torch.full_like(onehot, 1.0 / num_classes)  # (B, K)
    is_gt = (topk == labels[:, None])[..., None]  # (B, K_N, 1)
    return torch.where(is_gt, onehot[:, None, :], uniform[:, None, :])  # (B, K_N, K)


class Cavpt(PromptModel):
    method = "cavpt"

    def __init__(self, bundle, classnames, templates, backend, config: CavptConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_visual_prompts(self, "deep", config.n_prompts)
        if config.text_prompt:
            add_coop(self, config)
        depth = bundle.vision_layers
        if config.layers > depth:
            raise FastpromptError(f"layers={config.layers} exceeds the image tower's {depth} layers; pick 1..{depth}")
        self.first_layer = depth - config.layers
        self.k_n = min(config.topk, self.num_classes)
        if self.k_n < config.topk:
            log.info("topk=%d capped at the %d classes of this task", config.topk, self.num_classes)
        device = bundle.device
        self.cavpt = nn.ModuleList(
            ClassAwarePromptLayer(bundle.embed_dim, bundle.vision_width, self.num_classes, device=device)
            for _ in range(config.layers)
        )

    def training_only_names(self) -> set[str]:
        return {f"cavpt.{i}.classifier" for i in range(len(self.cavpt))}

    @torch.no_grad()
    def zero_shot_topk(self, images: torch.Tensor) -> torch.Tensor:
        """Top-K_N class indices [B, K_N] of zero-shot CLIP (frozen, unprompted image tower)."""
        x = vision.encode(self.clip.visual, images, backend=self.backend)  # (B, D)
        scores = F.normalize(x, dim=-1) @ self.template_features.t()  # (B, K)
        return scores.topk(self.k_n, dim=-1).indices  # (B, K_N)

    def _resolve_topk(self, images: torch.Tensor, topk: Optional[torch.Tensor]) -> torch.Tensor:
        """Supplied top-K (the trainer's cache, `topk_source="cached"`) or recomputed online."""
        if topk is None:
            return self.zero_shot_topk(images)
        if topk.dtype != torch.long or tuple(topk.shape) != (images.shape[0], self.k_n):
            raise FastpromptError(
                f"topk must be int64 of shape [{images.shape[0]}, {self.k_n}] (class indices per image); got {topk.dtype} {tuple(topk.shape)}"
            )
        return topk.to(images.device)

    def extra_prompts(self, images: torch.Tensor, context: dict) -> vision.ExtraPrompts:
        topk = context["topk"] = self._resolve_topk(images, context.get("topk"))  # (B, K_N)
        text = self.template_features[topk]  # (B, K_N, D)
        normed: list[torch.Tensor] = context.setdefault("normed", [])

        def class_aware(layer: int, tokens: torch.Tensor) -> Optional[torch.Tensor]:
            if layer < self.first_layer:
                return None
            prompts, h = self.cavpt[layer - self.first_layer](tokens, text)  # (B, K_N, d) each
            normed.append(h)
            return prompts

        return class_aware

    def forward(self, images: torch.Tensor, topk: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.image_features(images, {"topk": topk})  # (B, D)
        return self.logit_scale() * x @ self.text_features().t()  # (B, K)

    def loss_and_logits(self, images: torch.Tensor, labels: torch.Tensor,
                        topk: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 12: CE of the prompted logits + alpha · auxiliary CE (eq. 10); `topk` [B, K_N]
        is the trainer's cached zero-shot top-K (None: recomputed online)."""
        self._check_labels(labels, images)
        context = {"topk": topk}
        x = self.image_features(images, context)  # (B, D)
        w = self.text_features()  # (K, D)
        ce = cosine_ce(x, w, labels, self.logit_scale(), self.backend)
        aux = torch.stack([self.aux_loss(layer, h, context["topk"], labels)
                           for layer, h in zip(self.cavpt, context["normed"])]).mean()
        return ce + self.config.alpha * aux, self._detached_logits(x, w)

    def aux_loss(self, layer: ClassAwarePromptLayer, normed: torch.Tensor, topk: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """Auxiliary K-way cross-entropy on the LayerNorm outputs [B, K_N, d]."""
        d = normed.shape[-1]
        if self.config.aux_target == "gt-only":
            rows = topk == labels[:, None]  # (B, K_N): outputs of the ground-truth class
            if not bool(rows.any()):  # CPU-GPU sync; no ground truth among any top-K: no term
                return normed.sum() * 0.0
            return cosine_ce(normed[rows], layer.classifier, labels[:, None].expand_as(topk)[rows],
                             self.logit_scale(), self.backend)
        targets = aux_targets(topk, labels, self.num_classes)  # (B, K_N, K)
        return cosine_ce(normed.reshape(-1, d), layer.classifier, targets.reshape(-1, self.num_classes),
                         self.logit_scale(), self.backend)
