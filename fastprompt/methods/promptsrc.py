"""PromptSRC: IVLP deep prompts regularised toward frozen CLIP, averaged over epochs (Khattak et
al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting", ICCV 2023).

What muzairkhattak/PromptSRC `trainers/promptsrc.py` computes (`VLPromptLearner`, `CustomCLIP`,
`PromptSRC.forward_backward`, `build_model`) on its `clip/model.py` (IVLP's `VisionTransformer`
and `ResidualAttentionBlock_IVLP`):
- the prompts are IVLP's (`ivlp`, the same parts): a shared text context of M = 4 tokens
  initialised from "a photo of a" in layer 1 and N(0, 0.02) context of their own in layers
  2..9, P = 4 visual prompts per layer in layers 1..9, layer 1's appended before `ln_pre`;
- x, w: the prompted image and class features, normalised; logits `τ x wᵀ`;
- z: the frozen tower's image features of the same images, normalised (`ZS_image_encoder`;
  computed once a step, used by two terms);
- t: the frozen text target, `fixed_embeddings`: the mean over PromptSRC's 60 templates
  (`IMAGENET_TEMPLATES` of trainers/imagenet_templates.py, not the 7 "select" ones) of the
  frozen text tower's *unnormalised* class features, normalised after the mean; computed once
  per class set, cached (`fastprompt.prompts.handcrafted`, `normalise_each=False`);
- the teacher's logits `τ z tᵀ` (the same frozen τ; no gradient);
- L = CE(τ x wᵀ, y) + (KL + 25 · mean|w − t| + 10 · mean|x − z|), where KL is
  `F.kl_div(log_softmax(logits), log_softmax(teacher), reduction="sum", log_target=True) / (B·K)`
  (temperature 1), the L1 terms are `F.l1_loss(..., reduction="mean")` over [K, D] and [B, D];
- Gaussian prompt aggregation (GPA): after epoch e (numbered from 1) of N, the prompts are
  added with weight g(e) / Σ_{a=1..N} g(a), g the N(GPA_MEAN, GPA_STD²) density, into a running
  sum (`running + w_e · p_e`, in the prompts' dtype); after the last epoch the model takes the
  sum (`end_epoch`). The sum is training state (`training_state`): every checkpoint holds it,
  so a resumed run ends on the same prompts.
Evaluation is the prompted model alone (`CustomCLIP.forward` outside training): logits `τ x wᵀ`.

Defaults (configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml, the config of
scripts/promptsrc/base2new_train.sh): N_CTX_TEXT 4, N_CTX_VISION 4, CTX_INIT "a photo of a",
PROMPT_DEPTH_TEXT 9, PROMPT_DEPTH_VISION 9, TEXT_LOSS_WEIGHT 25, IMAGE_LOSS_WEIGHT 10, GPA_MEAN
15, GPA_STD 1; OPTIM sgd, LR 0.0025, WARMUP_EPOCH 1 (constant 1e-5), cosine over 20 epochs,
batch 4. A tower with fewer than 9 layers (the test CLIP) takes prompts in every layer, said once.

Where fastprompt differs: fp32 / bf16 instead of the released fp16 (PREC "fp16": the prompted
CLIP and `ZS_image_encoder` in half, `fixed_embeddings` from an fp32 copy); the released GPA
weights and sums the whole `state_dict()` (the frozen CLIP and token buffers too, which in fp16
moves them by the rounding of Σ_e w_e · W), fastprompt only the trained prompts; the weights
are normalised from log densities, so a Gaussian far from every epoch, whose densities all
underflow to 0 in the released float64 (a NaN model), puts its weight on the nearest epoch;
`csc` is refused (one shared context, as released).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.losses import loss_dtype
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import PROMPTSRC_DEPTH, PromptsrcConfig
from fastprompt.methods.vlp import Vlp
from fastprompt.models.clip import require_vit
from fastprompt.prompts.handcrafted import template_features

log = logging.getLogger(__name__)

# muzairkhattak/PromptSRC trainers/imagenet_templates.py IMAGENET_TEMPLATES: the text target's templates
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)
GPA_PREFIX = "gpa."  # training_state() names: the running sum of each prompt tensor, "gpa.text.context", ...


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """`PromptSRC.build_model`'s `self.gauss`: the N(mean, std²) density at epochs 1..N,
    normalised to sum 1 (from log densities: the released constant 1/(σ√2π) cancels)."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    dens = [math.exp(v - top) for v in logs]
    total = sum(dens)
    return [d / total for d in dens]


