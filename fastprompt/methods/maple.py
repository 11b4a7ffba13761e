"""MaPLe: multi-modal prompt learning (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023).

What muzairkhattak/multimodal-prompt-learning `trainers/maple.py` computes (`MultiModalPromptLearner`,
`CustomCLIP`) on its `clip/model.py` (`VisionTransformer_MaPLe`, `ResidualAttentionBlock_MaPLe`):
- text: CoOp's shared context u of M = `n_ctx` tokens in layer 1, initialised from the first
  M tokens of `ctx_init`, the rest of the phrase kept in the prompt; layers 2..J = `prompt_depth`
  overwrite the context positions with their own u^(l) (N(0, 0.02), `compound_prompts_text`);
  above J the positions carry what layer J wrote (`fastprompt.prompts.coop`);
- image: no prompt of its own. Layer 1's M visual prompts are F_1(u) (`proj`), appended before
  `ln_pre` (`VisionTransformer_MaPLe.forward`); layers 2..J replace the slots with F_l(u^(l))
  (`compound_prompt_projections`); the slots are carried above layer J. Each F is a Linear
  text width -> vision width; F_2..F_J start as copies of one Linear, F_1 is initialised on
  its own (`fastprompt.prompts.visual.CoupledPrompts`);
- `L = CE(τ cos(f(image; F(U)), g(class; U)), y)`, one optimiser for u, u^(l) and every F.

Defaults (configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml, the config of
scripts/maple/base2new_train_maple.sh): N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9;
OPTIM LR 0.0035, WARMUP_EPOCH 1 (constant 1e-5). A tower with fewer than 9 layers (the test
CLIP) takes prompts in every layer, said once in the log; a `prompt_depth` given larger than
a tower is refused.

Where fastprompt differs: fp32 / bf16 instead of the released fp16 (PREC "fp16"; `proj` is cast
with `.half()` and the prompts with `.half()` in the towers); the widths come from the towers
(the released code writes 512 and 768, ViT-B's); `csc` is refused (MaPLe couples one shared
context); an `n_ctx` longer than `ctx_init` is refused (the released code then learns random
context when n_ctx > 4 and reads past the phrase otherwise). Token order `[cls, prompts,
patches]` instead of `[cls, patches, prompts]`: the same function (`fastprompt.models.vision`).
"""

from __future__ import annotations

import logging
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.methods.base import PromptModel
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import MapleConfig
from fastprompt.models.clip import require_vit
from fastprompt.prompts.coop import CoopContext
from fastprompt.prompts.visual import CoupledPrompts

log = logging.getLogger(__name__)

PROMPT_DEPTH = 9  # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml TRAINER.MAPLE.PROMPT_DEPTH


@register_method("maple")  # options, groups (visual: the coupling functions), frozen image tower: fastprompt.methods.specs
class Maple(PromptModel):

    def __init__(self, bundle, classnames, templates, backend, config: MapleConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        require_vit(bundle, self.method)
        depth = self._resolve_depth(bundle, config.prompt_depth)
        self.text = CoopContext(bundle, self.classnames, n_ctx=config.n_ctx, ctx_init=config.ctx_init, depth=depth)
        self.visual = CoupledPrompts(bundle.text_width, bundle.vision_width, depth, placement=config.placement,
                                     device=bundle.device)
        self.visual_mode = "deep"

    @staticmethod
    def _resolve_depth(bundle, depth: Optional[int]) -> int:
        text_layers = len(bundle.model.transformer.resblocks)
        layers = min(text_layers, bundle.vision_layers)
        if depth is None:
            if layers < PROMPT_DEPTH:
                log.warning("maple prompt_depth: the towers have %d text and %d image layers, fewer than MaPLe's %d; "
                            "prompts in all %d", text_layers, bundle.vision_layers, PROMPT_DEPTH, layers)
            return min(PROMPT_DEPTH, layers)
        if depth > layers:
            raise FastpromptError(f"prompt_depth={depth} does not fit the towers ({text_layers} text and "
                                  f"{bundle.vision_layers} image layers); pick 1..{layers}")
        return depth

    def tower_prompts(self, images, context: dict) -> dict:
        """The image tower's prompts: the coupling functions of the text prompts, [J, M, d]."""
        return {"deep": self.visual(self.text.context, self.text.deep_context), "carry": self.visual.carry,
                "placement": self.visual.placement}

    def resolved_options(self) -> dict:
        options = super().resolved_options()
        options["prompt_depth"] = self.text.depth
        return options
