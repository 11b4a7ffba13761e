"""Anchor-style baselines: every method computed the way CoOp / MaPLe / DPT research code does.

`fastprompt bench` times these (its `anchor` variant) beside our reference and fast backends.
They compute the same function as `backend="reference"` (tested: `tests/test_anchor.py`), but
the way the public codebases are written, which is what users of those codebases pay today:

- visual prompts: per layer, `torch.cat` of `[cls, prompts, patches]` into the sequence and
  CLIP's own `ResidualAttentionBlock` (`nn.MultiheadAttention` + MLP over the *whole*
  sequence, prompt rows included, although their outputs are thrown away), as VPT's
  `forward_deep_prompt` and DPT/MaPLe's prompted CLIP transformers do;
- learnable text (CoOp context): CoOp's `PromptLearner` + `TextEncoder`: the full 77-token
  prompts `cat([SOS, ctx, class tokens + EOS + padding])` through the text transformer for
  every class, every batch, pooled at the argmax token;
- CoCoOp (the meta-net's image-conditioned context): CoCoOp's `CustomCLIP.forward`, a loop
  over the images of the batch, each running its K full 77-token prompts through the text
  transformer (the released code trains at batch 1: one image a step);
- KgCoOp: CoOp's step plus `1 - mean(CosineSimilarity(dim=1)(text_features, ori_embedding))`
  against the template features computed once at init (`CustomCLIP.forward`);
- hand-crafted text features: computed once when the anchor is built, with
  `clip.encode_text` on the 77-token templates (normalised, averaged over templates),
  like CoOp's `ZeroshotCLIP.__init__` and the VPT/CAVPT code's frozen text side. They are
  never recomputed per batch here (what those codebases do for a frozen text side);
- ProGrad (BeierZhu/Prompt-align `ProGrad.public/trainers/prograd.py`): CoOp's student, the
  zero-shot `CLIP.forward` as a second frozen image pass against its text features (computed
  at init), `ProGradLoss`, and `prograd_backward_and_update`'s step: the distillation
  backward (graph retained), its gradients cloned, the cross-entropy backward, the projection
  per tensor with Python branches;
- PromptSRC (muzairkhattak/PromptSRC `trainers/promptsrc.py`): IVLP's prompted towers as above
  (77-token text, every token through every image block), `CustomCLIP.forward`'s second frozen
  image pass (`ZS_image_encoder`), its `fixed_embeddings` (computed at init as released; here
  the model's cached target) normalised again every step, and `forward_backward`'s losses as
  written there (`F.l1_loss`, `F.kl_div(..., reduction='sum', log_target=True) / logits.numel()`);
- losses: `F.cross_entropy` on materialised logits `τ · x̂ ŵᵀ` (soft targets for mixup and
  CAVPT's eq. 10), L2 normalisation as `x / x.norm()`, as CLIP/CoOp write it;
- precision: on GPU the bench runs an fp16 copy of the whole model (`model.half()`, CoOp's
  `prec="fp16"`: CLIP, prompts and optimiser state all fp16).

The anchor reuses the `PromptModel`'s frozen CLIP and its prompt tensors (CoOp context and its
SOS/suffix token embeddings, visual prompts, CAVPT and E2MIM heads), so a gradient step on
the anchor moves the same parameters, but it never calls fastprompt's reference or fast
forward code. The one shared helper is E2MIM's `classwise_pairs` (which images are mixed),
a sampling rule rather than computation, reused so that both paths draw the same pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.methods.base import PromptModel
from fastprompt.methods.e2mim import classwise_pairs
from fastprompt.prompts.visual import CoupledPrompts


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """CLIP / CoOp's `x / x.norm(dim=-1, keepdim=True)`."""
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------
# text side (CoOp's PromptLearner + TextEncoder; ZeroshotCLIP's cached features)
# ----------------------------------------------------------------------------------------


