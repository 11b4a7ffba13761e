"""IVLP: independent vision-language prompting, the deep V-L baseline of MaPLe (Khattak et al.,
"MaPLe: Multi-modal Prompt Learning", CVPR 2023).

What muzairkhattak/multimodal-prompt-learning `trainers/independentVL.py` computes (`VLPromptLearner`,
`CustomCLIP`) on its `clip/model.py` (`VisionTransformer`, `ResidualAttentionBlock_IVLP`):
- text: CoOp's shared context of M = `n_ctx` tokens initialised from the first M tokens of
  `ctx_init`, the rest of the phrase kept in the prompt (`[SOS, u_1, u_2, "of", "a", CLASS, ".",
  EOS]` for 2 tokens of "a photo of a"); layers 2..J = `text_depth` overwrite the context
  positions with their own N(0, 0.02) context (`fastprompt.prompts.coop`);
- image: P = `n_prompts` prompts per layer in layers 1..N = `vision_depth`, layer 1's appended
  before `ln_pre` (`placement="before-ln-pre"`), layers 2..N replacing the slots, the slots
  carried above layer N (`fastprompt.models.vision`);
- `L = CE(τ cos(f_P(image), g_U(class)), y)`, both prompt sets learned together, independently
  (no coupling between the two towers: that is `maple`).
It is `vlp` with MaPLe's placement, depths and defaults: one composition of the same parts.

Defaults (configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml, the config of the base-to-new
script scripts/independent-vlp/base2new_train_ivlp.sh): N_CTX_TEXT 2, N_CTX_VISION 2, CTX_INIT
"a photo of a", PROMPT_DEPTH_TEXT 12 and PROMPT_DEPTH_VISION 12 (every layer of ViT-B/16; the
depths default to every layer of the tower here, train.py's own defaults of 9 are overridden
by that yaml); OPTIM LR 0.0035, WARMUP_EPOCH 1 (constant 1e-5), one optimiser for both prompt sets.
PromptSRC's IVLP baseline (4 + 4 tokens, depth 9) is `--coop.n-ctx 4 --vpt.n-prompts 4
--coop.text-depth 9 --vpt.vision-depth 9`.

Where fastprompt differs: fp32 / bf16 instead of the released fp16 (PREC "fp16"; its `.half()`
casts of the prompts even in fp32 mode); the released code learns random context when n_ctx > 4
even with ctx_init set, and reads past the phrase when n_ctx exceeds its length but is <= 4:
fastprompt refuses an n_ctx longer than the phrase instead.
"""

from __future__ import annotations

from fastprompt.methods.registry import register_method
from fastprompt.methods.vlp import Vlp


@register_method("ivlp")  # options (IvlpConfig), groups, frozen image tower: fastprompt.methods.specs
class Ivlp(Vlp):
    """`vlp`'s composition (CoOp context + carried deep visual prompts) with MaPLe's defaults and recipe."""
