"""VLP: CoOp text context and VPT-deep visual prompts learned together (the CAVPT paper's VLP-CLIP)."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import TEXT_GROUP, VISUAL_GROUP, PromptModel, add_coop, add_visual_prompts
from fastprompt.methods.options import CoopOptions, TextDepthOptions, VisualDepthOptions, VisualOptions
from fastprompt.methods.registry import register_method


@dataclass
class VlpConfig(VisualDepthOptions, VisualOptions, TextDepthOptions, CoopOptions):
    pass


@register_method("vlp")
class Vlp(PromptModel):
    options = VlpConfig
    groups = (TEXT_GROUP, VISUAL_GROUP)
    frozen_image_tower = False

    def __init__(self, bundle, classnames, templates, backend, config: VlpConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
        add_visual_prompts(self, "deep", config.n_prompts, layers=config.vision_depth, placement=config.placement,
                           carry=True)
