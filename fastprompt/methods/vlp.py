"""VLP: CoOp text context and VPT-deep visual prompts learned together (the CAVPT paper's VLP-CLIP)."""

from __future__ import annotations

from fastprompt.methods.base import PromptModel, add_coop, add_visual_prompts
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import VlpConfig


@register_method("vlp")  # options, groups, frozen image tower: fastprompt.methods.specs
class Vlp(PromptModel):
    def __init__(self, bundle, classnames, templates, backend, config: VlpConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
        add_visual_prompts(self, "deep", config.n_prompts, layers=config.vision_depth, placement=config.placement,
                           carry=True)
