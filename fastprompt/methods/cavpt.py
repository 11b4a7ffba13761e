"""CAVPT: class-aware visual prompt tuning (Xing et al., "Dual Modality Prompt Tuning").

Two variants of the class-aware module (`variant`), both on VPT-deep prompts (P = `n_prompts`
per layer, N(0, 0.02)) and both with K_N = min(`topk`, K) class-aware prompts per image in the
last `layers` layers. The top-K_N classes of an image come from zero-shot CLIP: its frozen,
unprompted image tower, normalised, against the normalised hand-crafted template features.

`variant="paper"` (default): the CAVPT paper's eqs. 9-12 as printed, with our reading (docs/methods.md).
- VPT-deep prompts in every layer; the class-aware prompts sit beside them.
- g_j = template features of the top-K_N classes [K_N, D]; q_j = MLP(g_j) (Linear D→d, GELU,
  Linear d→d); k, v = Linear(d→d) of the layer's input tokens (cls + patches);
  p̃ = LP(LN(softmax(q kᵀ/√d) v + [s_l]_{K_N})) with LP = Linear(d→d) (eq. 9; the printed eq. 9
  takes one key from the class token alone, a trivial softmax, so we attend over the layer
  tokens as the released code does).
- auxiliary K-way cosine classifier (weights [K, d], CLIP's τ) on the LN outputs, eq. 10
  targets (`aux_target="eq10"`: one-hot for the output of the ground-truth class, uniform 1/K
  for the others; `"gt-only"`: the ground-truth outputs only).
- L = CE(τ cos(x, w), y) + α · L_aux (eq. 12), L_aux averaged over the CAVPT layers.
- top-K: `topk_source="cached"` (default) takes the trainer's per-image top-K at centre crop;
  `"online"` recomputes it for every augmented view.

`variant="released"`: what the authors' published code computes (fanrena/DPT,
`trainers/DPT.py`: classes `CAVPT`, `Attention`, `Transformer_VPTD`,
`CustomCLIP_Selected_CoVPTDeep`, `DPT.forward_backward`).
- VPT-deep prompts only in layers 1..L−`layers` (`VPTDeepPromptLearner.ctx` has
  BOTTOMLIMIT−1 rows); the last `layers` layers carry the K_N class-aware prompts alone.
  `visual.prompts` is therefore [L − layers, P, d].
- Query term t = Linear(D→d, bias)(g) (`meta_nets`), with g the *learned* class features of the
  run's text side indexed by the image's top-K_N classes: CoOp's text features, unnormalised,
  with gradient (`text_features[indices]`); without `text_prompt` the cached hand-crafted
  features (normalised, as cached; the released code always learns CoOp context).
- Attention (`Attention`): q = Linear(d→32, no bias)(t); keys and values over
  s = [layer tokens (cls + patches), detached ; 10 learnable tokens (N(0, 0.02), `ctx`)];
  k = Linear(d→32, no bias)(s), values s unprojected; a = Linear(d→d, no bias)(softmax(q kᵀ/√32) s).
- Prompt p̃ = LN₂(a + t) (`lns2`); no output projection.
- Auxiliary classifier: plain logits Linear(d→K, no bias)(LN₁(a)) (`lns`, `classfiers`),
  cross-entropy on the rows whose class is the ground truth only, averaged over all such rows
  of all CAVPT layers (no rows: no term).
- L = CE(τ cos(x, w), y) + α · L_aux; for the first C = `guidance_epochs` epochs (the
  authors' `PRETRAIN.C`) the first term becomes the "general knowledge guidance"
  CE(τ cos(x₀, w), y) + CE(τ cos(x, w_h), y) + 0.1 · CE(τ cos(x, w), y), with x₀ the zero-shot
  image feature and w_h the hand-crafted text features. The trainer tells the model the epoch
  (`set_epoch`); a model that was never told is at epoch 0.
- top-K: always online, per augmented view (`topk_source="online"`; "cached" is refused).
- Where we differ from the released code: the module runs in the tower's dtype (the authors
  cast it to fp16 with `.half()`); the prompt slots sit after the class token instead of after
  the patches (attention is permutation-equivariant: the same function); `layers` counts the
  CAVPT layers from the top (the authors' BOTTOMLIMIT = L − layers + 1).

Options (default; source):
- `variant` ("paper": the printed method; `--protocol cavpt` uses "released").
- `topk` K_N (5; paper §"Analysis on the length of input text class tokens": K_N = 5 is best
  on half the datasets). The best K_N per dataset of that analysis (EuroSAT 5, Caltech101 50,
  Flowers102 5, Food101 5, FGVCAircraft 20, DTD 5, OxfordPets 37 = all, StanfordCars 100, others
  5; the authors' `train_single.sh` uses CPN 10) is a setting of a published recipe, not of the
  module: it belongs to the named protocol (`--protocol cavpt`, fastprompt/training/protocols.py),
  which resolves it from the dataset's name; `--cavpt.topk` overrides it.
- `layers` (1: the last layer; paper and the authors' script BOTTOMLIMIT 12 on ViT-B/32).
- `alpha` α (1.0; paper eq. 12; the authors' script uses 0.3).
- `aux_target` ("eq10" for paper, "gt-only" for released: `DPT.forward_backward`).
- `topk_source` ("cached" for paper: our choice, one frozen forward per image per run; "online" for released: `CustomCLIP_Selected_CoVPTDeep`).
- `text_prompt` (False; True is the paper's VLP-CLIP-CAVPT, which the released DPT trainer always is).
- `guidance_epochs` C (0: off; released only, needs `text_prompt`; the authors' script uses 30).
- `n_prompts` P (10; paper §Implementation), `n_ctx` / `csc` / `ctx_init` (CoOp's, with `text_prompt`).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.losses import cosine_ce, loss_dtype
from fastprompt.methods.base import PromptModel, add_coop, add_visual_prompts
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import CavptConfig
from fastprompt.models import vision
from fastprompt.models.clip import require_vit

log = logging.getLogger(__name__)

RELEASED_EXTRA_TOKENS = 10  # learnable key/value tokens per layer (fanrena/DPT trainers/DPT.py `CAVPT.ctx`)
RELEASED_ATTN_DIM = 32  # q/k width (fanrena/DPT trainers/DPT.py `Attention.qmlp` / `kmlp`)
GUIDANCE_MAIN_WEIGHT = 0.1  # weight of the main CE during guidance (fanrena/DPT trainers/DPT.py `forward_backward`)


class ClassAwarePromptLayer(nn.Module):
    """`variant="paper"`: class-aware prompts for one layer (eq. 9) and the LayerNorm outputs for eq. 10."""

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


class ReleasedClassAwareLayer(nn.Module):
    """`variant="released"`: one layer of fanrena/DPT trainers/DPT.py `CAVPT` (with its `Attention`).

    Our names for theirs: query = meta_nets[i], q_proj = qmlp, k_proj = kmlp, out_proj = vmlp,
    extra_tokens = ctx[i], aux_norm = lns[i], classifier = classfiers[i], norm = lns2[i];
    initialisation as theirs (PyTorch defaults, extra tokens N(0, 0.02))."""

    def __init__(self, embed_dim: int, width: int, num_classes: int, device=None):
        super().__init__()
        self.query = nn.Linear(embed_dim, width, device=device)  # D -> d, with bias
        self.q_proj = nn.Linear(width, RELEASED_ATTN_DIM, bias=False, device=device)
        self.k_proj = nn.Linear(width, RELEASED_ATTN_DIM, bias=False, device=device)
        self.out_proj = nn.Linear(width, width, bias=False, device=device)
        self.extra_tokens = nn.Parameter(torch.empty(RELEASED_EXTRA_TOKENS, width, device=device).normal_(0.0, 0.02))
        self.aux_norm = nn.LayerNorm(width, device=device)
        self.classifier = nn.Linear(width, num_classes, bias=False, device=device)
        self.norm = nn.LayerNorm(width, device=device)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, d] (cls + patches of the layer input), text [B, K_N, D] (class features of
        the top-K_N classes) -> (prompts [B, K_N, d], attention output a [B, K_N, d])."""
        tokens = tokens.detach()  # `class_token.detach()`: no gradient into the tower through the module
        t = self.query(text.to(tokens.dtype))  # (B, K_N, d): the query term
        extra = self.extra_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (B, 10, d)
        s = torch.cat([tokens, extra], dim=1)  # (B, N+10, d): keys and values
        scores = self.q_proj(t) @ self.k_proj(s).transpose(1, 2) / math.sqrt(RELEASED_ATTN_DIM)  # (B, K_N, N+10)
        a = self.out_proj(scores.softmax(dim=-1) @ s)  # (B, K_N, d): values unprojected, Linear after
        return self.norm(a + t), a  # (B, K_N, d) each

    def aux_logits(self, a: torch.Tensor) -> torch.Tensor:
        """Plain K-way logits [B, K_N, K] of the attention output a [B, K_N, d]."""
        return self.classifier(self.aux_norm(a))  # (B, K_N, K)