def text_encoder(clip: nn.Module, prompts: torch.Tensor, tokenized: torch.Tensor,
                 deep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CoOp's `TextEncoder.forward`: prompt embeddings [K, 77, w] -> features [K, D] (not normalised).
    With `deep` [J-1, M, w], MaPLe's IVLP text layers (`ResidualAttentionBlock_IVLP`): blocks 2..J
    first replace positions 1..M of every prompt with their own context."""
    x = prompts + clip.positional_embedding.to(prompts.dtype)  # (K, 77, w)
    if deep is None:
        x = clip.transformer(x, attn_mask=clip.attn_mask)  # (K, 77, w): all 77 positions, every class
    else:
        for i, block in enumerate(clip.transformer.resblocks):
            if 0 < i <= deep.shape[0]:
                ctx = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (K, M, w)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1]:]], dim=1)  # (K, 77, w)
            x = block(x, attn_mask=clip.attn_mask)  # (K, 77, w)
    x = clip.ln_final(x)  # (K, 77, w)
    x = x[torch.arange(x.shape[0], device=x.device), tokenized.argmax(dim=-1)]  # (K, w): EOT
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)  # (K, D)
    return x @ clip.text_projection  # (K, D)


def coop_prompts(model: PromptModel) -> torch.Tensor:
    """CoOp's `PromptLearner.forward` (class token at the end): [K, 77, w] = cat(SOS, ctx, suffix)."""
    learner = model.text
    prefix, suffix, ctx = learner.token_prefix, learner.token_suffix, learner.context  # (K, 1, w), (K, 77-1-M, w)
    if ctx.dim() == 2:  # generic context, shared by every class
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)  # (K, M, w)
    return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)  # (K, 77, w)


@torch.no_grad()
def handcrafted_features(model: PromptModel) -> torch.Tensor:
    """Template features [K, D], normalised: `clip.encode_text` per template, averaged (at init)."""
    clip = model.clip
    device = clip.token_embedding.weight.device
    mean = None
    for template in model.templates:
        tokens = model.bundle.tokenizer([template.format(c) for c in model.classnames]).to(device)  # (K, 77)
        feats = l2norm(clip.encode_text(tokens))  # (K, D)
        mean = feats if mean is None else mean + feats
    return l2norm(mean / len(model.templates))  # (K, D)


# ----------------------------------------------------------------------------------------
# image side (VPT / DPT / MaPLe style prompted ViT)
# ----------------------------------------------------------------------------------------