def scl_logits(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_SCL_logits as released: `F.kl_div(log_softmax(logits / 1), log_softmax(teacher / 1),
    reduction="sum", log_target=True) * (1 * 1) / logits.numel()`: the KL summed over [B, K] / (B·K)."""
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(teacher, dim=1), reduction="sum", log_target=True)
    return kl / logits.numel()


@register_method("promptsrc")  # options, groups (text, visual), frozen image tower: fastprompt.methods.specs
class Promptsrc(Vlp):
    """`ivlp`'s composition (CoOp context + carried deep visual prompts) with PromptSRC's losses and GPA."""

    def __init__(self, bundle, classnames, templates, backend, config: PromptsrcConfig):
        require_vit(bundle, "promptsrc")
        text_layers = len(bundle.model.transformer.resblocks)
        depths = {}
        for name, layers in (("text_depth", text_layers), ("vision_depth", bundle.vision_layers)):
            if getattr(config, name) is None:
                if layers < PROMPTSRC_DEPTH:
                    log.warning("promptsrc %s: the tower has %d layers, fewer than PromptSRC's %d; prompts in all %d",
                                name, layers, PROMPTSRC_DEPTH, layers)
                depths[name] = min(PROMPTSRC_DEPTH, layers)
        super().__init__(bundle, classnames, templates, backend, replace(config, **depths))
        # (K, D) normalised: the frozen text target `fixed_embeddings`, averaged over PROMPTSRC_TEMPLATES before
        # normalising; computed once per class set and cached (memory and disk), as the template features
        self.register_buffer("text_target", template_features(bundle, self.classnames, PROMPTSRC_TEMPLATES,
                                                              normalise_each=False), persistent=False)
        self._gpa: Optional[dict[str, torch.Tensor]] = None  # the running GPA sum of each prompt tensor

    # ----------------------------------------------------------------- the objective
    def loss_and_logits(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                        features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CE + (KL to the frozen model's logits + text L1 + image L1); logits [B, K] of the same forward."""
        if features is not None:
            raise FastpromptError("promptsrc prompts its image tower; it needs images, not cached features")
        self._check_labels(labels, images)
        x = self.image_features(images)  # (B, D), normalised: the prompted tower
        z = self.frozen_image_features(images)  # (B, D), normalised: the frozen tower, once, no gradient
        w = self.text_features()  # (K, D), normalised: one text-tower pass
        t = self.text_target  # (K, D), normalised, fixed
        with torch.autocast(x.device.type, enabled=False):
            dtype = loss_dtype(self.backend, x, w)
            tau = self.logit_scale().to(dtype)
            x, z, w, t = x.to(dtype), z.to(dtype), w.to(dtype), t.to(dtype)
            logits = tau * x @ w.t()  # (B, K)
            with torch.no_grad():
                teacher = tau * z @ t.t()  # (B, K): the frozen image against the frozen text target
            cfg = self.config
            scl = (scl_logits(logits, teacher) + F.l1_loss(w, t) * cfg.text_weight
                   + F.l1_loss(x, z) * cfg.image_weight)  # (): forward_backward's L_SCL, in its order
            loss = F.cross_entropy(logits, labels) + scl
        return loss, logits.detach()

    # ----------------------------------------------------------------- GPA
    def end_epoch(self, epoch: int, epochs: int) -> None:
        """GPA: add this epoch's prompts with their Gaussian weight into the running sum; after
        the last epoch, the model takes the sum (`forward_backward` on the epoch's last batch)."""
        weight = gpa_weights(epochs, self.config.gpa_mean, self.config.gpa_std)[epoch - 1]
        if epoch > 1 and self._gpa is None:
            raise FastpromptError(f"promptsrc: no GPA sum of epochs 1..{epoch - 1} to add epoch {epoch} to; "
                                  "resume from a checkpoint (it holds the sum) or train from epoch 1")
        with torch.no_grad():
            current = self.prompt_state_dict()
            if epoch == 1:
                self._gpa = {name: p * weight for name, p in current.items()}
            else:
                self._gpa = {name: self._gpa[name] + p * weight for name, p in current.items()}
        if epoch == epochs:
            self.load_prompt_state_dict(self._gpa)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {} if self._gpa is None else {GPA_PREFIX + name: t for name, t in self._gpa.items()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.prompt_state_dict()
        expected = {GPA_PREFIX + name for name in own}
        if set(state) != expected:
            raise ValueError(f"the checkpoint's PromptSRC GPA sum holds {', '.join(sorted(state)) or 'nothing'}, this "
                             f"run's prompts need {', '.join(sorted(expected))}")
        for name, p in own.items():
            if tuple(state[GPA_PREFIX + name].shape) != tuple(p.shape):
                raise ValueError(f"GPA sum {name} has shape {tuple(state[GPA_PREFIX + name].shape)}, the prompts {tuple(p.shape)}")
        self._gpa = {name: state[GPA_PREFIX + name].to(p.device, p.dtype) for name, p in own.items()}