def aux_targets(topk: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 10 targets [B, K_N, K]: one-hot(y) for the output whose class is the ground truth,
    uniform 1/K for every other output."""
    onehot = F.one_hot(labels, num_classes).float()  # (B, K)
    uniform = torch.full_like(onehot, 1.0 / num_classes)  # (B, K)
    is_gt = (topk == labels[:, None])[..., None]  # (B, K_N, 1)
    return torch.where(is_gt, onehot[:, None, :], uniform[:, None, :])  # (B, K_N, K)


@register_method("cavpt")  # options, groups (text only with text_prompt=True), frozen image tower: fastprompt.methods.specs
class Cavpt(PromptModel):
    def may_skip_parameters(self) -> bool:
        return self.released  # its auxiliary classifier sees only ground-truth rows: a batch may have none

    def wants_topk_table(self) -> bool:
        return self.config.topk_source == "cached"

    def __init__(self, bundle, classnames, templates, backend, config: CavptConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        self.released = config.variant == "released"
        require_vit(bundle, self.method)  # before asking the tower for its depth
        depth = bundle.vision_layers
        if config.layers > depth:
            raise FastpromptError(f"layers={config.layers} exceeds the image tower's {depth} layers; pick 1..{depth}")
        self.first_layer = depth - config.layers
        # released: VPT-deep prompts only below the CAVPT layers (fanrena/DPT `VPTDeepPromptLearner`)
        add_visual_prompts(self, "deep", config.n_prompts, layers=self.first_layer if self.released else depth,
                           placement=config.placement)
        if config.text_prompt:
            add_coop(self, config)
        self.k_n = min(config.topk, self.num_classes)
        if self.k_n < config.topk:
            log.warning("cavpt topk=%d is more than the %d classes of this task: capped at %d", config.topk,
                        self.num_classes, self.num_classes)
        device = bundle.device
        layer_cls = ReleasedClassAwareLayer if self.released else ClassAwarePromptLayer
        self.cavpt = nn.ModuleList(
            layer_cls(bundle.embed_dim, bundle.vision_width, self.num_classes, device=device)
            for _ in range(config.layers)
        )
        self.guiding = config.guidance_epochs > 0  # epoch 0 until the trainer says otherwise (set_epoch)
        self._eval_query_text: Optional[torch.Tensor] = None

    def training_only_names(self) -> set[str]:
        suffix = "classifier.weight" if self.released else "classifier"
        return {f"cavpt.{i}.{suffix}" for i in range(len(self.cavpt))}

    def set_epoch(self, epoch: int) -> None:
        """Released guidance runs in epochs 0..guidance_epochs−1 (fanrena/DPT `self.epoch < self.pretrain_c`)."""
        self.guiding = epoch < self.config.guidance_epochs

    # ------------------------------------------------------------ zero-shot top-K
    @torch.no_grad()
    def zero_shot_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, D] of zero-shot CLIP (frozen, unprompted image tower)."""
        return F.normalize(vision.encode(self.clip.visual, images, backend=self.backend), dim=-1)  # (B, D)

    @torch.no_grad()
    def zero_shot_topk(self, images: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Top-K_N class indices [B, K_N] of zero-shot CLIP; `features` [B, D]: its image features
        when already computed."""
        x = self.zero_shot_features(images) if features is None else features  # (B, D)
        scores = x @ self.template_features.t()  # (B, K)
        return scores.topk(self.k_n, dim=-1).indices  # (B, K_N)

    def _resolve_topk(self, images: torch.Tensor, context: dict) -> torch.Tensor:
        """Supplied top-K (the trainer's cache under `topk_source="cached"`, or a caller's) or
        recomputed online, keeping the zero-shot features in `context["zero_shot"]`."""
        topk = context.get("topk")
        if topk is None:
            context["zero_shot"] = self.zero_shot_features(images)  # (B, D)
            return self.zero_shot_topk(images, context["zero_shot"])
        if topk.dtype != torch.long or tuple(topk.shape) != (images.shape[0], self.k_n):
            raise FastpromptError(
                f"topk must be int64 of shape [{images.shape[0]}, {self.k_n}] (class indices per image); got {topk.dtype} {tuple(topk.shape)}"
            )
        return topk.to(images.device)

    # ------------------------------------------------------------ text sides
    def _query_text(self) -> torch.Tensor:
        """Released: the class features [K, D] the queries read: CoOp's learned features,
        unnormalised (computed once in eval mode), or the cached hand-crafted ones."""
        if self.text is None:
            return self.template_features  # (K, D), normalised as cached
        if self.training or torch.is_grad_enabled():
            return self.text(self.clip, self.backend)  # (K, D), unnormalised
        if self._eval_query_text is None:
            self._eval_query_text = self.text(self.clip, self.backend)  # (K, D)
        return self._eval_query_text

    def _text_sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class features [K, D] the class-aware queries read, normalised class features [K, D]
        of the logits), from one pass of the text tower."""
        if not self.released:
            return self.template_features, super().text_features()
        raw = self._query_text()  # (K, D)
        return raw, (raw if self.text is None else F.normalize(raw, dim=-1))

    def text_features(self) -> torch.Tensor:
        return self._text_sides()[1]

    def prompt_context(self) -> dict:
        return {"query_text": self._text_sides()[0]}

    def train(self, mode: bool = True):
        self._eval_query_text = None
        return super().train(mode)

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], other_classes: bool = False) -> None:
        super().load_prompt_state_dict(state, other_classes)
        self._eval_query_text = None

    # ------------------------------------------------------------ forward
    def extra_prompts(self, images: torch.Tensor, context: dict) -> vision.ExtraPrompts:
        topk = context["topk"] = self._resolve_topk(images, context)  # (B, K_N)
        text = context["query_text"][topk]  # (B, K_N, D)
        outputs: list[torch.Tensor] = context.setdefault("aux_inputs", [])  # per CAVPT layer, (B, K_N, d)

        def class_aware(layer: int, tokens: torch.Tensor) -> Optional[torch.Tensor]:
            if layer < self.first_layer:
                return None
            prompts, h = self.cavpt[layer - self.first_layer](tokens, text)  # (B, K_N, d) each
            outputs.append(h)
            return prompts

        return class_aware

    def forward(self, images: torch.Tensor, topk: Optional[torch.Tensor] = None) -> torch.Tensor:
        query_text, w = self._text_sides()  # (K, D), (K, D)
        x = self.image_features(images, {"topk": topk, "query_text": query_text})  # (B, D)
        return self.logit_scale() * x @ w.t()  # (B, K)

    def loss_and_logits(self, images: torch.Tensor, labels: torch.Tensor,
                        topk: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Main term + alpha · auxiliary term (see the module docstring for each variant);
        `topk` [B, K_N]: the trainer's cached zero-shot top-K (None: recomputed online)."""
        self._check_labels(labels, images)
        query_text, w = self._text_sides()  # (K, D), (K, D)
        context = {"topk": topk, "query_text": query_text}
        x = self.image_features(images, context)  # (B, D)
        tau = self.logit_scale()
        main = cosine_ce(x, w, labels, tau, self.backend)
        if self.released:
            if self.guiding:
                main = self.guidance_loss(images, x, w, main, labels, context)
            aux = self.released_aux_loss(context["aux_inputs"], context["topk"], labels)
        else:
            aux = torch.stack([self.aux_loss(layer, h, context["topk"], labels)
                               for layer, h in zip(self.cavpt, context["aux_inputs"])]).mean()
        return main + self.config.alpha * aux, self._detached_logits(x, w)

    def guidance_loss(self, images: torch.Tensor, x: torch.Tensor, w: torch.Tensor, main: torch.Tensor,
                      labels: torch.Tensor, context: dict) -> torch.Tensor:
        """General knowledge guidance (fanrena/DPT trainers/DPT.py `forward_backward`, epoch < C):
        CE(zero-shot image · learned text) + CE(prompted image · hand-crafted text) + 0.1 · main."""
        zero_shot = context.get("zero_shot")
        if zero_shot is None:  # top-K was supplied: the zero-shot features were not needed until now
            zero_shot = self.zero_shot_features(images)  # (B, D)
        tau = self.logit_scale()
        text_term = cosine_ce(zero_shot, w, labels, tau, self.backend)  # `logits1`
        image_term = cosine_ce(x, self.template_features, labels, tau, self.backend)  # `logits2`
        return text_term + image_term + GUIDANCE_MAIN_WEIGHT * main

    def released_aux_loss(self, attended: list[torch.Tensor], topk: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Plain-logit CE on the ground-truth rows of every CAVPT layer, averaged over those rows;
        0 when no image has its class among its top-K (fanrena/DPT `forward_backward`)."""
        logits = torch.stack([layer.aux_logits(a) for layer, a in zip(self.cavpt, attended)], dim=1)  # (B, Lc, K_N, K)
        rows = (topk == labels[:, None])[:, None, :].expand(-1, logits.shape[1], -1)  # (B, Lc, K_N)
        targets = labels[:, None, None].expand_as(rows)  # (B, Lc, K_N)
        logits = logits.to(loss_dtype(self.backend, logits))  # fp32 (float64 for a float64 reference)
        ce = F.cross_entropy(logits.reshape(-1, self.num_classes), targets.reshape(-1), reduction="none")  # (B·Lc·K_N,)
        mask = rows.reshape(-1).to(ce.dtype)  # (B·Lc·K_N,): 1 on ground-truth rows
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)  # no CPU-GPU sync

    def aux_loss(self, layer: ClassAwarePromptLayer, normed: torch.Tensor, topk: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """Paper: auxiliary K-way cosine cross-entropy on the LayerNorm outputs [B, K_N, d]."""
        d = normed.shape[-1]
        if self.config.aux_target == "gt-only":
            # the mean over the ground-truth rows as a masked mean (no data-dependent shape or branch):
            # one-hot targets on those rows, all-zero targets elsewhere (their CE is exactly 0, and so
            # is their gradient), the mean over all B·K_N rows rescaled to the count of ground-truth
            # rows; no ground truth in any top-K gives exactly 0 and zero gradients
            rows = topk == labels[:, None]  # (B, K_N): outputs of the ground-truth class
            onehot = F.one_hot(labels, self.num_classes).float()  # (B, K)
            targets = onehot[:, None, :] * rows[..., None]  # (B, K_N, K)
            mean = cosine_ce(normed.reshape(-1, d), layer.classifier, targets.reshape(-1, self.num_classes),
                             self.logit_scale(), self.backend)  # over B·K_N rows
            return mean * (rows.numel() / rows.sum().clamp_min(1).to(mean.dtype))
        targets = aux_targets(topk, labels, self.num_classes)  # (B, K_N, K)
        return cosine_ce(normed.reshape(-1, d), layer.classifier, targets.reshape(-1, self.num_classes),
                         self.logit_scale(), self.backend)