def embed(visual: nn.Module, images: torch.Tensor, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip's patch/class/positional embedding and ln_pre: [B, 1 + Np, d]; with `first`
    [P, d], MaPLe's `VisionTransformer.forward`: the prompts appended before ln_pre, [B, 1 + Np + P, d]."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, d, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, Np, d)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, d)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, N, d)
    if first is not None:
        x = torch.cat([x, first.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, N+P, d)
    return visual.ln_pre(x)  # (B, N(+P), d)


def pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`ln_post(x[:, 0]) @ proj`: image features [B, D] (not normalised)."""
    pooled = visual.ln_post(x[:, 0])  # (B, d)
    return pooled @ visual.proj if visual.proj is not None else pooled  # (B, D)


def class_aware_prompts(layer: nn.Module, tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CAVPT's class-aware prompts of one layer, written out with materialised attention.

    tokens [B, N, d] (cls + patches of the layer input), text [B, K_N, D] -> (prompts
    [B, K_N, d], LayerNorm outputs [B, K_N, d] for the auxiliary classifier)."""
    q = layer.query(text.to(tokens.dtype))  # (B, K_N, d)
    k, v = layer.key(tokens), layer.value(tokens)  # (B, N, d)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, K_N, N)
    attended = scores.softmax(dim=-1) @ v  # (B, K_N, d)
    normed = layer.norm(attended + tokens[:, :1])  # (B, K_N, d): + K_N copies of the class token
    return layer.proj(normed), normed


def released_class_aware_prompts(layer: nn.Module, tokens: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CAVPT `variant="released"` as fanrena/DPT trainers/DPT.py `CAVPT.forward` + `Attention.forward`
    write it (batch-first here): -> (prompts [B, K_N, d], auxiliary logits [B, K_N, K])."""
    class_token = tokens.detach()  # (B, N, d)
    class_prompt = layer.query(text.to(tokens.dtype))  # (B, K_N, d): meta_nets[i]
    ctx = layer.extra_tokens.unsqueeze(0).expand(class_token.shape[0], -1, -1)  # (B, 10, d)
    kv = torch.cat([class_token, ctx.to(class_token.dtype)], dim=1)  # (B, N+10, d)
    q, k = layer.q_proj(class_prompt), layer.k_proj(kv)  # (B, K_N, 32), (B, N+10, 32)
    u = torch.bmm(q, k.transpose(1, 2)) / q.shape[-1] ** 0.5  # (B, K_N, N+10)
    output = layer.out_proj(torch.bmm(F.softmax(u, dim=-1), kv))  # (B, K_N, d): vmlp after attention
    logits = layer.classifier(layer.aux_norm(output))  # (B, K_N, K): lns[i], classfiers[i]
    return layer.norm(output + class_prompt), logits  # lns2[i]


def maple_visual_prompts(model: PromptModel) -> torch.Tensor:
    """MaPLe's `MultiModalPromptLearner.forward`: `proj(ctx)` and `[layer(prompt) for each compound
    prompt]`, stacked: [J, M, d] (muzairkhattak/multimodal-prompt-learning trainers/maple.py)."""
    coupling, text = model.visual, model.text
    visual_deep_prompts = []
    for index, layer in enumerate(coupling.deep):
        visual_deep_prompts.append(layer(text.deep_context[index]))  # (M, d)
    return torch.stack([coupling.first(text.context), *visual_deep_prompts])  # (J, M, d)


def image_features(model: PromptModel, images: torch.Tensor, topk: Optional[torch.Tensor] = None,
                   text: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prompted image features [B, D] (not normalised) and CAVPT's LayerNorm outputs per layer
    (`variant="released"`: its auxiliary logits per layer; its deep prompts stop below the CAVPT layers).

    Every layer of the deep methods rebuilds the full sequence `[cls, prompts, patches]` with
    `torch.cat` and runs CLIP's block on all of it; what the block writes into the prompt
    slots is dropped before the next layer (VPT-deep, eq. 6)."""
    visual = model.clip.visual
    if model.visual is None:  # zeroshot, coop, e2mim: the frozen tower, as CoOp's image_encoder
        return visual(images.to(visual.conv1.weight.dtype)), []
    coupled = isinstance(model.visual, CoupledPrompts)  # MaPLe: the prompts are maps of the text prompts
    prompts = maple_visual_prompts(model) if coupled else model.visual.prompts  # (L, P, d)
    blocks = visual.transformer.resblocks
    first = prompts[0] if prompts.shape[0] > 0 else None  # (P, d): layer 1's prompts
    if first is not None and model.visual.placement == "before-ln-pre":
        # MaPLe's VisionTransformer.forward: [cls, patches, prompts] through ln_pre together
        x = embed(visual, images, first=first)  # (B, N+P, d)
        x, first = x[:, : -first.shape[0]], x[:, -first.shape[0] :]  # (B, N, d), (B, P, d) normalised
    else:
        x = embed(visual, images)  # (B, N, d)
        first = first.to(x.dtype).expand(x.shape[0], -1, -1) if first is not None else None  # (B, P, d)
    if model.visual_mode == "shallow":
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)  # (B, 1+P+Np, d)
        for block in blocks:
            x = block(x)  # (B, 1+P+Np, d)
        return pool(visual, x), []

    first_cavpt = len(blocks) - len(model.cavpt) if getattr(model, "cavpt", None) is not None else len(blocks)
    class_aware = released_class_aware_prompts if getattr(model, "released", False) else class_aware_prompts
    normed = []
    n_slots = 0
    for layer, block in enumerate(blocks):
        if model.visual.carry and layer >= prompts.shape[0]:  # MaPLe above its prompt depth: the slots stay
            x = block(x)  # (B, 1+P+Np, d)
            continue
        cls, patches = x[:, :1], x[:, 1 + n_slots:]  # (B, 1, d), (B, Np, d)
        slots = [first if layer == 0 else prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)
                 ] if layer < prompts.shape[0] else []  # [(B, P, d)]
        if layer >= first_cavpt:
            extra, h = class_aware(model.cavpt[layer - first_cavpt], torch.cat([cls, patches], dim=1), text)
            slots.append(extra)  # (B, K_N, d)
            normed.append(h)
        x = torch.cat([cls, *slots, patches], dim=1)  # (B, 1+P(+K_N)+Np, d)
        n_slots = x.shape[1] - 1 - patches.shape[1]
        x = block(x)  # (B, 1+P(+K_N)+Np, d): prompt rows through attention *and* MLP
    return pool(visual, x), normed


# ----------------------------------------------------------------------------------------
# the anchor of a PromptModel
# ----------------------------------------------------------------------------------------


class Anchor:
    """The anchor-style computation of `model`'s method on `model`'s CLIP and prompt tensors.

    Built once, like a research codebase's `CustomCLIP.__init__`: the hand-crafted features
    are computed here; the learnable text runs through the 77-token encoder in every call."""

    def __init__(self, model: PromptModel):
        self.model = model
        self.method = model.method
        self.handcrafted = handcrafted_features(model)  # (K, D), normalised, fixed

    def text_features(self) -> torch.Tensor:
        """Class features [K, D], normalised: CoOp's text encoder every call, or the cached templates."""
        model = self.model
        if model.text is None:
            return self.handcrafted
        return l2norm(text_encoder(model.clip, coop_prompts(model), model.text.tokens, model.text.deep_context))  # (K, D)

    def zero_shot_features(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot CLIP's image features [B, D], normalised (the released code's extra frozen forward)."""
        with torch.no_grad():
            return l2norm(self.model.clip.encode_image(images.to(self.model.clip.visual.conv1.weight.dtype)))  # (B, D)

    def zero_shot_topk(self, images: torch.Tensor) -> torch.Tensor:
        """CAVPT's online top-K (the released code's extra frozen forward per step) [B, K_N]."""
        return (self.zero_shot_features(images) @ self.handcrafted.t()).topk(self.model.k_n, dim=-1).indices  # (B, K_N)

    def loss_and_logits(self, images: torch.Tensor, labels: torch.Tensor,
                        topk: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(training objective, detached logits [B, K]) of the method, as the research code writes it."""
        model = self.model
        tau = model.clip.logit_scale.exp()  # ()
        if getattr(model, "released", False):
            return self._released_cavpt(images, labels, topk, tau)
        if self.method == "cocoop":
            return self._cocoop(images, labels, tau)
        if self.method == "promptsrc":
            return self._promptsrc(images, labels, tau)
        if self.method == "cavpt":
            topk = self.zero_shot_topk(images) if topk is None else topk  # (B, K_N)
            x, normed = image_features(model, images, topk, self.handcrafted[topk])  # (B, D)
        else:
            x, normed = image_features(model, images)  # (B, D)
        w = self.text_features()  # (K, D)
        xn = l2norm(x)  # (B, D)
        logits = tau * xn @ w.t()  # (B, K): materialised
        if self.method == "e2mim":
            loss = self._e2mim_loss(xn, w, labels, tau)
        else:
            loss = F.cross_entropy(logits, labels)
        if self.method == "kgcoop":
            loss = loss + model.config.weight * self._kgcoop_score(w)
        if self.method == "cavpt":
            aux = torch.stack([self._cavpt_aux(layer, h, topk, labels, tau)
                               for layer, h in zip(model.cavpt, normed)]).mean()
            loss = loss + model.config.alpha * aux
        return loss, logits.detach()

    def _kgcoop_score(self, text_features: torch.Tensor) -> torch.Tensor:
        """KgCoOp's `score` as htyao89/KgCoOp trainers/kgcoop.py `CustomCLIP.forward` writes it: the
        learned features [K, D] against `ori_embedding`, the template features computed once at init."""
        cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
        text_features_old = l2norm(self.handcrafted)  # (K, D)
        score = cos(text_features, text_features_old)  # (K,)
        return 1.0 - torch.mean(score)

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor,
                   topk: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The terms a gradient rule combines ({"loss": ...} alone for other methods), logits [B, K]."""
        if self.method == "prograd":
            return self._prograd(images, labels)
        loss, logits = self.loss_and_logits(images, labels, topk)
        return {"loss": loss}, logits

    def _prograd(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """ProGrad's `forward_backward` up to the losses: `CustomCLIP.forward`, `zs_clip(image)`
        (the frozen image tower again) and `ProGradLoss` (xe, soft cross-entropy · T²)."""
        model = self.model
        tau = model.clip.logit_scale.exp()  # ()
        visual = model.clip.visual
        image_features = l2norm(visual(images.to(visual.conv1.weight.dtype)))  # (B, D)
        output = tau * image_features @ self.text_features().t()  # (B, K)
        with torch.no_grad():
            zs_clip_output = tau * self.zero_shot_features(images) @ self.handcrafted.t()  # (B, K): a second image pass
        t = model.config.temperature
        xe_loss = F.cross_entropy(output, labels)
        tea_prob = F.softmax(zs_clip_output / t, dim=-1)  # (B, K)
        kl_loss = (-tea_prob * F.log_softmax(output / t, -1) * t * t).sum(1).mean()
        return {"loss": xe_loss, "kl": kl_loss}, output.detach()

    def rule_backward(self, terms: dict[str, torch.Tensor], params: list) -> None:
        """`prograd_backward_and_update` (Dassl.ProGrad.pytorch dassl/engine/trainer.py) up to the
        optimiser step, as written there."""
        lambda_ = self.model.config.projection_weight
        for p in params:
            p.grad = None
        terms["kl"].backward(retain_graph=True)
        b_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        terms["loss"].backward()
        for p, b_grad in zip(params, b_grads):
            b_grad_norm = b_grad / torch.linalg.norm(b_grad)
            a_grad = p.grad.clone()
            a_grad_norm = a_grad / torch.linalg.norm(a_grad)
            if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
                p.grad = a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm

    def _promptsrc(self, images: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PromptSRC as muzairkhattak/PromptSRC trainers/promptsrc.py `CustomCLIP.forward` (training) and
        `PromptSRC.forward_backward` (PREC fp32's branch) write it."""
        model, cfg = self.model, self.model.config
        x, _ = image_features(model, images)  # (B, D): the prompted tower, every token through every block
        image_ft = l2norm(x)  # (B, D)
        text_features = self.text_features()  # (K, D): 77-token prompts, normalised
        logits = tau * image_ft @ text_features.t()  # (B, K)
        fixed_embeddings = l2norm(model.text_target)  # (K, D): `fixed_embeddings / fixed_embeddings.norm(...)`
        with torch.no_grad():
            zs_image_embedd = self.zero_shot_features(images)  # (B, D): ZS_image_encoder, a second image pass
            zero_shot_logits = tau * zs_image_embedd @ fixed_embeddings.t()  # (B, K)
        loss_ce = F.cross_entropy(logits, labels)
        loss_scl_text = F.l1_loss(text_features, fixed_embeddings, reduction="mean") * cfg.text_weight
        loss_scl_image = F.l1_loss(image_ft, zs_image_embedd, reduction="mean") * cfg.image_weight
        L_SCL_logits = F.kl_div(F.log_softmax(logits / 1, dim=1), F.log_softmax(zero_shot_logits / 1, dim=1),
                                reduction="sum", log_target=True) * (1 * 1) / logits.numel()
        L_SCL = L_SCL_logits + loss_scl_text + loss_scl_image
        return loss_ce + L_SCL, logits.detach()

    def _cocoop(self, images: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCoOp as KaiyangZhou/CoOp trainers/cocoop.py `PromptLearner.forward` and `CustomCLIP.forward`
        write it: the prompts of every image stacked [B, K, 77, w], then one text-tower pass of
        K full prompts per image, each image scored against its own class features."""
        model = self.model
        learner = model.text
        visual = model.clip.visual
        image_features = l2norm(visual(images.to(visual.conv1.weight.dtype)))  # (B, D)
        bias = model.meta(image_features).unsqueeze(1)  # (B, 1, w)
        ctx_shifted = learner.context.unsqueeze(0) + bias  # (B, M, w)
        n_cls = learner.token_prefix.shape[0]
        prompts = torch.stack([torch.cat([learner.token_prefix, ctx_i.unsqueeze(0).expand(n_cls, -1, -1),
                                          learner.token_suffix], dim=1) for ctx_i in ctx_shifted])  # (B, K, 77, w)
        logits = []
        for pts_i, imf_i in zip(prompts, image_features):
            text_features = l2norm(text_encoder(model.clip, pts_i, learner.tokens))  # (K, D): 77 tokens, every class
            logits.append(tau * imf_i @ text_features.t())  # (K,)
        logits = torch.stack(logits)  # (B, K)
        return F.cross_entropy(logits, labels), logits.detach()

    def _released_cavpt(self, images: torch.Tensor, labels: torch.Tensor, topk: Optional[torch.Tensor],
                        tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CAVPT `variant="released"` as fanrena/DPT trainers/DPT.py `CustomCLIP_Selected_CoVPTDeep.forward`
        and `DPT.forward_backward` write it."""
        model = self.model
        zero_shot = self.zero_shot_features(images)  # (B, D)
        if topk is None:
            topk = (zero_shot @ self.handcrafted.t()).topk(model.k_n, dim=-1).indices  # (B, K_N)
        if model.text is None:
            text_features = self.handcrafted  # (K, D)
        else:
            text_features = text_encoder(model.clip, coop_prompts(model), model.text.tokens,
                                         model.text.deep_context)  # (K, D), unnormalised
        x, layer_logits = image_features(model, images, topk, text_features[topk])  # (B, D), [(B, K_N, K)]
        text_norm = l2norm(text_features)  # (K, D)
        output = tau * l2norm(x) @ text_norm.t()  # (B, K)
        if model.guiding:
            output1 = tau * zero_shot @ text_norm.t()  # (B, K): zero-shot image, learned text
            output2 = tau * l2norm(x) @ self.handcrafted.t()  # (B, K): prompted image, hand-crafted text
            loss = F.cross_entropy(output1, labels) + F.cross_entropy(output2, labels) + 0.1 * F.cross_entropy(output, labels)
        else:
            loss = F.cross_entropy(output, labels)
        k = model.num_classes
        logits = torch.stack(layer_logits, dim=1).reshape(-1, k)  # (B·layers·K_N, K)
        tmp = (topk == labels[:, None])[:, None, :].expand(-1, len(layer_logits), -1).reshape(-1)  # (B·layers·K_N,)
        if bool(tmp.any()):  # DPT: `layer_logits.shape != torch.Size([0])`
            one_hot = F.one_hot(labels[:, None, None].expand(-1, len(layer_logits), topk.shape[1]).reshape(-1), k)
            loss = loss + model.config.alpha * F.cross_entropy(logits[tmp], one_hot[tmp].to(logits.dtype))
        return loss, output.detach()

    def _cavpt_aux(self, layer: nn.Module, normed: torch.Tensor, topk: torch.Tensor, labels: torch.Tensor,
                   tau: torch.Tensor) -> torch.Tensor:
        """Eq. 10: K-way cosine classifier on the LayerNorm outputs [B, K_N, d]."""
        k = self.model.num_classes
        logits = tau * l2norm(normed) @ l2norm(layer.classifier).t()  # (B, K_N, K)
        is_gt = topk == labels[:, None]  # (B, K_N)
        if self.model.config.aux_target == "gt-only":
            if not bool(is_gt.any()):
                return normed.sum() * 0.0
            return F.cross_entropy(logits[is_gt], labels[:, None].expand_as(topk)[is_gt])
        onehot = F.one_hot(labels, k).to(logits.dtype)  # (B, K)
        targets = torch.where(is_gt[..., None], onehot[:, None, :], torch.full_like(logits, 1.0 / k))  # (B, K_N, K)
        return F.cross_entropy(logits.reshape(-1, k), targets.reshape(-1, k))

    def _e2mim_loss(self, xn: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """CE over original + class-wise mixed features (soft targets) + mi_weight · InfoNCE."""
        model, cfg = self.model, self.model.config
        onehot = F.one_hot(labels, model.num_classes).to(xn.dtype)  # (B, K)
        feats, targets = xn, onehot
        if cfg.mixup:
            a, b, keep = classwise_pairs(labels)  # (B,) each
            alpha = torch.tensor(float(cfg.mixup_alpha), device=xn.device)  # the model's draw: one λ per pair
            lam = torch.distributions.Beta(alpha, alpha).sample((a.shape[0], 1))[keep].to(xn.dtype)  # (Bm, 1)
            a, b = a[keep], b[keep]  # (Bm,): the pairs whose labels differ (a data-dependent shape)
            feats = torch.cat([xn, lam * xn[a] + (1 - lam) * xn[b]])  # (M, D)
            targets = torch.cat([onehot, lam * onehot[a] + (1 - lam) * onehot[b]])  # (M, K)
        fn = l2norm(feats)  # (M, D)
        soft = tau * fn @ w.t()  # (M, K)
        loss = F.cross_entropy(soft, targets)
        if cfg.mi_weight > 0:
            hand = tau * fn @ self.handcrafted.t()  # (M, K)
            critic = model.e2mim
            if cfg.mi_input == "probs":  # the views' prediction probabilities
                soft, hand = F.softmax(soft, dim=-1), F.softmax(hand, dim=-1)  # (M, K) each
            zs, zh = l2norm(critic.soft_head(soft)), l2norm(critic.hand_head(hand))  # (M, e) each
            nce_logits = critic.logit_scale.exp() * zs @ zh.t()  # (M, M)
            loss = loss + cfg.mi_weight * F.cross_entropy(nce_logits, torch.arange(zs.shape[0], device=zs.device))
        return loss


def anchor_loss_and_logits(model: PromptModel, images: torch.Tensor, labels: torch.Tensor,
                           topk: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off convenience: build the anchor of `model` and run it once."""
    return Anchor(model).loss_and_logits(images, labels, topk)
