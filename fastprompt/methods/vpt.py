"""VPT on CLIP's image tower with cached hand-crafted text features (the CAVPT paper's eqs. 4-6).

`placement` says where layer 1's prompts enter: after `ln_pre` (default; fanrena/DPT, the CAVPT
authors' code) or before it (muzairkhattak/multimodal-prompt-learning `clip/model.py`: MaPLe's
VPT trainer); see `fastprompt.models.vision`."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import VISUAL_GROUP, PromptModel, add_visual_prompts
from fastprompt.methods.options import VisualDepthOptions, VisualOptions
from fastprompt.methods.registry import register_method


@dataclass
class VptConfig(VisualOptions):
    pass


@dataclass
class VptDeepConfig(VisualDepthOptions, VisualOptions):
    pass


@register_method("vpt-shallow")
class VptShallow(PromptModel):
    """P prompts inserted after the embedding and carried through every layer."""

    options = VptConfig
    groups = (VISUAL_GROUP,)
    frozen_image_tower = False

    def __init__(self, bundle, classnames, templates, backend, config: VptConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_visual_prompts(self, "shallow", config.n_prompts, placement=config.placement)


@register_method("vpt-deep")
class VptDeep(PromptModel):
    """P learnable prompts per layer, replaced at every layer (eq. 6); with `vision_depth` N < L
    in the first N layers only, what layer N writes into them carried above (MaPLe's VPT)."""

    options = VptDeepConfig
    groups = (VISUAL_GROUP,)
    frozen_image_tower = False

    def __init__(self, bundle, classnames, templates, backend, config: VptDeepConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_visual_prompts(self, "deep", config.n_prompts, layers=config.vision_depth, placement=config.placement,
                           carry=True)
